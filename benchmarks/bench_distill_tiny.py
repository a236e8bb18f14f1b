"""The tiny distil-then-force pipeline, measured: s1's recipe on the `small` tiny model, on this CPU.

    .venv/bin/python benchmarks/bench_distill_tiny.py [--work runs/bench-distill-tiny] [--eval-n 200] [sft overrides]

1. base:    the `small` tiny model (tiny.cached_build; built and pretrained here if not cached)
2. distill: the Countdown solver's traces for `--pool` training-split problems
3. curate:  1,000 of them, s1-style (quality, correct answers, diversity over solution shapes) with
            budgetthink.data.curate, drawn uniformly within each solution shape (`prefer_long=False`): s1's
            preference for long traces selects late hits here, and cost 8 points at 30 epochs (see curate.py)
4. sft:     budgetthink sft with recipes/tiny-s1-sft.yaml (extra key=value overrides from the command line)
5. eval:    greedy accuracy on `--eval-n` held-out problems (test split, a seed no training stage uses),
            for the base and the fine-tuned model, unbudgeted and under budget forcing at each maximum
            thinking budget (Budget(max_thinking_tokens=B) through the torch engine)

Targets (issue 7): fine-tuned accuracy at least 30 points above the base's; accuracy rises with the
thinking budget (s1's Scaling, the mean pairwise slope, is positive). Writes
benchmarks/results/distill_tiny.json and distill_tiny.png; the work directory keeps every stage's output and
a rerun reuses what is there (delete it to start over).
"""

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from paths import ROOT, shown

RESULTS = ROOT / "benchmarks" / "results"
TASK_OPTIONS = {"template": "compact"}  # the tiny model's Countdown distribution (tiny.COUNTDOWN)
EVAL_SEED = 2_000_003  # held-out problems: test split, a seed no stage here or in the tiny build uses


def say(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def evaluate_model(model_dir: Path, problems, budgets: list[int], max_answer_tokens: int) -> dict:
    """Greedy accuracy unbudgeted and at each maximum thinking budget (s1's budget forcing)."""
    from budgetthink.engine import Budget, Sampling, load_engine
    from budgetthink.evaluate import scaling, within_bounds
    from budgetthink.formats import get_format
    from budgetthink.tasks import get_task

    fmt = get_format("tinyzero")
    task = get_task("countdown", split="test", **TASK_OPTIONS)
    engine = load_engine(str(model_dir), device="cpu")
    prompts = [fmt.prompt(p.prompt) for p in problems]
    context = engine.context - max(len(engine.tokenizer.encode(x)) for x in prompts) - 1
    rows = []
    for B in [None, *budgets]:
        t0 = time.perf_counter()
        if B is None:
            outs = engine.generate(prompts, Sampling(temperature=0.0, max_tokens=context), fmt=fmt)
        else:
            outs = engine.generate(prompts, Sampling(temperature=0.0, max_tokens=B + 16 + max_answer_tokens),
                                   budget=Budget(max_thinking_tokens=B, max_answer_tokens=max_answer_tokens), fmt=fmt)
        scores = [task.score(p, o.text) for p, o in zip(problems, outs)]
        n = len(problems)
        row = {"budget": B, "accuracy": 100 * sum(s.correct for s in scores) / n,
               "format_rate": 100 * sum(s.formatted for s in scores) / n,
               "mean_thinking_tokens": sum(o.thinking_tokens for o in outs) / n,
               "forced_share": sum(o.finish_reason == "forced" for o in outs) / n,
               "control": (sum(within_bounds(o.thinking_tokens, max_tokens=B) for o in outs) / n) if B else None,
               "seconds": round(time.perf_counter() - t0, 1),
               "example": outs[0].text}
        rows.append(row)
        say(f"  {model_dir.name} budget {B}: accuracy {row['accuracy']:.1f}%, "
            f"thinking {row['mean_thinking_tokens']:.0f} tokens, {row['seconds']} s")
    forced = [r for r in rows if r["budget"] is not None]
    slope = scaling([r["mean_thinking_tokens"] for r in forced], [r["accuracy"] for r in forced])
    return {"unbudgeted": rows[0], "budgets": forced,
            "scaling_pp_per_1k_tokens": None if slope is None else 1000 * slope,
            "performance": max(r["accuracy"] for r in forced),
            "control": sum(r["control"] for r in forced) / len(forced)}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, style in (("base", "o--"), ("sft", "o-")):
        ev = result[name]
        xs = [r["mean_thinking_tokens"] for r in ev["budgets"]]
        ys = [r["accuracy"] for r in ev["budgets"]]
        line, = ax.plot(xs, ys, style, label=f"{name}: budget forcing (max B)")
        for r in ev["budgets"]:
            ax.annotate(str(r["budget"]), (r["mean_thinking_tokens"], r["accuracy"]), fontsize=7,
                        textcoords="offset points", xytext=(3, -9))
        ax.axhline(ev["unbudgeted"]["accuracy"], color=line.get_color(), lw=0.8, ls=":",
                   label=f"{name}: unbudgeted ({ev['unbudgeted']['accuracy']:.1f}%)")
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 100)
    ax.set_xlabel("mean thinking tokens per problem (labels: maximum budget B)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title(f"tiny s1: {result['settings']['curate_n']} curated solver traces -> SFT -> budget forcing")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-distill-tiny")
    ap.add_argument("--pool", type=int, default=4000, help="solver traces distilled before curation")
    ap.add_argument("--curate-n", type=int, default=1000)
    ap.add_argument("--eval-n", type=int, default=200)
    ap.add_argument("--budgets", default="16,32,64,128,256,512")
    ap.add_argument("--max-answer-tokens", type=int, default=32)
    ap.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "tiny-s1-sft.yaml")
    ap.add_argument("--base", type=Path, default=None, help="base model directory (default: cached `small` build)")
    ap.add_argument("--name", default="distill_tiny", help="results file name")
    ap.add_argument("overrides", nargs="*", help="SFT recipe overrides key=value")
    args = ap.parse_args()
    budgets = [int(b) for b in args.budgets.split(",")]

    from budgetthink import tiny
    from budgetthink.config import load_config
    from budgetthink.data.curate import curate
    from budgetthink.data.distill import distill
    from budgetthink.tasks import get_task
    from budgetthink.train import sft

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()

    say("1. base model")
    base = args.base or tiny.cached_build("small", ROOT / ".cache" / "tiny", progress=True)
    report = json.loads((Path(base) / "build_report.json").read_text()) if (Path(base) / "build_report.json").exists() else {}

    say("2. distil solver traces")
    traces = work / "traces.jsonl"
    distill_summary = distill("countdown", "solver", args.pool, traces, seed=1, fmt="tinyzero",
                              task_options={**TASK_OPTIONS, "split": "train"})

    say("3. curate")
    selected = work / "selected.jsonl"
    if not selected.exists():
        funnel = curate(traces, args.curate_n, selected, seed=0, require_correct=True, prefer_long=False,
                        fmt="tinyzero", task_options={"countdown": TASK_OPTIONS})
    else:
        funnel = json.loads((work / "funnel.json").read_text())

    say("4. sft")
    cfg = load_config(sft.SFTConfig, args.recipe, args.overrides, defaults={"model": str(base), "data": str(selected)})
    sft_dir = work / "sft"
    if (sft_dir / "summary.json").exists() and (sft_dir / "model" / "config.json").exists():
        sft_summary = json.loads((sft_dir / "summary.json").read_text())
    else:
        sft_summary = sft.train(cfg, sft_dir, resume=sft.latest_checkpoint(sft_dir) is not None)
    records = [json.loads(x) for x in (sft_dir / "metrics.jsonl").read_text().splitlines()]

    say("5. evaluate (held-out, greedy)")
    problems = get_task("countdown", split="test", **TASK_OPTIONS).generate(args.eval_n, seed=EVAL_SEED)
    train_prompts = {json.loads(x)["problem"]["prompt"] for x in selected.read_text().splitlines()}
    assert not train_prompts & {p.prompt for p in problems}, "held-out problems leaked into training"
    ev_base = evaluate_model(Path(base), problems, budgets, args.max_answer_tokens)
    ev_sft = evaluate_model(sft_dir / "model", problems, budgets, args.max_answer_tokens)

    gain = ev_sft["unbudgeted"]["accuracy"] - ev_base["unbudgeted"]["accuracy"]
    result = {
        "benchmark": "distill_tiny",
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cores": os.cpu_count(),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads()},
        "settings": {"pool": args.pool, "curate_n": args.curate_n, "eval_n": args.eval_n, "eval_seed": EVAL_SEED,
                     "budgets": budgets, "max_answer_tokens": args.max_answer_tokens, "task_options": TASK_OPTIONS,
                     "sft_config": {**cfg.model_dump(mode="json"), "model": shown(cfg.model), "data": shown(cfg.data)},
                     "base": shown(base),
                     "base_parameters": report.get("parameters")},
        "distill": distill_summary,
        "funnel": funnel,
        "sft_training": {**sft_summary, "train_s": sum(r["step_s"] for r in records),
                         "tokens_per_s": sum(r["tokens"] for r in records) / sum(r["step_s"] for r in records),
                         "first_loss": records[0]["loss"], "last_loss": records[-1]["loss"]},
        "base": ev_base,
        "sft": ev_sft,
        "targets": {"gain_points": gain, "gain_min": 30, "gain_met": gain >= 30,
                    "scaling_pp_per_1k_tokens": ev_sft["scaling_pp_per_1k_tokens"],
                    "scaling_met": (ev_sft["scaling_pp_per_1k_tokens"] or 0) > 0},
        "wall_s": round(time.perf_counter() - t_all, 1),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    result["command"] = "python benchmarks/bench_distill_tiny.py " + " ".join(sys.argv[1:])
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, RESULTS / f"{args.name}.png")
    say(f"base {ev_base['unbudgeted']['accuracy']:.1f}% -> sft {ev_sft['unbudgeted']['accuracy']:.1f}% "
        f"(+{gain:.1f} points; target +30: {'met' if gain >= 30 else 'NOT met'}); sft scaling "
        f"{ev_sft['scaling_pp_per_1k_tokens']:.1f} pp per 1k thinking tokens "
        f"({'positive' if result['targets']['scaling_met'] else 'NOT positive'})")
    print(json.dumps(result["targets"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
