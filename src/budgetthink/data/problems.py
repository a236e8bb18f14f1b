"""Problem files: `budgetthink data generate` and `budgetthink data score`.

    budgetthink data generate --task countdown --n 1000 --seed 0 --out train.jsonl num_numbers=3-4
    budgetthink data score --task countdown --in completions.jsonl --out scored.jsonl [--skip-bad]

`generate` writes one Problem dict per line (`{"id","task","prompt","answer","meta"}`), atomically.
`score` reads lines holding a problem's fields plus `completion`, scores each with the task, writes the lines
with `reward`, `correct`, `formatted` and `extracted` added, and returns the summary (mean reward, accuracy,
format rate) that the CLI prints as one JSON object. A malformed line is an error naming file and line;
with `skip_bad` such lines (and lines lacking fields) are skipped and counted.
"""

import sys
from pathlib import Path

import yaml
from tqdm import tqdm

from budgetthink.errors import UserError
from budgetthink.jsonl import fresh_output, read_jsonl, write_jsonl
from budgetthink.tasks import Problem, get_task


def parse_options(pairs: list[str]) -> dict:
    """Task options from `key=value` strings; values are read as YAML (3 -> int, [3, 4] -> list, x -> str)."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"task option {pair!r} is not key=value; write e.g. num_numbers=4")
        try:
            options[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            options[key.strip()] = value
    return options


def generate(task: str, n: int, seed: int, out: str | Path, options: dict | None = None, force: bool = False) -> dict:
    """Write n problems of `task` (built with `options`) to `out` as JSONL; returns a summary."""
    if n < 1:
        raise UserError(f"--n must be at least 1, got {n}")
    fresh_output(out, force)
    problems = get_task(task, **(options or {})).generate(n, seed)
    write_jsonl(out, (p.to_dict() for p in problems))
    return {"task": task, "n": len(problems), "seed": seed, "out": str(out)}


def score(task: str, inp: str | Path, out: str | Path | None = None, skip_bad: bool = False,
          options: dict | None = None, force: bool = False) -> dict:
    """Score the completions in `inp` with `task`; write scored lines to `out` (if given); return the summary."""
    if out is not None:
        fresh_output(out, force, inputs=[inp])
    scorer = get_task(task, **(options or {}))
    stats: dict = {}
    records = read_jsonl(inp, skip_bad=skip_bad, stats=stats)
    scored, bad = [], stats.get("bad", 0)
    for i, record in enumerate(tqdm(records, desc="scoring", file=sys.stderr, disable=len(records) < 200), 1):
        problem_task = record.get("task", task)
        missing = [k for k in ("id", "prompt", "answer", "completion") if k not in record]
        if missing or problem_task != task or not isinstance(record.get("completion"), str):
            if skip_bad:
                bad += 1
                continue
            why = (f"lacks {', '.join(missing)}" if missing else
                   f"is a {problem_task!r} problem, not {task!r}" if problem_task != task else
                   "has a completion that is not a string")
            raise UserError(f"{inp}: record {i} {why}; each line needs the problem's fields plus completion "
                            "(or pass --skip-bad)")
        problem = Problem.from_dict({**record, "task": task})
        s = scorer.score(problem, record["completion"])
        scored.append({**record, "reward": s.reward, "correct": s.correct, "formatted": s.formatted,
                       "extracted": s.extracted, **({"reason": s.reason} if s.reason else {})})
    if not scored:
        raise UserError(f"{inp}: no scorable records" + (f" ({bad} bad lines skipped)" if bad else ""))
    if out is not None:
        write_jsonl(out, scored)
    n = len(scored)
    return {
        "task": task,
        "n": n,
        "mean_reward": sum(r["reward"] for r in scored) / n,
        "accuracy": sum(r["correct"] for r in scored) / n,
        "format_rate": sum(r["formatted"] for r in scored) / n,
        "skipped": bad,
        "timeouts": sum(r.get("reason") == "timeout" for r in scored),  # checks that ran past the time limit
    }
