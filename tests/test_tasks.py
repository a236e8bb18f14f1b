"""Tasks: solver traces score 1.0 and are arithmetically right, scoring never raises or hangs, generation is
deterministic, distinct and solvable; math scoring via math-verify; `data generate` / `data score`."""

import json
import re
import string
import time
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from budgetthink.data import problems as data_problems
from budgetthink.errors import UserError
from budgetthink.tasks import Problem, get_task
from budgetthink.tasks.arith import ArithError, DivisionByZero, evaluate
from budgetthink.tasks.countdown import Countdown, reachable
from budgetthink.tasks.multiply import Multiply

COUNTDOWN = Countdown()
MULTIPLY = Multiply()
FAST = settings(max_examples=80, deadline=None)


# ---------------- arith ----------------

def test_arith_exact_and_rejections():
    assert evaluate("7/3*3") == 7
    assert evaluate("6/(1-3/4)") == 24
    assert evaluate(" -(2+3) * +4 ") == -20
    assert evaluate("1/3") == Fraction(1, 3)
    with pytest.raises(DivisionByZero):
        evaluate("1/(2-2)")
    for bad in ["2**3", "7//2", "7%2", "2.5", "x", "abs(1)", "1 if 1 else 2", "[1]", "1,2", "", "1e3", "True",
                "(" * 300 + "1" + ")" * 300, "-" * 400 + "1", "9" * 700, "1;2"]:
        with pytest.raises(ArithError):
            evaluate(bad)


def test_arith_bounds_values():
    with pytest.raises(ArithError):
        evaluate("*".join(["999999999"] * 60))  # ~1800 bits per factor product: over MAX_BITS


# ---------------- countdown solver ----------------

def _check_countdown_trace(numbers, target, thinking):
    """Every written step is right, every check restates the target and is right, only the last hits it."""
    assert all(c in string.printable and c not in "\t\r\x0b\x0c" for c in thinking)
    *search_lines, verify = thinking.split("\n")
    hits = 0
    for line in search_lines:
        for a, op, b, v, rel, t in re.findall(r"(\d+)([-+*/])(\d+)=(\d+)(?:(==|<|>)(\d+))?", line):
            exact = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b),
                     "/": Fraction(int(a), int(b))}[op]
            assert exact == int(v) and int(v) > 0, line
            if rel:
                assert int(t) == target, line
                assert rel == {-1: "<", 0: "==", 1: ">"}[(int(v) > target) - (int(v) < target)], line
                hits += rel == "=="
    assert hits == 1 and "==" in search_lines[-1]
    assert verify.endswith(f"={target}=={target}")
    stages = verify[: -len(f"=={target}")].split("=")  # the expression, reduced one operation at a time
    assert len(stages) == len(numbers) and all(evaluate(s) == target for s in stages)


@FAST
@given(numbers=st.lists(st.integers(1, 10), min_size=3, max_size=3), target=st.integers(1, 100))
def test_countdown_solver_solutions_score_one(numbers, target):
    problem = COUNTDOWN.make(numbers, target)
    trace = COUNTDOWN.solve(problem)
    assert (trace is not None) == (target in reachable(tuple(sorted(numbers))))
    if trace is None:
        return
    assert COUNTDOWN.score(problem, trace.answer).reward == 1.0
    assert COUNTDOWN.score(problem, trace.thinking + "</think>" + trace.answer).reward == 1.0
    _check_countdown_trace(numbers, target, trace.thinking)


def test_countdown_trace_example_reads_like_search():
    trace = COUNTDOWN.solve(COUNTDOWN.make([3, 5, 7], 22))
    assert trace.thinking == ("3+5=8 8+7=15<22 8-7=1<22 8*7=56>22\n"
                              "5-3=2 2+7=9<22 7-2=5<22 2*7=14<22\n"
                              "3*5=15 15+7=22==22\n"
                              "(3*5)+7=15+7=22==22")
    assert trace.answer == "<answer>(3*5)+7</answer>"



def test_countdown_trace_cut_to_a_budget():
    # the trace above, 107 characters: line 1 is 34, lines 1-2 are 68, lines 1-3 (up to the hit's check) are 87
    p = COUNTDOWN.make([3, 5, 7], 22)
    full = COUNTDOWN.solve(p)
    cases = {  # budget: (thinking, answer); the thinking is always the first B characters
        3: ("3+5", "(3+5)+7"),  # no attempt checked yet: the first attempt
        16: ("3+5=8 8+7=15<22 ", "(3+5)+7"),  # the last attempt checked
        14: ("3+5=8 8+7=15<2", "(3+5)+7"),  # `=15<2` is not a whole check: still the first attempt
        29: ("3+5=8 8+7=15<22 8-7=1<22 8*7=", "(3+5)-7"),  # the second attempt's check is the last whole one
        86: (full.thinking[:86], "(5-3)*7"),  # one character short of the hit's check: attempt 6 of line 2
        87: (full.thinking[:87], "(3*5)+7"),  # the hit's check whole: the solution
        106: (full.thinking[:106], "(3*5)+7"),
        107: (full.thinking, "(3*5)+7"),  # the whole trace fits: unchanged
    }
    for budget, (thinking, answer) in cases.items():
        trace = COUNTDOWN.solve(p, budget=budget)
        assert (trace.thinking, trace.answer) == (thinking, f"<answer>{answer}</answer>"), budget
    for p in Countdown(num_numbers=4).generate(5, seed=2):  # deeper searches: the cut answer is well formed
        trace = Countdown(num_numbers=4).solve(p, budget=40)
        assert trace.thinking == Countdown(num_numbers=4).solve(p).thinking[:40]
        assert COUNTDOWN.score(p, trace.answer).formatted

def test_countdown_four_numbers_traces():
    task = Countdown(num_numbers=4)
    for p in task.generate(15, seed=1):
        trace = task.solve(p)
        assert task.score(p, trace.answer).reward == 1.0
        _check_countdown_trace(p.answer["numbers"], p.answer["target"], trace.thinking)


def test_harder_problems_have_longer_traces():
    # the first attempt hits: the shortest trace; an unreachable-early target needs much more search
    easy = COUNTDOWN.solve(COUNTDOWN.make([3, 5, 7], 15)).thinking
    hard = COUNTDOWN.solve(COUNTDOWN.make([3, 5, 7], 2)).thinking
    assert easy.count("\n") == 1 and len(hard) > 3 * len(easy)


# ---------------- countdown generation ----------------

def test_countdown_generation_deterministic_distinct_solvable():
    task = Countdown(num_numbers=(3, 4), number_range=(1, 12), target_range=(5, 60))
    a, b = task.generate(300, seed=7), task.generate(300, seed=7)
    assert [p.to_dict() for p in a] == [p.to_dict() for p in b]
    assert [p.id for p in task.generate(300, seed=8)] != [p.id for p in a]
    keys = [(tuple(p.answer["numbers"]), p.answer["target"]) for p in a]
    assert len(set(keys)) == len(keys) and len({p.id for p in a}) == len(a)
    assert {len(p.answer["numbers"]) for p in a} == {3, 4}
    for p in a:
        assert all(1 <= n <= 12 for n in p.answer["numbers"]) and 5 <= p.answer["target"] <= 60
        trace = task.solve(p)
        assert trace is not None and task.score(p, trace.answer).reward == 1.0


def test_countdown_templates():
    numbers, target = [3, 5, 7], 22
    assert Countdown(template="compact").make(numbers, target).prompt == "3 5 7 -> 22\n"
    base = Countdown(template="base").make(numbers, target).prompt
    assert "Using the numbers [3, 5, 7], create an equation that equals 22." in base
    assert base.startswith("A conversation between User and Assistant.")
    assert base.endswith("Assistant: Let me solve this step by step.\n")
    qwen = Countdown(template="qwen-instruct").make(numbers, target).prompt
    assert qwen.startswith("<|im_start|>system\n") and qwen.endswith("<|im_start|>assistant\nLet me solve this step by step.\n")
    assert Countdown().make(numbers, target).answer == {"target": 22, "numbers": [3, 5, 7]}


def test_countdown_bad_options():
    for kwargs in [{"template": "nope"}, {"num_numbers": 9}, {"number_range": (0, 5)}, {"num_numbers": "x"},
                   {"target_range": (9, 1)}]:
        with pytest.raises(UserError):
            Countdown(**kwargs)
    assert Countdown(num_numbers="3-4").num_numbers == (3, 4)
    with pytest.raises(UserError, match="distinct"):
        Countdown(num_numbers=2, number_range=(1, 2), target_range=(1, 4)).generate(50, seed=0)


# ---------------- multiply ----------------

@FAST
@given(a=st.integers(0, 10**5), b=st.integers(0, 10**5))
def test_multiply_solver_solutions_score_one(a, b):
    problem = MULTIPLY.make(a, b)
    trace = MULTIPLY.solve(problem)
    assert MULTIPLY.score(problem, trace.thinking + "</think>" + trace.answer).reward == 1.0
    for x, y, z in re.findall(r"(\d+)\*(\d+)=(\d+)", trace.thinking):
        assert int(x) * int(y) == int(z)
    for terms, total in re.findall(r"^(\d+(?:\+\d+)+)=(\d+)", trace.thinking, re.MULTILINE):
        assert sum(map(int, terms.split("+"))) == int(total)
    assert trace.thinking.endswith(f"={a * b}=={a * b}")


def test_multiply_trace_example():
    trace = MULTIPLY.solve(MULTIPLY.make(123, 45))
    assert trace.thinking == "123*5=615\n123*40=4920\n615+4920=5535\n45*3=135\n45*20=900\n45*100=4500\n135+900+4500=5535==5535"
    assert trace.answer == "<answer>5535</answer>"


def test_multiply_scoring():
    p = MULTIPLY.make(123, 45)
    cases = [("<answer>5535</answer>", 1.0), ("<answer> 5535 </answer>", 1.0), ("<answer>5536</answer>", 0.1),
             ("<answer>-5535</answer>", 0.1), ("<answer>1</answer><answer>5535</answer>", 1.0),
             ("<answer>5535</answer><answer>1</answer>", 0.1), ("<answer>55.35</answer>", 0.0),
             ("<answer>abc</answer>", 0.0), ("<answer>123*45</answer>", 0.0), ("5535", 0.0), ("", 0.0)]
    for completion, expected in cases:
        assert MULTIPLY.score(p, completion).reward == expected, completion


def test_multiply_distributions():
    task = Multiply(tinyzero_distribution=True)
    ops = [x for p in task.generate(3000, seed=0) for x in (p.meta["a"], p.meta["b"])]
    assert all(0 <= x <= 999 for x in ops)
    share_small = sum(x <= 99 for x in ops) / len(ops)  # 1/3 + 2/3 * 100/1000 = 0.4
    assert abs(share_small - 0.4) < 0.03
    for p in Multiply(digits=4).generate(200, seed=1):
        assert len(str(p.meta["a"])) == len(str(p.meta["b"])) == 4
    assert {len(str(p.meta["a"])) for p in Multiply(digits="1-2").generate(300, seed=1)} == {1, 2}
    assert [p.to_dict() for p in task.generate(50, 3)] == [p.to_dict() for p in task.generate(50, 3)]
    ps = task.generate(500, seed=2)
    assert len({(p.meta["a"], p.meta["b"]) for p in ps}) == 500
    # TinyZero rows carry no meta: the solver reads the operands from the prompt
    base = Multiply(template="base").make(12, 34)
    assert Multiply().solve(Problem(base.id, "multiply", base.prompt, 408)).answer == "<answer>408</answer>"


# ---------------- scoring never raises or hangs ----------------

ADVERSARIAL = ["<answer>" * 5000, "(" * 20000, "<answer>" + "9" * 5000 + "</answer>",
               "<answer>" + "9**9**9**9" + "</answer>", "<answer>" + "-" * 600 + "1</answer>",
               "<answer>" + "(" * 250 + "1" + ")" * 250 + "</answer>", "<answer>" + "1+" * 300 + "1</answer>",
               "<answer>" + "99999999*" * 50 + "9</answer>", "<answer>1/0</answer>" * 1000,
               "<answer>" + "(1/3)*" * 80 + "1</answer>"]


def _timed_score(task, problem, text):
    t0 = time.perf_counter()
    task.score(problem, text)
    return time.perf_counter() - t0


@pytest.mark.parametrize("task", [COUNTDOWN, MULTIPLY], ids=["countdown", "multiply"])
def test_adversarial_completions_are_fast(task):
    problem = task.generate(1, seed=0)[0]
    for text in ADVERSARIAL:
        assert _timed_score(task, problem, text) < 0.05


@settings(max_examples=150, deadline=None)
@given(text=st.one_of(st.text(max_size=400),
                      st.text(alphabet="<answer>/()+-*0123456789 .\n", max_size=400),
                      st.builds(lambda s: f"<answer>{s}</answer>", st.text(alphabet="()+-*/0123456789 .", max_size=300))))
def test_random_strings_never_raise_and_are_fast(text):
    for task in (COUNTDOWN, MULTIPLY):
        problem = task.make([3, 5, 7], 22) if task is COUNTDOWN else task.make(123, 45)
        assert _timed_score(task, problem, text) < 0.05


# ---------------- problems round trip ----------------

@pytest.mark.parametrize("task", [COUNTDOWN, MULTIPLY, Countdown(template="base", num_numbers=4)])
def test_problem_dict_round_trip(task):
    for p in task.generate(20, seed=3):
        again = Problem.from_dict(json.loads(json.dumps(p.to_dict())))
        assert again == p and set(p.to_dict()) == {"id", "task", "prompt", "answer", "meta"}


def test_unknown_task_lists_known_ones():
    with pytest.raises(UserError, match="countdown, multiply, math"):
        get_task("sudoku")
    with pytest.raises(UserError, match="bad option"):
        get_task("countdown", colour="red")


# ---------------- math ----------------

@pytest.fixture
def math_file(tmp_path):
    rows = [{"problem": "Half of one?", "answer": "\\frac{1}{2}"}, {"problem": "2+2?", "answer": "4"},
            {"problem": "Roots of x^2-1?", "answer": "\\{-1, 1\\}"}, {"id": "p4", "problem": "Pi?", "answer": "\\pi"}]
    path = tmp_path / "math.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_math_generate_and_score(math_file):
    task = get_task("math", path=str(math_file))
    problems = task.generate(4, seed=0)
    assert [p.to_dict() for p in problems] == [p.to_dict() for p in task.generate(4, seed=0)]
    by_answer = {p.answer: p for p in problems}
    assert set(by_answer) == {"\\frac{1}{2}", "4", "\\{-1, 1\\}", "\\pi"}
    assert by_answer["\\pi"].id == "p4" and "\\boxed{}" in by_answer["4"].prompt
    cases = [("\\frac{1}{2}", "so it is \\boxed{0.5}", 1.0), ("\\frac{1}{2}", "\\boxed{\\dfrac{1}{2}}", 1.0),
             ("\\frac{1}{2}", "\\boxed{\\frac{1}{3}}", 0.1), ("4", "<answer>4</answer>", 1.0),
             ("4", "\\boxed{5} then \\boxed{4}", 1.0), ("4", "\\boxed{4} then \\boxed{5}", 0.1),
             ("4", "the answer is 4", 0.0), ("\\{-1, 1\\}", "\\boxed{\\{1,-1\\}}", 1.0), ("\\pi", "\\boxed{\\pi}", 1.0),
             ("4", "\\boxed{{4}}", 1.0), ("4", "\\boxed{4", 0.0)]
    for answer, completion, expected in cases:
        assert task.score(by_answer[answer], completion).reward == expected, (answer, completion)
    assert task.solve(problems[0]) is None


def test_math_errors(math_file, tmp_path):
    with pytest.raises(UserError, match="no such file"):
        get_task("math", path=str(tmp_path / "missing.jsonl")).generate(1, 0)
    with pytest.raises(UserError, match="answer_field"):
        get_task("math", path=str(math_file), answer_field="solution").generate(1, 0)
    with pytest.raises(UserError, match="holds 4"):
        get_task("math", path=str(math_file)).generate(5, 0)


def test_math_from_datasets_dir(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"question": ["1+1?"], "final": ["2"]}).save_to_disk(str(tmp_path / "ds"))
    task = get_task("math", path=str(tmp_path / "ds"), problem_field="question", answer_field="final")
    (p,) = task.generate(1, seed=0)
    assert p.prompt.startswith("1+1?") and task.score(p, "\\boxed{2}").correct


@settings(max_examples=15, deadline=None)
@given(text=st.text(alphabet=string.printable, max_size=80))
def test_math_random_strings_never_raise(text):
    task = get_task("math", path="unused")
    task.score(Problem("m", "math", "q", "\\frac{1}{2}"), f"\\boxed{{{text}}}")
    task.score(Problem("m", "math", "q", "\\frac{1}{2}"), text)


# ---------------- data generate / score ----------------

def test_data_generate_and_score(tmp_path):
    out = tmp_path / "p.jsonl"
    summary = data_problems.generate("countdown", 20, 0, out, data_problems.parse_options(["num_numbers=3-4"]))
    assert summary["n"] == 20
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [p.to_dict() for p in Countdown(num_numbers=(3, 4)).generate(20, seed=0)]
    # completions: the solver's for even rows, a wrong answer for odd rows, nothing for every fifth
    for i, r in enumerate(rows):
        trace = COUNTDOWN.solve(Problem.from_dict(r))
        r["completion"] = (trace.thinking + "</think>" + trace.answer if i % 2 == 0 else "<answer>1+1</answer>")
        if i % 5 == 4:
            r["completion"] = "I give up"
    inp = tmp_path / "c.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    scored_path = tmp_path / "s.jsonl"
    result = data_problems.score("countdown", inp, scored_path)
    assert result["n"] == 20 and result["skipped"] == 0
    correct = sum(1 for i in range(20) if i % 2 == 0 and i % 5 != 4)  # 8
    formatted = sum(1 for i in range(20) if i % 5 != 4)  # 16
    assert result["accuracy"] == correct / 20 and result["format_rate"] == formatted / 20
    assert result["mean_reward"] == pytest.approx((correct * 1.0 + (formatted - correct) * 0.1) / 20)
    scored = [json.loads(line) for line in scored_path.read_text().splitlines()]
    assert [s["reward"] for s in scored][:3] == [1.0, 0.1, 1.0] and scored[4]["formatted"] is False

    # a malformed line names file and line; --skip-bad skips and counts it
    lines = inp.read_text().splitlines()
    lines[2] = "{not json"
    inp.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=re.escape(f"{inp}:3:")):
        data_problems.score("countdown", inp, None)
    result = data_problems.score("countdown", inp, None, skip_bad=True)
    assert result["skipped"] == 1 and result["n"] == 19

    # a line without a completion is an error naming the record
    del rows[0]["completion"]
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UserError, match="record 1 lacks completion"):
        data_problems.score("countdown", inp, None)
    with pytest.raises(UserError, match="known tasks"):
        data_problems.generate("sudoku", 3, 0, tmp_path / "x.jsonl", {})


@pytest.mark.parametrize("name", ["countdown", "multiply"])
def test_train_and_test_splits_are_disjoint(name):
    train = {p.id for p in get_task(name, split="train").generate(1500, seed=0)}
    test = {p.id for p in get_task(name, split="test").generate(150, seed=1)}
    assert len(test) == 150 and not train & test


def test_countdown_refuses_more_problems_than_exist_at_once():
    """The space is counted up front: all of it can be drawn, one more is refused before any draw (the up-front
    message says "exist"; running out while drawing says "found only")."""
    task = get_task("countdown", num_numbers=2, number_range=[1, 3], target_range=[1, 10])
    size = task.space_size()
    problems = task.generate(size, seed=0)  # every problem of the space, each once
    assert len({(tuple(p.answer["numbers"]), p.answer["target"]) for p in problems}) == size
    with pytest.raises(UserError, match=f"only {size} distinct solvable problems exist"):
        task.generate(size + 1, seed=0)
    assert get_task("countdown").space_size() == 14_261  # 3 numbers in 1-10, targets 1-100: the split sizes sum to it
    assert sum(get_task("countdown", split=s).space_size() for s in ("pretrain", "train", "test")) == 14_261
