"""Math word problems from a local file, scored by answer equivalence with math-verify.

    task = Math(path="data/math500.jsonl")               # or a `datasets` directory (save_to_disk), .json, .parquet
    problems = task.generate(100, seed=0)                 # a seeded shuffle of the file's rows
    task.score(problems[0], "... so the answer is \\boxed{\\frac{1}{2}}")   # 1.0 when equivalent to the answer

The answer read from a completion is the last `\\boxed{...}` (braces may nest), else the last
`<answer>...</answer>`. Gold and prediction are both parsed by math-verify (`parse`) and compared by its
`verify`; where math-verify cannot read the gold answer the two strings are compared after removing spaces.
math-verify runs in a worker process under a hard per-completion limit (`time_limit`, 5 s, see limit.py):
a completion whose check runs past it scores 0.0 with `reason="timeout"`, which RL counts per step.
Rewards: 1.0 equivalent, `format_reward` (0.1) for an answer that is not, `none_reward` (0.0) for no answer.
Nothing is downloaded: the file must be local. There is no programmatic solver (`solve` returns None).
"""

import json
import logging
import random
import re
from pathlib import Path

from budgetthink.errors import UserError
from budgetthink.jsonl import read_jsonl
from budgetthink.tasks import Problem, Score, Trace, last_answer
from budgetthink.tasks.limit import TimeLimited, Timeout

TEMPLATES = ("boxed", "plain")
MAX_ANSWER_CHARS = 1000  # longer answers skip math-verify (its parser slows down badly on long input)
BOXED_INSTRUCTION = "\nPlease reason step by step, and put your final answer within \\boxed{}.\n"


def last_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{...}` (or `\\fbox{...}`), with nested braces; None if none.

    Linear time: one pass pairs every brace with its match, then each `\\boxed` is checked in O(1) (scanning
    from each unclosed `\\boxed{` to the end took 20 s on 8,000 of them)."""
    closing, stack = {}, []
    for m in _BRACE.finditer(text):
        if m.group() == "{":
            stack.append(m.start())
        elif stack:
            closing[stack.pop()] = m.start()
    starts = [(i, len(key)) for key in ("\\boxed", "\\fbox") for i in _find_all(text, key)]
    for start, width in sorted(starts, reverse=True):
        i = start + width
        while i < len(text) and text[i] == " ":
            i += 1
        if i in closing:
            return text[i + 1:closing[i]]
    return None


_BRACE = re.compile(r"[{}]")


def _find_all(text: str, key: str):
    i = text.find(key)
    while i >= 0:
        yield i
        i = text.find(key, i + 1)


def extract_answer(completion: str) -> str | None:
    boxed = last_boxed(completion)
    if boxed is not None:
        return boxed.strip()
    tagged = last_answer(completion)
    return tagged.strip() if tagged is not None else None


def _plain(text: str) -> str:
    return "".join(text.split())


def equivalent_now(gold: str, pred: str) -> bool:
    """math-verify equivalence of two answers (LaTeX or plain expressions), unbounded: call it through
    `equivalent`, which runs it in a worker process under a time limit."""
    from math_verify import parse, verify  # imported here: it pulls in sympy and an ANTLR parser

    # timeouts off: math-verify's use signal.alarm, which the worker's own timer replaces (and its warning
    # that they are off would only say so)
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    gold_parsed = parse("\\boxed{" + gold + "}", parsing_timeout=None)
    if not gold_parsed:
        return _plain(gold) == _plain(pred)
    pred_parsed = parse("\\boxed{" + pred + "}", parsing_timeout=None)
    if not pred_parsed:
        return False
    try:
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))
    except Exception:  # noqa: BLE001 - a prediction that sympy cannot compare is simply not equivalent
        return False


_VERIFIER = TimeLimited("budgetthink.tasks.math:equivalent_now", warmup=("\\frac{1}{2}", "0.5"))


def equivalent(gold: str, pred: str, time_limit: float = 5.0) -> bool:
    """Whether `pred` is equivalent to `gold`, decided within `time_limit` seconds (else `Timeout`).
    Identical answers need no parsing; answers longer than MAX_ANSWER_CHARS are compared as text only."""
    if _plain(gold) == _plain(pred):
        return True
    if len(pred) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS:
        return False
    return _VERIFIER(time_limit, gold, pred)


def load_rows(path: str | Path, split: str = "train") -> list[dict]:
    """Rows of a local JSONL/JSON/Parquet file or a `datasets` directory saved with save_to_disk."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"math: {path}: no such file or directory; give a local .jsonl/.json/.parquet file "
                        "or a datasets directory (path=...)")
    if path.is_dir():
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:  # noqa: BLE001 - any failure means it is not a saved dataset
            raise UserError(f"math: {path} is not a dataset saved with save_to_disk ({e})") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise UserError(f"math: {path} has no split {split!r}; splits: {', '.join(ds)} (split=...)")
            ds = ds[split]
        return [dict(r) for r in ds]
    if path.suffix == ".jsonl":
        return read_jsonl(path)
    if path.suffix == ".json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise UserError(f"math: {path}: not valid JSON ({e})") from None
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise UserError(f"math: {path}: expected a JSON list of objects")
        return rows
    if path.suffix == ".parquet":
        import datasets

        return [dict(r) for r in datasets.Dataset.from_parquet(str(path))]
    raise UserError(f"math: {path}: unknown file type; use .jsonl, .json, .parquet or a datasets directory")


class Math:
    """Problems with reference answers from a local file; answers checked by math-verify."""

    name = "math"

    def __init__(self, path: str | None = None, problem_field: str = "problem", answer_field: str = "answer",
                 split: str = "train", template: str = "boxed", correct_reward: float = 1.0,
                 format_reward: float = 0.1, none_reward: float = 0.0, time_limit: float = 5.0):
        if template not in TEMPLATES:
            raise UserError(f"unknown math template {template!r}; known: {', '.join(TEMPLATES)}")
        self.path, self.problem_field, self.answer_field, self.split = path, problem_field, answer_field, split
        if not float(time_limit) > 0:
            raise UserError(f"math: time_limit must be a positive number of seconds, got {time_limit!r}")
        self.template, self.time_limit = template, float(time_limit)
        self.correct_reward, self.format_reward, self.none_reward = (
            float(correct_reward), float(format_reward), float(none_reward))

    def prompt(self, question: str) -> str:
        return question + (BOXED_INSTRUCTION if self.template == "boxed" else "\n")

    def generate(self, n: int, seed: int) -> list[Problem]:
        """n problems from the file in a seeded random order (without repetition)."""
        if self.path is None:
            raise UserError("the math task needs a local file: pass path=FILE (JSONL, JSON, Parquet or a datasets dir)")
        rows = load_rows(self.path, self.split)
        for field in (self.problem_field, self.answer_field):
            if rows and field not in rows[0]:
                raise UserError(f"math: {self.path} rows have no field {field!r}; fields: {', '.join(rows[0])} "
                                f"(set problem_field=/answer_field=)")
        if n > len(rows):
            raise UserError(f"math: asked for {n} problems but {self.path} holds {len(rows)}; lower --n")
        order = list(range(len(rows)))
        random.Random(f"math:{seed}").shuffle(order)
        out = []
        for i in order[:n]:
            row = rows[i]
            if self.problem_field not in row or self.answer_field not in row:
                raise UserError(f"math: {self.path} row {i + 1} lacks {self.problem_field!r} or {self.answer_field!r}")
            out.append(Problem(id=str(row.get("id", f"math-{i}")), task=self.name,
                               prompt=self.prompt(str(row[self.problem_field])),
                               answer=str(row[self.answer_field]), meta={"index": i, "seed": seed}))
        return out

    def score(self, problem: Problem, completion: str) -> Score:
        pred = extract_answer(completion)
        if pred is None:
            return Score(self.none_reward, False, False, None)
        try:
            same = bool(pred) and equivalent(str(problem.answer), pred, self.time_limit)
        except Timeout:  # a hard cap per completion: one answer must not stall a whole RL step
            return Score(0.0, False, True, pred, reason="timeout")
        if same:
            return Score(self.correct_reward, True, True, pred)
        return Score(self.format_reward, False, True, pred)

    def solve(self, problem: Problem) -> Trace | None:
        return None
