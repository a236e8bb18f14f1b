#!/usr/bin/env bash
# s1 in small on a real model: SmolLM2-135M-Instruct, 600 solver traces of 2-digit multiplication, one epoch
# of full fine-tuning (fp32), then budget forcing at 16-128 thinking tokens on 100 held-out problems.
#   bash benchmarks/bench_smollm2_s1.sh [WORK]      # ~15 min SFT + ~10 min eval on 2 cores
# Writes benchmarks/results/smollm2_s1_multiply.{json,png}.
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-runs/smollm2-s1}
B=".venv/bin/budgetthink"
mkdir -p "$W"
$B models get smollm2-135m --out "$W/smollm2" > /dev/null
[ -f "$W/traces.jsonl" ] || $B distill --task multiply --teacher solver --n 600 --out "$W/traces.jsonl" digits=2 split=train
[ -d "$W/sft/model" ] || $B sft --model "$W/smollm2" --data "$W/traces.jsonl" --out "$W/sft" format=tinyzero epochs=1 \
    batch_size=4 lr=1e-4 dtype=float32 log_every=10
$B eval --model "$W/smollm2" --model "$W/sft/model" --task multiply --n 100 --budgets 16,32,64,128 \
    --max-answer-tokens 16 --out "$W/eval" digits=2 split=test
.venv/bin/python - "$W" <<'PY'
import json, shutil, sys
from pathlib import Path
w = Path(sys.argv[1])
res = json.loads((w / "eval" / "results.json").read_text())
sft = json.loads((w / "sft" / "summary.json").read_text()) if (w / "sft" / "summary.json").exists() else None
out = {"benchmark": "smollm2_s1_multiply", "command": "bash benchmarks/bench_smollm2_s1.sh", "sft": sft,
       "rows": res["rows"], "summary": res["summary"]}
Path("benchmarks/results/smollm2_s1_multiply.json").write_text(json.dumps(out, indent=2) + "\n")
shutil.copy(w / "eval" / "scaling.png", "benchmarks/results/smollm2_s1_multiply.png")
PY
