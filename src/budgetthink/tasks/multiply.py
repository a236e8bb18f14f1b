"""Multiplication: the product of two integers (TinyZero's arithmetic task).

    task = Multiply(digits=3)                      # 3-digit operands (digits=(1, 3) or "1-3": 1 to 3 digits)
    task = Multiply(tinyzero_distribution=True)    # TinyZero: each operand 0-99 w.p. 1/3, else 0-999
    task.score(problem, "...<answer>5535</answer>")   # 1.0 exact, 0.1 another integer, 0.0 no integer answer
    task.solve(problem).thinking                   # long-hand partial products, their sum, then a check

Scoring follows TinyZero's rule: the last `<answer>...</answer>` is read; an integer
equal to the product scores 1.0, any other integer 0.1, anything else (no tag, not an integer) 0.0.

The solver writes long multiplication by the second operand's non-zero digits, least significant first,
sums the partial products, then checks by multiplying the other way round and comparing:

    123*45
    <think>123*5=615
    123*40=4920
    615+4920=5535
    45*3=135
    45*20=900
    45*100=4500
    135+900+4500=5535==5535</think><answer>5535</answer>
"""

import random
import re

from budgetthink.errors import UserError
from budgetthink.tasks import Problem, Score, Trace, check_split, in_split, last_answer, parse_range

TEMPLATES = ("compact", "base")

# TinyZero's arithmetic prompt (examples/data_preprocess/arth.py), without the trailing "<think>".
BASE_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The "
    "assistant first thinks about the reasoning process in the mind and then provides the user with the "
    "answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> "
    "tags, respectively, i.e., <think> reasoning process here </think> <answer> RESULT_NUMBER </answer>. "
    "\nUser: Give me the answer of the following equation: {a} * {b}.\nAssistant: Ok let me think about it.\n"
)
COMPACT_TEMPLATE = "{a}*{b}\n"

_INT = re.compile(r"[+-]?[0-9]+", re.ASCII)
# the lookbehind starts a match only at the first digit of a run: linear time on a long run of digits
_OPERANDS = re.compile(r"(?<![0-9])([0-9]+) ?\* ?([0-9]+)", re.ASCII)


def long_hand(a: int, b: int) -> tuple[list[str], int]:
    """Lines of a*b by b's non-zero digits (least significant first) and their sum; and the product."""
    partials = []
    for place, digit in enumerate(reversed(str(b))):
        if digit != "0":
            m = int(digit) * 10**place
            partials.append((f"{a}*{m}", a * m))
    if not partials:
        return [f"{a}*{b}=0"], 0
    lines = [f"{text}={value}" for text, value in partials]
    total = sum(v for _, v in partials)
    if len(partials) > 1:
        lines.append("+".join(str(v) for _, v in partials) + f"={total}")
    return lines, total


class Multiply:
    """Products of two non-negative integers, scored like TinyZero's multiplication task."""

    name = "multiply"

    def __init__(self, digits=3, tinyzero_distribution: bool = False, template: str = "compact",
                 split: str = "all", correct_reward: float = 1.0, format_reward: float = 0.1, none_reward: float = 0.0):
        self.digits = parse_range(digits, "digits")
        if self.digits[0] < 1:
            raise UserError(f"digits must be at least 1, got {digits!r}")
        if template not in TEMPLATES:
            raise UserError(f"unknown multiply template {template!r}; known: {', '.join(TEMPLATES)}")
        self.tinyzero_distribution = bool(tinyzero_distribution)
        self.template = template
        self.split = check_split(split)
        self.correct_reward, self.format_reward, self.none_reward = (
            float(correct_reward), float(format_reward), float(none_reward))

    def _operand(self, rng: random.Random) -> int:
        if self.tinyzero_distribution:
            return rng.randint(0, 99) if rng.randint(0, 2) == 0 else rng.randint(0, 999)
        d = rng.randint(*self.digits)  # a d-digit number (0 counts as a 1-digit number)
        return rng.randint(0 if d == 1 else 10 ** (d - 1), 10**d - 1)

    def make(self, a: int, b: int, meta: dict | None = None) -> Problem:
        tpl = COMPACT_TEMPLATE if self.template == "compact" else BASE_TEMPLATE
        return Problem(id=f"multiply-{a}x{b}", task=self.name, prompt=tpl.format(a=a, b=b), answer=a * b,
                       meta={"a": a, "b": b, **(meta or {})})

    def generate(self, n: int, seed: int) -> list[Problem]:
        """n distinct (ordered) operand pairs; the same for the same seed."""
        rng = random.Random(f"multiply:{seed}")
        seen, out, tries = set(), [], 0
        while len(out) < n:
            tries += 1
            if tries > 50 * n + 10_000:
                raise UserError(f"multiply: found only {len(out)} distinct problems of {n}; raise digits or lower --n")
            a, b = self._operand(rng), self._operand(rng)
            if (a, b) in seen or not in_split((a, b), self.split):
                continue
            seen.add((a, b))
            out.append(self.make(a, b, {"seed": seed, "index": len(out)}))
        return out

    def score(self, problem: Problem, completion: str) -> Score:
        text = last_answer(completion)
        expr = text.strip() if text is not None else None
        if expr is None or not _INT.fullmatch(expr):
            return Score(self.none_reward, False, False, expr)
        try:
            value = int(expr)
        except ValueError:  # more digits than Python converts (4300): certainly not this product
            value = None
        if value == int(problem.answer):
            return Score(self.correct_reward, True, True, expr)
        return Score(self.format_reward, False, True, expr)

    def solve(self, problem: Problem) -> Trace | None:
        """The long-hand trace; operands from meta, else the last `A * B` in the prompt (None if absent)."""
        if "a" in problem.meta and "b" in problem.meta:
            a, b = int(problem.meta["a"]), int(problem.meta["b"])
        else:
            found = _OPERANDS.findall(problem.prompt)
            if not found:
                return None
            a, b = map(int, found[-1])
        lines, product = long_hand(a, b)
        check, again = long_hand(b, a)
        if not product == again == a * b:
            raise RuntimeError(f"long-hand multiplication disagrees for {a}*{b}")
        check[-1] += f"=={product}"
        return Trace(thinking="\n".join(lines + check), answer=f"<answer>{product}</answer>")
