"""The two RL routes on the tiny model, measured on 1,000 held-out problems; adds `summary.routes` (r1, r1-zero)
to benchmarks/results/bench_rl_tiny.json and draws bench_rl_routes.png.

    python benchmarks/bench_rl_routes.py [--work runs/bench-rl-routes] [--seeds 0,1] [--threads 1]

- r1 (cold start, then RL): solver traces (train split) -> 1,000 curated -> SFT (recipes/tiny-s1-sft.yaml) ->
  GRPO with recipes/tiny-countdown-r1.yaml for 10 minutes of training per seed. The control: the same SFT
  continued for about the same minutes (`--control-steps` optimizer steps), evaluated the same way.
- r1-converged: the same, from the control (the SFT continued until its training loss is near 0), with its own
  control (that model trained for `--control-steps` more).
- r1-zero: the same GRPO recipe straight from the `small` base for 15 minutes per seed.
Every start is measured the same way: greedy accuracy at the full context on the held-out set, and mean@8 /
pass@8 at the rollout temperature on its first 200 problems (how much a policy that samples could sharpen).
A stage whose output exists in --work is reused (delete it to rerun). `--threads` torch threads per process:
1 keeps a run steady on a machine shared with other work (set it to the core count on an idle machine).
"""

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from paths import ROOT, shown

sys.path.insert(0, str(ROOT / "src"))

from budgetthink.jsonl import atomic_write_json, read_jsonl, write_jsonl

RESULTS = ROOT / "benchmarks" / "results"
K = 8


def say(msg: str) -> None:
    print(f"[routes] {msg}", file=sys.stderr, flush=True)


def measure(model: Path, held: list, temperature: float, n_sampled: int = 200) -> dict:
    """Greedy accuracy at the full context, and mean@K / pass@K at `temperature` on the first problems."""
    import numpy as np

    from budgetthink.engine import Sampling, load_engine
    from budgetthink.formats import get_format
    from budgetthink.tasks import get_task

    task = get_task("countdown", split="test", template="compact", format_reward=0.0)
    fmt = get_format("tinyzero")
    engine = load_engine(str(model), device="cpu")
    prompts = [fmt.prompt(p.prompt) for p in held]
    cap = engine.context - max(len(engine.tokenizer.encode(x)) for x in prompts) - 16
    outs = engine.generate(prompts, Sampling(temperature=0.0, max_tokens=cap), fmt=fmt)
    greedy = [task.score(p, o.text).correct for p, o in zip(held, outs)]
    sub = held[:n_sampled]
    outs = engine.generate(prompts[:n_sampled], Sampling(temperature=temperature, max_tokens=cap, seed=1), n=K, fmt=fmt)
    c = np.array([task.score(sub[i // K], o.text).correct for i, o in enumerate(outs)], float).reshape(-1, K)
    return {"greedy": float(np.mean(greedy)), "greedy_len": float(np.mean([len(o.token_ids) for o in outs])),
            f"pass@1_T{temperature}": float(c.mean()), f"pass@{K}_T{temperature}": float(c.max(1).mean()),
            "sampled_problems": len(sub)}


def rl_run(recipe: Path, model: Path, held_file: Path, out: Path, seed: int, minutes: float, overrides: list) -> dict:
    from budgetthink.config import load_config
    from budgetthink.train import rl

    if not (out / "model").exists():
        cfg = load_config(rl.RLConfig, recipe, [f"model={model}", f"eval_file={held_file}", f"seed={seed}",
                                                f"max_minutes={minutes}", *overrides])
        rl.train(cfg, out, resume=rl.latest_checkpoint(out) is not None)
    evals = read_jsonl(out / "eval.jsonl")
    steps = read_jsonl(out / "metrics.jsonl")
    return {"start_accuracy": evals[0]["accuracy"], "final_accuracy": evals[-1]["accuracy"],
            "best_accuracy": max(e["accuracy"] for e in evals), "steps": len(steps),
            "training_minutes": sum(r["generate_s"] + r["train_s"] for r in steps) / 60,
            "curve": [{"step": e["step"], "accuracy": e["accuracy"], "response_len_mean": e["response_len_mean"]}
                      for e in evals],
            "train_accuracy": [r["accuracy"] for r in steps]}


def route_summary(runs: dict, start: dict, minutes: float, eval_n: int) -> dict:
    gains = [100 * (r["final_accuracy"] - r["start_accuracy"]) for r in runs.values()]
    return {"start_accuracy": start["greedy"], "start_passk": start,
            "final_accuracy": [r["final_accuracy"] for r in runs.values()], "gain_points": gains,
            "minutes": [round(r["training_minutes"], 2) for r in runs.values()], "minutes_budget": minutes,
            "eval_problems": eval_n, "seeds": [int(s) for s in runs], "target_gain_points": 10,
            "target_met": all(g >= 10 for g in gains)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-rl-routes")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--eval-n", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--control-steps", type=int, default=480, help="SFT control: optimizer steps (~10 min here)")
    ap.add_argument("--routes", default="r1,r1-converged,r1-zero")
    ap.add_argument("--overrides", default="", help="comma-separated RL overrides for both routes")
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    from budgetthink import tiny
    from budgetthink.config import load_config
    from budgetthink.data.curate import curate
    from budgetthink.data.distill import distill
    from budgetthink.tasks import Problem, get_task
    from budgetthink.train import sft
    from budgetthink.train.rl import RLConfig

    w = args.work
    w.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    overrides = [x for x in args.overrides.split(",") if x]
    wanted = args.routes.split(",")
    recipe = ROOT / "recipes" / "tiny-countdown-r1.yaml"
    base = tiny.cached_build("small", ROOT / ".cache" / "tiny", progress=True)
    held_file = w / "held.jsonl"
    if not held_file.exists():
        held = get_task("countdown", split="test", **tiny.COUNTDOWN).generate(args.eval_n, seed=0)
        write_jsonl(held_file, [p.to_dict() for p in held])
    held = [Problem.from_dict(r) for r in read_jsonl(held_file)]
    temperature = load_config(RLConfig, recipe, [f"model={base}"]).temperature
    starts = json.loads((w / "starts.json").read_text()) if (w / "starts.json").exists() else {}

    def start_of(name: str, model: Path) -> dict:
        if name not in starts:
            say(f"measuring {name}")
            starts[name] = {"model": shown(model), **measure(model, held, temperature)}
            atomic_write_json(w / "starts.json", starts)
        return starts[name]

    routes = {}
    if "r1" in wanted:
        traces, selected, sft_dir = w / "traces.jsonl", w / "selected.jsonl", w / "sft10"
        if not traces.exists():
            distill("countdown", "solver", 4000, traces, seed=0, task_options={"template": "compact", "split": "train"})
        if not selected.exists():
            curate(traces, 1000, selected, seed=0, prefer_long=False)
        if not (sft_dir / "model").exists():
            sft.train(load_config(sft.SFTConfig, ROOT / "recipes" / "tiny-s1-sft.yaml",
                                  [f"model={base}", f"data={selected}"]), sft_dir)
        start = start_of("sft", sft_dir / "model")
        control_dir = w / "sft_control"
        if not (control_dir / "model").exists():
            t = time.perf_counter()
            sft.train(load_config(sft.SFTConfig, ROOT / "recipes" / "tiny-s1-sft.yaml",
                                  [f"model={sft_dir / 'model'}", f"data={selected}", "epochs=100",
                                   f"max_steps={args.control_steps}"]), control_dir)
            atomic_write_json(control_dir / "wall.json", {"wall_s": time.perf_counter() - t})
        control = start_of("sft_control", control_dir / "model")
        runs = {str(s): rl_run(recipe, sft_dir / "model", held_file, w / f"r1_s{s}", s, 10, overrides) for s in seeds}
        routes["r1"] = route_summary(runs, start, 10, len(held)) | {
            "sft_control_accuracy": control["greedy"], "sft_control_steps": args.control_steps,
            "sft_control_minutes": json.loads((control_dir / "wall.json").read_text())["wall_s"] / 60
            if (control_dir / "wall.json").exists() else None,
            "above_sft_control": [r["final_accuracy"] > control["greedy"] for r in runs.values()], "runs": runs}
    if "r1-converged" in wanted:  # R1 again, from the control (SFT run to a training loss near 0)
        start, sel = start_of("sft_control", w / "sft_control" / "model"), w / "selected.jsonl"
        control_dir = w / "sft_control2"
        if not (control_dir / "model").exists():
            sft.train(load_config(sft.SFTConfig, ROOT / "recipes" / "tiny-s1-sft.yaml",
                                  [f"model={w / 'sft_control' / 'model'}", f"data={sel}", "epochs=100",
                                   f"max_steps={args.control_steps}"]), control_dir)
        control = start_of("sft_control2", control_dir / "model")
        runs = {str(s): rl_run(recipe, w / "sft_control" / "model", held_file, w / f"r1c_s{s}", s, 10, overrides)
                for s in seeds}
        routes["r1-converged"] = route_summary(runs, start, 10, len(held)) | {
            "sft_control_accuracy": control["greedy"], "sft_control_steps": args.control_steps,
            "above_sft_control": [r["final_accuracy"] > control["greedy"] for r in runs.values()], "runs": runs}
    if "r1-zero" in wanted:
        start = start_of("base", base)
        runs = {str(s): rl_run(recipe, base, held_file, w / f"zero_s{s}", s, 15, ["max_refills=4", *overrides])
                for s in seeds}
        routes["r1-zero"] = route_summary(runs, start, 15, len(held)) | {"runs": runs}

    path = RESULTS / "bench_rl_tiny.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    summary = result.get("summary") or {}
    command = "python benchmarks/bench_rl_routes.py " + " ".join(sys.argv[1:])
    summary["routes"] = {**summary.get("routes", {}), **{k: {**r, "command": command} for k, r in routes.items()}}
    summary.pop("routes_command", None)
    summary["routes_machine"] = {"platform": platform.platform(), "cores": os.cpu_count(), "threads": args.threads,
                                 "load_average_at_end": os.getloadavg()}
    result["summary"] = summary
    atomic_write_json(path, result)
    plot(summary["routes"], RESULTS / "bench_rl_routes.png")
    for name, r in routes.items():
        say(f"{name}: start {r['start_accuracy']:.3f} -> {r['final_accuracy']} (gain {r['gain_points']} points)")


def plot(routes: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(routes), figsize=(5 * len(routes), 3.6), squeeze=False)
    for ax, (name, r) in zip(axes[0], routes.items()):
        for seed, run in r["runs"].items():
            ax.plot([p["step"] for p in run["curve"]], [100 * p["accuracy"] for p in run["curve"]], marker="o",
                    label=f"GRPO seed {seed}")
        if "sft_control_accuracy" in r:
            ax.axhline(100 * r["sft_control_accuracy"], color="gray", ls="--", label="SFT control (same minutes)")
        ax.axhline(100 * r["start_accuracy"] + 10, color="green", ls=":", label="start + 10 points")
        ax.set_title(f"{name}: greedy accuracy, {r['eval_problems']} held-out")
        ax.set_xlabel("RL step")
        ax.set_ylabel("%")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
