"""Where a fine-tuned tiny model's Countdown searches go wrong: arithmetic slips against miscomparisons.

    .venv/bin/python benchmarks/bench_sft_errors.py MODEL_DIR [MODEL_DIR ...] [--n 200] [--out FILE]

Greedy, unbudgeted, on the held-out problems bench_distill_tiny uses (test split, its seed). For each model:
accuracy, and over every step `a op b = v` the model writes in its thinking, the share where v is wrong (by
operation, small or large operands). Over every check in the search lines (`v<T`, `v>T`, `v==T`, or `v!=T`
in traces from before tiny RECIPE_VERSION 5; the last line's re-check of the chosen expression is not
counted): the share with a wrong verdict or a T that is not the target; of the checks whose value equals T,
the share called unequal (missed hits); of the others, the share called equal (false hits). For each wrong
answer, where the search first departs from the solver's trace for that problem (`departure`; the solver's
notation must be the one the model was trained on). Writes benchmarks/results/sft_errors.json.
"""

import argparse
import json
import re
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from paths import ROOT, shown

STEP = re.compile(r"(?<![\d)])(\d+)([+\-*/])(\d+)=(\d+)")
CHECK = re.compile(r"(\d+)(==|!=|<|>)(\d+)")  # `v<T`, `v>T`, `v==T`; `v!=T` before tiny RECIPE_VERSION 5

VALUE_SO_FAR = re.compile(r"\d+[+\-*/]\d+=\d*$")  # the text before a departure ends inside a step's value
TARGET_SO_FAR = re.compile(r"(==|!=|<|>)\d*$")  # ... or inside the target a check restates


def departure(gold: str, text: str) -> str:
    """Where a wrong search first leaves the solver's trace for the same problem (the tiny model imitates it
    character by character): at a check (missed or false hit), inside a step's value (arithmetic slip), in the
    target it restates, by stopping early, or elsewhere (another order of attempts, a "Wait", ...)."""
    i = next((k for k, (g, t) in enumerate(zip(gold, text)) if g != t), min(len(gold), len(text)))
    if i == len(gold) == len(text):
        return "answer only"
    if i == len(text):
        return "stopped early"
    said, truth = text[i:i + 2], gold[i:i + 2]
    if truth == "==" and said[:1] in "!<>":
        return "missed hit"
    if truth[:1] in "!<>" and said == "==":
        return "false hit"
    if truth[:1] in "<>" and said[:1] in "<>":
        return "wrong order"
    if TARGET_SO_FAR.search(gold[:i]):
        return "target"
    if VALUE_SO_FAR.search(gold[:i]):
        return "arithmetic slip"
    return "other"


def anatomy(problems, outs, task) -> dict:
    from budgetthink.tasks.countdown import relation

    steps, slips, checks, wrong_verdict, wrong_target = {}, {}, 0, 0, 0
    hits, missed, unequal, false_hits = 0, 0, 0, 0
    correct = [task.score(p, o.text).correct for p, o in zip(problems, outs)]
    departures = Counter(departure(task.solve(p).thinking, o.thinking)
                         for p, o, ok in zip(problems, outs, correct) if not ok)
    for p, o in zip(problems, outs):
        for a, op, b, v in STEP.findall(o.thinking):
            a, b, v = int(a), int(b), int(v)
            true = {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else None}[op]
            key = f"{op} {'large' if max(a, b) >= 20 or (true or 0) >= 100 else 'small'}"
            steps[key] = steps.get(key, 0) + 1
            slips[key] = slips.get(key, 0) + (true != v)
        search = "\n".join(line for line in o.thinking.split("\n") if "(" not in line)  # not the last re-check
        for v, verdict, t in CHECK.findall(search):
            checks += 1
            v, t = int(v), int(t)
            truth = relation(v, t)
            wrong_verdict += verdict != truth and not (verdict == "!=" and truth != "==")
            wrong_target += t != p.answer["target"]
            if truth == "==":
                hits, missed = hits + 1, missed + (verdict != "==")
            else:
                unequal, false_hits = unequal + 1, false_hits + (verdict == "==")
    return {"accuracy": sum(correct) / len(problems),
            "finish_reasons": {r: sum(o.finish_reason == r for o in outs) for r in {o.finish_reason for o in outs}},
            "steps": sum(steps.values()), "arithmetic_slip_rate": sum(slips.values()) / max(1, sum(steps.values())),
            "slip_rate_by_step": {k: round(slips[k] / steps[k], 3) for k in sorted(steps)},
            "checks": checks, "wrong_verdict_rate": wrong_verdict / max(1, checks),
            "wrong_target_rate": wrong_target / max(1, checks),
            "missed_hit_rate": missed / max(1, hits), "false_hit_rate": false_hits / max(1, unequal),
            "failures_by_departure": dict(departures.most_common())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=900)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "sft_errors.json")
    args = ap.parse_args()
    from bench_distill_tiny import EVAL_SEED, TASK_OPTIONS

    from budgetthink.engine import Sampling
    from budgetthink.engine.torch import TorchEngine
    from budgetthink.formats import get_format
    from budgetthink.jsonl import atomic_write_json
    from budgetthink.tasks import get_task

    task = get_task("countdown", split="test", **TASK_OPTIONS)
    problems = task.generate(args.n, seed=EVAL_SEED)
    fmt = get_format("tinyzero")
    report = {"settings": {"problems": args.n, "eval_seed": EVAL_SEED, "greedy": True, "max_tokens": args.max_tokens,
                           "torch_threads": torch.get_num_threads()}, "models": {}}
    for model in args.models:
        t = time.perf_counter()
        outs = TorchEngine(str(model), device="cpu").generate(
            [fmt.prompt(p.prompt) for p in problems], Sampling(temperature=0, max_tokens=args.max_tokens), fmt=fmt)
        name = shown(model)
        report["models"][name] = {**anatomy(problems, outs, task), "wall_s": round(time.perf_counter() - t, 1)}
        print(name, json.dumps(report["models"][name]), file=sys.stderr)
    report["command"] = "python benchmarks/bench_sft_errors.py " + " ".join(sys.argv[1:])
    atomic_write_json(args.out, report)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
