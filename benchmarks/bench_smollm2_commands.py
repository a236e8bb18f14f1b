"""Every command on a real model, SmolLM2-135M-Instruct: wall time, peak memory, and kill -9 + resume for the
training commands. Writes benchmarks/results/smollm2_commands.json.

    python benchmarks/bench_smollm2_commands.py [--work runs/bench-smollm2-commands] [--threads 2]

Each command runs as its own process (`budgetthink ...`), so its peak resident memory is its own (wait4).
sft (full and LoRA) and rl are killed with SIGKILL once their first checkpoint is written, then resumed with
`--resume`; the run passes when every step is logged exactly once and the final model loads. Step time is the
median over the logged steps (from metrics.jsonl). The workloads are small on purpose (a few steps each): they
show what each command costs on this model's shapes, not what a full run buys (bench_smollm2_s1.sh does that).
"""

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from paths import ROOT, cpu_flags, shown

sys.path.insert(0, str(ROOT / "src"))

RESULTS = ROOT / "benchmarks" / "results"
BIN = str(Path(sys.executable).parent / "budgetthink")


def say(msg: str) -> None:
    print(f"[smollm2] {msg}", file=sys.stderr, flush=True)


def run(args: list, env: dict, log: Path, until=None) -> dict:
    """Run `budgetthink ARGS` (output appended to `log`); with `until` (a predicate polled every 0.2 s) SIGKILL
    it once that holds. Returns wall seconds, peak RSS in MiB and whether it was killed."""
    t = time.perf_counter()
    with open(log, "a") as sink:
        p = subprocess.Popen([BIN, *map(str, args)], env=env, stdout=sink, stderr=subprocess.STDOUT)
        killed = False
        while until is not None and p.poll() is None:
            if until():
                p.send_signal(signal.SIGKILL)
                killed = True
                break
            time.sleep(0.2)
        _, status, usage = os.wait4(p.pid, 0)
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0 and not killed:
        raise SystemExit(f"budgetthink {' '.join(map(str, args))} failed ({rc}); see {log}")
    return {"wall_s": round(time.perf_counter() - t, 2), "peak_rss_mib": round(usage.ru_maxrss / 1024),
            "killed": killed}


def has_checkpoint(out: Path):
    return lambda: any((p / "state.pt").exists() for p in (out / "checkpoints").glob("step_*"))


def train_with_a_kill(args: list, out: Path, env: dict, log: Path) -> dict:
    """Run, SIGKILL after the first checkpoint, resume; the steps logged, their median time, both peaks."""
    shutil.rmtree(out, ignore_errors=True)
    first = run(args, env, log, until=has_checkpoint(out))
    second = run([*args, "--resume"], env, log)
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    numbers = [s["step"] for s in steps]
    times = [s[k] for s in steps for k in ("step_s",) if k in s] or \
        [s["generate_s"] + s["train_s"] for s in steps if "train_s" in s]
    return {"killed_then_resumed": first["killed"], "steps_logged": numbers,
            "each_step_once": numbers == list(range(1, len(numbers) + 1)),
            "model_saved": (out / "model" / "config.json").exists(),
            "median_step_s": round(statistics.median(times), 2) if times else None,
            "wall_s": round(first["wall_s"] + second["wall_s"], 1),
            "peak_rss_mib": max(first["peak_rss_mib"], second["peak_rss_mib"])}


def serve_once(model: Path, env: dict, log: Path) -> dict:
    """Start the server, send one chat request with a thinking budget through the openai SDK, stop it."""
    import socket

    from openai import APIConnectionError, OpenAI

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = time.perf_counter()
    with open(log, "a") as sink:
        p = subprocess.Popen([BIN, "serve", "--model", str(model), "--port", str(port)], env=env, stdout=sink,
                             stderr=subprocess.STDOUT)
        try:
            client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
            while True:
                try:
                    client.models.list()
                    break
                except APIConnectionError:
                    if p.poll() is not None or time.perf_counter() - t > 300:
                        raise SystemExit(f"serve did not start; see {log}") from None
                    time.sleep(0.5)
            ready = time.perf_counter() - t
            t = time.perf_counter()
            r = client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=96, temperature=0,
                                               messages=[{"role": "user", "content": "What is 12 times 7?"}],
                                               extra_body={"max_thinking_tokens": 32})
            latency = time.perf_counter() - t
        finally:  # never leave the server running
            p.send_signal(signal.SIGTERM)
            _, _, usage = os.wait4(p.pid, 0)
    return {"startup_s": round(ready, 2), "request_s": round(latency, 2),
            "completion_tokens": r.usage.completion_tokens, "peak_rss_mib": round(usage.ru_maxrss / 1024)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-smollm2-commands")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS / "smollm2_commands.json")
    ap.add_argument("--fresh", action="store_true", help="rerun the commands already measured in --work")
    args = ap.parse_args()
    w = args.work
    w.mkdir(parents=True, exist_ok=True)
    log = w / "log.txt"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    model = w / "smollm2"
    done_file = w / "results.json"  # each command's figures as soon as it has run: a failure later loses none
    res = json.loads(done_file.read_text()) if done_file.exists() and not args.fresh else {}

    def measure(name: str, fn, *a):
        if name not in res:
            say(name)
            res[name] = fn(*a)
            done_file.write_text(json.dumps(res, indent=2) + "\n")
        return res[name]

    if not res:
        for old in ("eval", "model_traces.jsonl", "full", "LoRA", "rl"):
            shutil.rmtree(w / old, ignore_errors=True) if (w / old).is_dir() else (w / old).unlink(missing_ok=True)
    measure("models get", run, ["models", "get", "smollm2-135m", "--out", model], env, log)
    shutil.rmtree(w / "converted", ignore_errors=True)
    from budgetthink.models import gguf_path

    measure("convert (the GGUF to a model directory)", run, ["convert", gguf_path("smollm2-135m"), "--out",
                                                            w / "converted"], env, log)
    measure("generate", run, ["generate", "--model", model, "--task", "multiply", "--n", 8, "--max-tokens", 160,
                              "--max-thinking-tokens", 64, "digits=2", "split=test"], env, log)
    measure("eval", run, ["eval", "--model", model, "--task", "multiply", "--n", 32, "--budgets", "32,64",
                          "--max-answer-tokens", 16, "--out", w / "eval", "digits=2", "split=test"], env, log)
    traces = w / "traces.jsonl"
    if not traces.exists():
        run(["distill", "--task", "multiply", "--teacher", "solver", "--n", 64, "--out", traces, "digits=2",
             "split=train"], env, log)
    measure("distill (model teacher)", run, ["distill", "--task", "multiply", "--teacher", f"model:{model}", "--n", 8,
                                             "--out", w / "model_traces.jsonl", "digits=2", "split=train"], env, log)
    sft = ["--model", model, "--data", traces, "format=tinyzero", "epochs=1", "batch_size=4", "max_steps=8",
           "save_every=4", "log_every=1", "dtype=float32"]
    for name, out, extra in (("sft (full, fp32)", w / "full", []), ("sft (LoRA r=16, fp32)", w / "LoRA", ["lora.r=16"])):
        measure(name, train_with_a_kill, ["sft", "--out", out, *sft, *extra], out, env, log)
    out = w / "rl"
    measure("rl (GRPO, 4 prompts x 4, 128 tokens)", train_with_a_kill,
            ["rl", "--out", out, f"model={model}", "task=multiply", "task_options={digits: 2}", "max_steps=4",
             "save_every=2", "prompts_per_step=4", "n=4", "max_response_tokens=128", "eval_size=16", "eval_every=4",
             "eval_max_tokens=128", "train_size=64", "dtype=float32"], out, env, log)
    measure("serve", serve_once, model, env, log)

    import torch

    result = {"benchmark": "smollm2_commands", "command": "python benchmarks/bench_smollm2_commands.py " +
              " ".join(sys.argv[1:]), "model": "SmolLM2-135M-Instruct (134.5M parameters, vocabulary 49,152)",
              "machine": {"platform": platform.platform(), "cores": os.cpu_count(), "cpu_flags": cpu_flags(), "threads": args.threads,
                          "torch": torch.__version__, "load_average_at_end": os.getloadavg()},
              "work": shown(w), "commands": res}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for k, v in res.items():
        say(f"{k}: {v}")


if __name__ == "__main__":
    main()
