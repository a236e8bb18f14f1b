"""Countdown: reach a target from given numbers with + - * /, each number used exactly once.

    task = Countdown(num_numbers=3, number_range=(1, 10), template="compact")
    problems = task.generate(1000, seed=0)     # distinct, each solvable by the solver below
    task.score(problems[0], "...<answer>(3*5)+7</answer>")   # Score(reward=1.0, ...)
    trace = task.solve(problems[0])            # Trace(thinking="3+5=8 8+7=15<22 ...", answer="<answer>...</answer>")

Scoring follows TinyZero's rules with deliberate differences: the completion
is scored on its own (no "Assistant:" split, no last-line rule); the last `<answer>...</answer>`
is read; its numbers (runs of digits) must be exactly the given numbers as a multiset; only digits,
`+ - * / ( )` and whitespace may appear; the exact value (see arith.py, never `eval`) must be within 1e-5 of
the target. Correct: 1.0; an answer that fails any check (wrong numbers or value, `**`, `//`, `2.5`,
division by zero): 0.1; no answer tag: 0.0.

The solver is a depth-first search in a fixed order, written out as the trace a small model imitates:
pairs of the current numbers in order (i < j), operations in the order + - * / (a difference or quotient is
written larger-first; zero differences, inexact quotients and division by 1 are skipped, so every value is
a positive integer), the new number placed first. One line per choice of the first pair; with three numbers
the line then lists every final attempt with an explicit local check that says how the value compares with
the target (`<`, `>` or `==`) and restates the target:

    3 5 7 -> 22
    <think>3+5=8 8+7=15<22 8-7=1<22 8*7=56>22
    5-3=2 2+7=9<22 7-2=5<22 2*7=14<22
    3*5=15 15+7=22==22
    (3*5)+7=15+7=22==22</think><answer>(3*5)+7</answer>

With more numbers each deeper choice starts its own line, indented by its depth. The search stops at the
first attempt that hits the target, so harder problems (found later in the order) have longer traces; the
last line re-evaluates the chosen expression one operation at a time before the answer is given.
"""

import random
import re
from fractions import Fraction
from functools import lru_cache

from budgetthink.errors import UserError
from budgetthink.tasks import Problem, Score, Trace, check_split, in_split, last_answer, parse_range
from budgetthink.tasks.arith import MAX_CHARS, ArithError, evaluate

TEMPLATES = ("compact", "base", "qwen-instruct")

# TinyZero's prompts (examples/data_preprocess/countdown.py), without the trailing "<think>": the think
# format appends its own opening delimiter. {numbers} is a Python list, as TinyZero formats it.
BASE_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with the "
    "answer.\nUser: Using the numbers {numbers}, create an equation that equals {target}. You can use basic "
    "arithmetic operations (+, -, *, /) and each number can only be used once. Show your work in <think> "
    "</think> tags. And return the final answer in <answer> </answer> tags, for example <answer> (1 + 2) / 3 "
    "</answer>.\nAssistant: Let me solve this step by step.\n"
)
QWEN_INSTRUCT_TEMPLATE = (
    "<|im_start|>system\nYou are a helpful assistant. You first thinks about the reasoning process in the mind "
    "and then provides the user with the answer.<|im_end|>\n<|im_start|>user\n Using the numbers {numbers}, "
    "create an equation that equals {target}. You can use basic arithmetic operations (+, -, *, /) and each "
    "number can only be used once. Show your work in <think> </think> tags. And return the final answer in "
    "<answer> </answer> tags, for example <answer> (1 + 2) / 3 </answer>.<|im_end|>\n<|im_start|>assistant\n"
    "Let me solve this step by step.\n"
)
COMPACT_TEMPLATE = "{spaced} -> {target}\n"  # "3 5 7 -> 22\n": short, for a character-level model

MAX_NUMBERS = 5  # the exhaustive search (and its trace) grows too fast beyond this
_ALLOWED = frozenset("0123456789+-*/() \t\n\r\f\v")
CHECK = re.compile(r"=\d+(?:<|>|==)\d+")  # a final attempt's check in a trace: `=15<22`


# ---- the search: one rule set shared by the generator (reachable targets) and the solver (traces) ----

def _moves(x: int, y: int):
    """(op, swapped, value) of each operation on a pair, in the fixed order + - * /. A difference or quotient
    is written larger-first (swapped: written as y op x); values stay positive integers."""
    swapped = y > x
    hi, lo = (y, x) if swapped else (x, y)
    yield "+", False, x + y
    if hi != lo:
        yield "-", swapped, hi - lo
    yield "*", False, x * y
    if lo > 1 and hi % lo == 0:
        yield "/", swapped, hi // lo


def _pairs(k: int):
    return ((i, j) for i in range(k) for j in range(i + 1, k))


@lru_cache(maxsize=100_000)
def reachable(numbers: tuple[int, ...]) -> frozenset[int]:
    """Every value the solver can reach using all of `numbers` (pass them sorted for cache hits)."""
    if len(numbers) == 1:
        return frozenset(numbers)
    out = set()
    for i, j in _pairs(len(numbers)):
        rest = [n for k, n in enumerate(numbers) if k not in (i, j)]
        for _, _, v in _moves(numbers[i], numbers[j]):
            out |= reachable(tuple(sorted([v] + rest)))
    return frozenset(out)


# A node of an expression: an int leaf, or (op, left, right).
def _render(node) -> str:
    if isinstance(node, int):
        return str(node)
    op, a, b = node
    left = str(a) if isinstance(a, int) else f"({_render(a)})"
    right = str(b) if isinstance(b, int) else f"({_render(b)})"
    return f"{left}{op}{right}"


def _reduce_once(node):
    """Replace the leftmost operation whose operands are both numbers by its value."""
    op, a, b = node
    if isinstance(a, int) and isinstance(b, int):
        return {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
    if not isinstance(a, int):
        return (op, _reduce_once(a), b)
    return (op, a, _reduce_once(b))


def relation(value: int, target: int) -> str:
    """`<`, `>` or `==`: an order, not just `!=`. With `!=` a model can be right 19 times in 20 by never
    noticing a hit; the tiny model fine-tuned 30 epochs on `!=` traces called 72% of the hits in its searches
    unequal (benchmarks/bench_sft_errors.py). Every check now asks for a comparison it must actually make."""
    return "<" if value < target else ">" if value > target else "=="


def search(numbers: list[int], target: int, budget: int | None = None) -> tuple[str, str] | None:
    """(thinking, expression) of the first solution in the fixed search order, or None.

    With a thinking `budget` (characters, which are the tiny tokenizer's tokens) the trace is the one a solver
    told "at most B" writes: its first B characters (where budget forcing would cut it), then the answer: the
    solution if the cut trace holds its whole check (`=22==22`), else the last attempt it checked in full (the
    first attempt if none). A budget the whole trace fits in changes nothing.
    """
    lines: list[str] = []
    attempts: list[object] = []  # the expression node of every final attempt, in the trace's order

    def go(state: list[tuple[int, object]], depth: int) -> object | None:
        # state: [(value, node)]; returns the solved node or None
        indent = " " * depth
        k = len(state)
        if k == 2:  # only possible when the puzzle itself has two numbers
            return leaves(state, indent)
        for i, j in _pairs(k):
            (xv, xn), (yv, yn) = state[i], state[j]
            rest = [s for n, s in enumerate(state) if n not in (i, j)]
            for op, swapped, v in _moves(xv, yv):
                a, b = ((yv, yn), (xv, xn)) if swapped else ((xv, xn), (yv, yn))
                lines.append(f"{indent}{a[0]}{op}{b[0]}={v}")
                new = [(v, (op, a[1], b[1]))] + rest
                found = leaves(new, None) if k == 3 else go(new, depth + 1)
                if found is not None:
                    return found
        return None

    def leaves(state, indent):
        (xv, xn), (yv, yn) = state
        parts = []
        found = None
        for op, swapped, v in _moves(xv, yv):
            a, b = ((yv, yn), (xv, xn)) if swapped else ((xv, xn), (yv, yn))
            hit = v == target
            parts.append(f"{a[0]}{op}{b[0]}={v}{relation(v, target)}{target}")
            attempts.append((op, a[1], b[1]))
            if hit:
                found = (op, a[1], b[1])
                break
        if indent is None:  # attempts continue the line of the move that made this pair
            lines[-1] += " " + " ".join(parts)
        else:
            lines.append(indent + " ".join(parts))
        return found

    if len(numbers) > MAX_NUMBERS:  # the search would not finish in reasonable time
        return None
    if len(numbers) == 1:
        return (f"{numbers[0]}=={target}", str(numbers[0])) if numbers[0] == target else None
    solved = go([(n, n) for n in numbers], 0)
    if solved is None:
        return None
    steps, node = [_render(solved)], solved
    while not isinstance(node, int):
        node = _reduce_once(node)
        steps.append(_render(node))
    lines.append("=".join(steps) + f"=={target}")
    thinking = "\n".join(lines)
    if budget is None or len(thinking) <= budget:
        return thinking, _render(solved)
    # the search stops at its hit, so the solution is the last attempt (and the re-check's `==` adds none)
    checked = min(len(attempts), sum(m.end() <= budget for m in CHECK.finditer(thinking)))
    return thinking[:budget], _render(attempts[max(checked, 1) - 1])


class Countdown:
    """Countdown puzzles (TinyZero's task): numbers, a target, one expression using each number once."""

    name = "countdown"

    def __init__(self, num_numbers=3, number_range=(1, 10), target_range=(1, 100), template: str = "compact",
                 split: str = "all", correct_reward: float = 1.0, format_reward: float = 0.1, none_reward: float = 0.0):
        self.num_numbers = parse_range(num_numbers, "num_numbers")
        self.number_range = parse_range(number_range, "number_range")
        self.target_range = parse_range(target_range, "target_range")
        if not 2 <= self.num_numbers[0] <= self.num_numbers[1] <= MAX_NUMBERS:
            raise UserError(f"num_numbers must lie within 2..{MAX_NUMBERS}, got {num_numbers!r}")
        if self.number_range[0] < 1:
            raise UserError(f"number_range must hold positive integers, got {number_range!r}")
        if template not in TEMPLATES:
            raise UserError(f"unknown countdown template {template!r}; known: {', '.join(TEMPLATES)}")
        self.template = template
        self.split = check_split(split)
        self.correct_reward, self.format_reward, self.none_reward = (
            float(correct_reward), float(format_reward), float(none_reward))

    # ---- problems ----
    def prompt(self, numbers: list[int], target: int) -> str:
        if self.template == "compact":
            return COMPACT_TEMPLATE.format(spaced=" ".join(map(str, numbers)), target=target)
        tpl = BASE_TEMPLATE if self.template == "base" else QWEN_INSTRUCT_TEMPLATE
        return tpl.format(numbers=list(numbers), target=target)

    def make(self, numbers: list[int], target: int, meta: dict | None = None) -> Problem:
        numbers = [int(n) for n in numbers]
        return Problem(id=f"countdown-{'_'.join(map(str, numbers))}-t{int(target)}", task=self.name,
                       prompt=self.prompt(numbers, int(target)),
                       answer={"target": int(target), "numbers": numbers}, meta=dict(meta or {}))

    def generate(self, n: int, seed: int) -> list[Problem]:
        """n distinct problems (ordered numbers + target), each solvable; the same for the same seed.

        Numbers are drawn uniformly from number_range, their count from num_numbers; the target is drawn
        uniformly from the values the solver can reach with them that fall within target_range."""
        size = self.space_size()
        if size is not None and n > size:
            raise UserError(f"countdown: only {size} distinct solvable problems exist with these options in split "
                            f"{self.split!r}, fewer than --n {n}; widen number_range/target_range or lower --n")
        rng = random.Random(f"countdown:{seed}")
        seen, out, tries = set(), [], 0
        lo_t, hi_t = self.target_range
        while len(out) < n:
            tries += 1
            if tries > 50 * n + 10_000:
                raise UserError(f"countdown: found only {len(out)} distinct solvable problems of {n} after "
                                f"{tries - 1} draws; widen number_range/target_range or lower --n")
            k = rng.randint(*self.num_numbers)
            numbers = [rng.randint(*self.number_range) for _ in range(k)]
            targets = sorted(t for t in reachable(tuple(sorted(numbers))) if lo_t <= t <= hi_t)
            if not targets:
                continue
            target = rng.choice(targets)
            key = (tuple(numbers), target)
            if key in seen or not in_split(key, self.split):
                continue
            problem = self.make(numbers, target, {"seed": seed, "index": len(out)})
            trace = self.solve(problem)
            if trace is None or self.score(problem, trace.answer).reward != self.correct_reward:
                raise RuntimeError(f"countdown solver failed on a reachable target: {numbers} -> {target}")
            seen.add(key)
            out.append(problem)
        return out

    def space_size(self, limit: int = 100_000) -> int | None:
        """How many distinct problems `generate` can draw (ordered numbers + target, in this split); None when
        there are more than `limit` number tuples to count (then `generate` finds out by drawing)."""
        (lo_k, hi_k), (lo, hi), (lo_t, hi_t) = self.num_numbers, self.number_range, self.target_range
        if sum((hi - lo + 1) ** k for k in range(lo_k, hi_k + 1)) > limit:
            return None
        from itertools import product

        return sum(in_split((numbers, t), self.split) for k in range(lo_k, hi_k + 1)
                   for numbers in product(range(lo, hi + 1), repeat=k)
                   for t in reachable(tuple(sorted(numbers))) if lo_t <= t <= hi_t)

    # ---- scoring ----
    def check(self, expr: str, numbers: list[int], target: int) -> bool:
        """True if `expr` uses exactly `numbers`, only allowed characters, and equals `target`."""
        if not expr or len(expr) > MAX_CHARS or any(c not in _ALLOWED for c in expr):
            return False
        used, digits = [], ""
        for c in expr + " ":
            if c.isdigit():
                digits += c
            elif digits:
                used.append(int(digits))
                digits = ""
        if sorted(used) != sorted(int(x) for x in numbers):
            return False
        try:
            value = evaluate(expr)
        except ArithError:  # includes DivisionByZero, `**`, `//`, syntax errors
            return False
        return abs(value - Fraction(int(target))) < Fraction(1, 10**5)

    def score(self, problem: Problem, completion: str) -> Score:
        text = last_answer(completion)
        if text is None:
            return Score(self.none_reward, False, False, None)
        expr = text.strip()
        answer = problem.answer
        if self.check(expr, answer["numbers"], answer["target"]):
            return Score(self.correct_reward, True, True, expr)
        return Score(self.format_reward, False, True, expr)

    # ---- the programmatic teacher ----
    def solve(self, problem: Problem, budget: int | None = None) -> Trace | None:
        """The solver's trace; with a `budget`, the trace cut to it (see `search`)."""
        found = search(list(problem.answer["numbers"]), int(problem.answer["target"]), budget)
        if found is None:
            return None
        thinking, expr = found
        return Trace(thinking=thinking, answer=f"<answer>{expr}</answer>")
