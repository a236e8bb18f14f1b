"""Countdown scoring: a hand-written table of completions and their expected rewards.

Each expected reward is worked out by hand from TinyZero's rules and this project's deliberate differences
(tasks/countdown.py's docstring); a comment marks where TinyZero's own code would give another reward.
"""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from budgetthink.tasks.countdown import Countdown

TASK = Countdown()

P = ([3, 5, 7], 22)  # (numbers, target) used unless a case names another

CASES = [
    # --- correct answers ---
    ("plain", P, "<answer>3*5+7</answer>", 1.0),
    ("parenthesised", P, "<answer>(3*5)+7</answer>", 1.0),
    ("spaces", P, "<answer> 3 * 5 + 7 </answer>", 1.0),
    ("another order", P, "<answer>7+5*3</answer>", 1.0),
    ("nested parens", P, "<answer>((3*5))+7</answer>", 1.0),
    ("parens everywhere", P, "<answer>(((3)*(5))+(7))</answer>", 1.0),
    ("tab and newline inside the tag", P, "<answer>3\t*5\n+7</answer>", 1.0),
    ("text after the answer", P, "<answer>3*5+7</answer> I hope this is right.", 1.0),
    ("newline after answer (TinyZero: 0.0)", P, "<answer>3*5+7</answer>\n", 1.0),
    ("thinking before, tags inside thinking", P, "<think>try <answer>3+5+7</answer></think><answer>3*5+7</answer>", 1.0),
    ("unary minus", ([3, 5, 7], 32), "<answer>-3+5*7</answer>", 1.0),
    ("unary plus", P, "<answer>+3*5+7</answer>", 1.0),
    ("fraction along the way", ([6, 1, 3, 4], 24), "<answer>6/(1-3/4)</answer>", 1.0),
    ("exact division", ([3, 3, 7], 7), "<answer>7*(3/3)</answer>", 1.0),
    ("zero along the way", ([3, 3, 7], 7), "<answer>(3-3)+7</answer>", 1.0),
    ("within 1e-5 of the target", ([1000001, 1000000], 1), "<answer>1000001/1000000</answer>", 1.0),
    # --- several tags: the last complete one wins ---
    ("last tag wins (right)", P, "<answer>3+5+7</answer> <answer>3*5+7</answer>", 1.0),
    ("last tag wins (wrong)", P, "<answer>3*5+7</answer> <answer>3+5+7</answer>", 0.1),
    ("last tag unclosed: earlier one counts", P, "<answer>3*5+7</answer> <answer>3+5", 1.0),
    ("tag opened twice (non-greedy match keeps the inner tag text)", P, "<answer> <answer>3*5+7</answer>", 0.1),
    # --- formatted but wrong: 0.1 ---
    ("number missing", P, "<answer>3*5</answer>", 0.1),
    ("number repeated", P, "<answer>3*5+7+7</answer>", 0.1),
    ("extra number", P, "<answer>3*5+7-1+1</answer>", 0.1),
    ("wrong value", P, "<answer>3+5+7</answer>", 0.1),
    ("division by zero", ([3, 3, 7], 7), "<answer>7/(3-3)</answer>", 0.1),
    ("power (TinyZero: 1.0)", ([2, 3, 1], 8), "<answer>2**3*1</answer>", 0.1),
    ("floor division (TinyZero: 1.0)", ([7, 2, 3], 8), "<answer>7+3//2</answer>", 0.1),
    ("true division of the same is wrong", ([7, 2, 3], 8), "<answer>7+3/2</answer>", 0.1),
    ("decimal 2.5 (TinyZero: 1.0)", ([2, 5, 4], 10), "<answer>2.5*4</answer>", 0.1),
    ("just outside 1e-5", ([100001, 100000], 1), "<answer>100001/100000</answer>", 0.1),
    ("equation sign", P, "<answer>3*5+7=22</answer>", 0.1),
    ("letters", P, "<answer>x</answer>", 0.1),
    ("empty tag", P, "<answer></answer>", 0.1),
    ("numbers without operators", P, "<answer>3 5 7</answer>", 0.1),
    ("unbalanced parenthesis", P, "<answer>(3*5+7</answer>", 0.1),
    ("leading zero", P, "<answer>3*5+07</answer>", 0.1),
    ("full-width digit", P, "<answer>\uff13*5+7</answer>", 0.1),
    ("a call", P, "<answer>abs(3*5+7)</answer>", 0.1),
    ("modulo", ([7, 2, 3], 1), "<answer>(7%2)*(3-2)</answer>", 0.1),
    # --- no answer: 0.0 ---
    ("no tag", P, "3*5+7 = 22", 0.0),
    ("empty completion", P, "", 0.0),
    ("unclosed tag", P, "<answer>3*5+7", 0.0),
    ("closing tag only", P, "3*5+7</answer>", 0.0),
    ("tag in another case", P, "<Answer>3*5+7</Answer>", 0.0),
]


@pytest.mark.parametrize("name,problem,completion,expected", CASES, ids=[c[0] for c in CASES])
def test_countdown_score_table(name, problem, completion, expected):
    numbers, target = problem
    score = TASK.score(TASK.make(numbers, target), completion)
    assert score.reward == expected
    assert score.correct == (expected == 1.0)
    assert score.formatted == (expected > 0.0)


def test_table_is_large_enough():
    assert len(CASES) >= 30


def test_extracted_is_the_stripped_last_answer():
    p = TASK.make([3, 5, 7], 22)
    assert TASK.score(p, "<answer>1</answer><answer> 3*5+7 </answer>").extracted == "3*5+7"
    assert TASK.score(p, "nothing").extracted is None


def test_rewards_are_configurable():
    task = Countdown(correct_reward=2.0, format_reward=0.5, none_reward=-1.0)
    p = task.make([3, 5, 7], 22)
    assert task.score(p, "<answer>3*5+7</answer>").reward == 2.0
    assert task.score(p, "<answer>3+5+7</answer>").reward == 0.5
    assert task.score(p, "no answer").reward == -1.0


# An independent reference for well-formed expressions: build random expressions over the given numbers,
# evaluate them with Python's own float arithmetic (safe: we built the string) and apply TinyZero's rule.

def _expr(numbers, data):
    if len(numbers) == 1:
        return str(numbers[0])
    cut = data.draw(st.integers(1, len(numbers) - 1))
    op = data.draw(st.sampled_from("+-*/"))
    left, right = _expr(numbers[:cut], data), _expr(numbers[cut:], data)
    return f"({left}){op}({right})" if data.draw(st.booleans()) else f"({left} {op} {right})"


@settings(max_examples=150, deadline=None)
@given(numbers=st.lists(st.integers(1, 20), min_size=2, max_size=4), data=st.data())
def test_agrees_with_tinyzero_rule_on_wellformed_expressions(numbers, data):
    order = data.draw(st.permutations(numbers))
    expr = _expr(list(order), data)
    try:
        value = eval(expr)  # the test built this string from digits, operators and parentheses
    except ZeroDivisionError:
        value = None
    target = round(value) if value is not None else 1
    if data.draw(st.booleans()):
        target += data.draw(st.integers(-3, 3))
    expected = 1.0 if value is not None and abs(value - target) < 1e-5 else 0.1
    assert TASK.score(TASK.make(numbers, target), f"<think>...</think><answer>{expr}</answer>").reward == expected
