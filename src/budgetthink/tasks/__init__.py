"""Verifiable problem sources: a Task generates problems, scores completions and (where it can) solves them.

    task = get_task("countdown", num_numbers=3)
    problems = task.generate(100, seed=0)          # list[Problem], deterministic per seed
    score = task.score(problems[0], completion)     # Score(reward, correct, formatted, extracted, reason)
    trace = task.solve(problems[0])                 # Trace(thinking, answer): the programmatic teacher

A Problem round-trips through `{"id", "task", "prompt", "answer", "meta"}`.
"""

import re
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from budgetthink.errors import UserError


@dataclass
class Problem:
    id: str
    task: str
    prompt: str  # the full prompt text for a base model, *without* the format's opening think delimiter
    answer: Any  # ground truth; countdown: {"target": int, "numbers": [int, ...]} as in TinyZero
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Problem":
        missing = [k for k in ("id", "task", "prompt", "answer") if k not in d]
        if missing:
            raise UserError(f"problem record lacks field(s) {', '.join(missing)}; "
                            "each line needs id, task, prompt, answer (and optional meta)")
        return cls(id=str(d["id"]), task=d["task"], prompt=d["prompt"], answer=d["answer"], meta=d.get("meta") or {})


@dataclass
class Score:
    reward: float
    correct: bool
    formatted: bool  # an answer was found in the expected format
    extracted: str | None  # the answer text that was scored
    reason: str | None = None  # why the score is not the verdict on the answer: "timeout" (the check ran past its limit)


@dataclass
class Trace:
    thinking: str  # the reasoning, without delimiters
    answer: str  # the final answer text as the model should write it after thinking (e.g. "<answer>1+2</answer>")


# --- helpers every task's scorer uses ---------------------------------------------------------------
def last_answer(text: str) -> str | None:
    """Inner text of the last `<answer>...</answer>`, matched as TinyZero's non-greedy regex would
    (leftmost tag, first closing tag after it, repeated), in linear time; None if there is none."""
    found, pos = None, 0
    while True:
        start = text.find("<answer>", pos)
        if start < 0:
            return found
        end = text.find("</answer>", start + 8)
        if end < 0:
            return found
        found, pos = text[start + 8:end], end + 9


def parse_range(value, name: str) -> tuple[int, int]:
    """(lo, hi) from an int, a 2-sequence, or a string "lo-hi" / "lo,hi" / "n"."""
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+)\s*(?:[-,]\s*(\d+)\s*)?", value)
        if not m:
            raise UserError(f"{name}: cannot read {value!r} as a number or range; write e.g. {name}=3 or {name}=3-4")
        value = (int(m[1]), int(m[2] or m[1]))
    if isinstance(value, bool):
        raise UserError(f"{name}: expected an integer or a range like [3, 4], got {value!r}")
    if isinstance(value, int):
        return value, value
    try:
        lo, hi = (int(v) for v in value)
    except (TypeError, ValueError):
        raise UserError(f"{name}: expected an integer or a range like [3, 4], got {value!r}") from None
    if lo > hi:
        raise UserError(f"{name}: range {lo}..{hi} is empty; write the smaller bound first")
    return lo, hi


class Task(Protocol):
    name: str

    def generate(self, n: int, seed: int) -> list[Problem]: ...

    def score(self, problem: Problem, completion: str) -> Score: ...

    def solve(self, problem: Problem) -> Trace | None: ...


SPLITS = ("all", "pretrain", "train", "test")


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; use one of: {', '.join(SPLITS)}")
    return split


def split_of(key) -> str:
    """The split a generated problem (identified by `key`) belongs to, by a stable hash: one in ten is `test`
    (held out), half is `pretrain` (reserved for building the tiny base), the rest is `train` (for RL, SFT
    and distillation). So held-out problems never appear in training data, and RL and SFT never train on
    problems the base saw in pretraining, whatever the seeds."""
    bucket = zlib.crc32(repr(key).encode()) % 10
    return "test" if bucket == 0 else "pretrain" if bucket <= 5 else "train"


def in_split(key, split: str) -> bool:
    """Whether a generated problem belongs to `split` (`all`: every split)."""
    return split == "all" or split_of(key) == split


TASKS = ("countdown", "multiply", "math")


def get_task(name: str, **options) -> Task:
    """The task called `name`, built with its options (unknown options are a UserError)."""
    if name == "countdown":
        from budgetthink.tasks.countdown import Countdown as cls
    elif name == "multiply":
        from budgetthink.tasks.multiply import Multiply as cls
    elif name == "math":
        from budgetthink.tasks.math import Math as cls
    else:
        raise UserError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    try:
        return cls(**options)
    except TypeError as e:
        raise UserError(f"bad option for task {name!r}: {e}") from None
