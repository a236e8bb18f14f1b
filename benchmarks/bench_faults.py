"""kill -9 at random moments, then --resume: do `rl` and `sft` end where an uninterrupted run ends?

    python benchmarks/bench_faults.py [--kills 20] [--seed 0] [--out benchmarks/results/faults.json]

For each command: one uninterrupted run of the tiny `test` model (a few seconds of work, checkpoints every 2
steps), then a run that is killed with SIGKILL at a random moment `--kills` times, resumed each time with
`--resume`, and finally resumed to the end. Recorded per command: the kills that landed (a run that finished
before its kill counts as a resume, not a kill), the resumes, whether every log line (timings aside) and every
weight of the final model equal the uninterrupted run's. The goal is all of them.
"""

import argparse
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from paths import ROOT, shown

sys.path.insert(0, str(ROOT / "src"))

from budgetthink.jsonl import atomic_write_json

TIMING = {"generate_s", "train_s", "step_s", "wall_s", "tok_s", "elapsed_s", "cpu_s", "tokens_per_s"}


def commands(model: Path, data: Path, out: Path) -> dict[str, list[str]]:
    cli = [sys.executable, "-m", "budgetthink"]
    return {
        "rl": [*cli, "rl", "--out", str(out), f"model={model}", "prompts_per_step=2", "n=4", "max_response_tokens=12",
               "train_size=40", "eval_size=4", "eval_every=2", "eval_max_tokens=12", "max_steps=10", "save_every=2"],
        "sft": [*cli, "sft", "--model", str(model), "--data", str(data), "--out", str(out), "format=tinyzero",
                "batch_size=4", "epochs=3", "save_every=2", "log_every=1"],
    }


def logs(run: Path) -> dict:
    """Every JSONL log of a run (timings removed), by name."""
    found = {}
    for f in sorted(run.glob("*.jsonl")):
        if f.name == "ledger.jsonl":  # wall time per attempt: differs by design
            continue
        found[f.name] = [{k: v for k, v in json.loads(x).items() if k not in TIMING} for x in f.read_text().splitlines()]
    return found


def weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "model" / "model.safetensors")


def same_weights(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def one_command(name: str, argv_of, rng: random.Random, kills: int, work: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole = work / f"{name}-whole"
    t0 = time.perf_counter()
    subprocess.run(argv_of(whole), env=env, check=True, capture_output=True)
    span = time.perf_counter() - t0
    out = work / f"{name}-killed"
    landed = resumes = 0
    for i in range(kills):
        argv = argv_of(out) + (["--resume"] if i else [])
        p = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.2, span))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            landed += 1
        p.wait()
        resumes += i > 0
        if (out / "model").exists() and p.returncode == 0:  # it finished: start again from scratch
            shutil.rmtree(out)
    r = subprocess.run(argv_of(out) + ["--resume"], check=False, env=env, capture_output=True, text=True)
    resumes += 1
    ok_logs = r.returncode == 0 and logs(out) == logs(whole)
    first_diff = None
    if r.returncode == 0 and not ok_logs:  # where the logs part: the file and the first differing line
        a, b = logs(whole), logs(out)
        for f in sorted(set(a) | set(b)):
            rows = [(i, x, y) for i, (x, y) in enumerate(zip(a.get(f, []), b.get(f, []))) if x != y]
            if rows or len(a.get(f, [])) != len(b.get(f, [])):
                first_diff = {"file": f, "lines": [len(a.get(f, [])), len(b.get(f, []))],
                              "first": rows[0] if rows else None}
                break
    ok_weights = r.returncode == 0 and same_weights(weights(out), weights(whole))
    return {"kills_landed": landed, "resumes": resumes, "final_rc": r.returncode, "logs_match": ok_logs,
            "weights_match": ok_weights, "uninterrupted_s": round(span, 1), "logs_differ_at": first_diff,
            "error": r.stderr.strip().splitlines()[-1] if r.returncode else None}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default="rl,sft", help="commands to run")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "faults.json")
    args = ap.parse_args()
    from budgetthink import tiny

    model = Path(tiny.cached_build("test", ROOT / ".cache" / "tiny"))
    rng = random.Random(args.seed)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "traces.jsonl"
        subprocess.run([sys.executable, "-m", "budgetthink", "distill", "--task", "countdown", "--teacher", "solver",
                        "--n", "24", "--out", str(data)], check=True, capture_output=True)
        for name in [x for x in ("rl", "sft") if x in args.only.split(",")]:
            print(f"[faults] {name}: {args.kills} kills", file=sys.stderr, flush=True)
            results[name] = one_command(name, lambda out, name=name: commands(model, data, out)[name], rng,
                                        args.kills, work)
            print(f"[faults] {name}: {results[name]}", file=sys.stderr, flush=True)
    summary = {"runs": len(results), "all_match": all(r["logs_match"] and r["weights_match"] for r in results.values()),
               "kills_landed": sum(r["kills_landed"] for r in results.values())}
    atomic_write_json(args.out, {"benchmark": "faults", "command": "python benchmarks/bench_faults.py "
                                 + " ".join(sys.argv[1:]), "model": shown(model), "summary": summary,
                                 "commands": results, "machine": {"platform": platform.platform(),
                                                                  "cores": os.cpu_count(),
                                                                  "load_average_at_end": os.getloadavg()}})
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
