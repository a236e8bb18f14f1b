#!/usr/bin/env bash
# GPU check (benchmarks/gpu/check.py): vLLM engine tokens/s with and without budget forcing, one SFT and one
# GRPO step of the torch trainer in bf16 (tokens/s, MFU), on random Qwen2.5-0.5B and 3B shapes. A few minutes
# on one H100/H200. Writes $OUT/gpu_check.json when $OUT is set, else benchmarks/results/gpu_check.json
# (a --dry-run: $TMPDIR/gpu_check_dry.json).
#
#   bash benchmarks/gpu/check.sh                 # the check (needs CUDA)
#   bash benchmarks/gpu/check.sh --dry-run       # tiny shape on a CPU: the same code paths
#   PYTHON=/path/to/python bash benchmarks/gpu/check.sh --models qwen2.5-0.5b
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
# budgetthink from this checkout even where it is not installed (a bare GPU machine)
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 TOKENIZERS_PARALLELISM=false
if [ -n "${OUT:-}" ]; then
  exec "$PYTHON" benchmarks/gpu/check.py --out "$OUT/gpu_check.json" "$@"
fi
exec "$PYTHON" benchmarks/gpu/check.py "$@"   # default: benchmarks/results/gpu_check.json (dry run: under /tmp)
