"""The tiny RL recipes, measured: greedy held-out Countdown accuracy over wall time, GRPO and PPO from the
same `small` tiny base under the same wall-time budget; writes benchmarks/results/bench_rl_tiny.{json,png}.

    python benchmarks/bench_rl_tiny.py [--base DIR] [--minutes 10] [--algos grpo,ppo] [key=value ...]

The base is `tiny.cached_build("small")` unless --base is given (built and pretrained here if not cached).
Each algorithm runs its recipe (recipes/tiny-countdown-{algo}.yaml) with `max_minutes` set to the budget;
extra key=value overrides apply to every run. Runs of algorithms not in --algos are kept from an
earlier JSON of the same base and budget. Target (issue): greedy held-out accuracy rises by at least 15
points absolute, or doubles, whichever is more, within 10 minutes on a 2-core machine.
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from paths import ROOT, shown

sys.path.insert(0, str(ROOT / "src"))

from budgetthink.config import load_config
from budgetthink.jsonl import atomic_write_json, read_jsonl
from budgetthink.train import rl


def curve(out: Path) -> list[dict]:
    """(step, seconds since the start, eval accuracy and reward) for every evaluation of a run."""
    elapsed, t = {0: 0.0}, 0.0
    for r in read_jsonl(out / "metrics.jsonl"):
        t += r["step_s"]
        elapsed[r["step"]] = t
    return [{"step": e["step"], "elapsed_s": elapsed.get(e["step"]), "accuracy": e["accuracy"], "reward": e["reward"],
             "format_rate": e["format_rate"], "response_len_mean": e["response_len_mean"]}
            for e in read_jsonl(out / "eval.jsonl")]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, default=None, help="base model directory (default: cached `small` build)")
    ap.add_argument("--minutes", type=float, default=10.0, help="wall-time budget per algorithm")
    ap.add_argument("--algos", default="grpo,ppo")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_rl_tiny.json")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.base is None:
        from budgetthink import tiny

        args.base = tiny.cached_build("small", ROOT / ".cache" / "tiny", progress=True)

    base = shown(args.base)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for algo in args.algos.split(","):
            recipe = ROOT / "recipes" / f"tiny-countdown-{algo}.yaml"
            cfg = load_config(rl.RLConfig, recipe, [f"model={args.base}", f"max_minutes={args.minutes}",
                                                    *args.overrides])
            t = time.perf_counter()
            records = rl.train(cfg, Path(tmp) / algo)
            points = curve(Path(tmp) / algo)
            start, final = points[0]["accuracy"], points[-1]["accuracy"]
            target = max(start + 0.15, 2 * start)
            runs[algo] = {"recipe": str(recipe.relative_to(ROOT)), "config": cfg.model_dump(mode="json") | {"model": base},
                          "wall_s": time.perf_counter() - t, "steps": len(records),
                          "median_step_s": sorted(r["step_s"] for r in records)[len(records) // 2],
                          "curve": points, "start_accuracy": start, "final_accuracy": final,
                          "best_accuracy": max(p["accuracy"] for p in points), "target_accuracy": target,
                          "target_met": final >= target,
                          "train_reward": [r["reward_mean"] for r in records]}
            print(f"{algo}: {len(records)} steps in {runs[algo]['wall_s']:.0f} s; held-out accuracy "
                  f"{start:.3f} -> {final:.3f} (best {runs[algo]['best_accuracy']:.3f}; target {target:.3f}: "
                  f"{'met' if final >= target else 'not met'})")

    if args.out.exists():  # runs of other algorithms from the same base and budget stay (--algos runs a subset)
        before = json.loads(args.out.read_text())
        if before.get("base") == base and before.get("minutes") == args.minutes:
            runs = {**before["runs"], **runs}
    result = {"machine": {"platform": platform.platform(), "processor": platform.processor(), "cores": os.cpu_count(),
                          "load_average_at_end": os.getloadavg()},
              "base": base, "minutes": args.minutes, "runs": runs}
    atomic_write_json(args.out, result)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for algo, run in runs.items():
        ax.plot([p["elapsed_s"] / 60 for p in run["curve"]], [p["accuracy"] for p in run["curve"]], marker="o",
                label=f"{algo} ({run['steps']} steps)")
    ax.set_xlabel("wall time (minutes)")
    ax.set_ylabel("greedy held-out accuracy")
    ax.set_title("RL on Countdown from the small tiny base (CPU)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=100)
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
