"""Faults and hostile input: bounded scorers, resume after kills, one error path for the CLI, no output lost.

Scorers: a hypothesis fuzz over every scorer (10,200 cases: 3,400 adversarial completions x 3 scorers, none over 50 ms of CPU), the linear
`last_boxed` against the old quadratic scan, and the hard per-completion limit from a thread and from a
daemonic worker process.
"""

import gc
import multiprocessing
import threading
import time
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from budgetthink.tasks import Problem, get_task
from budgetthink.tasks.math import last_boxed

# ---------------- scorers ----------------

# pieces that trip parsers: unclosed and nested groups, tags, operators TinyZero's rules reject, huge numbers
FRAGMENTS = ["\\boxed{", "\\boxed ", "\\fbox{", "{", "}", "<answer>", "</answer>", "<answer", "</think>", "(", ")",
             "+", "-", "*", "/", "**", "//", "^", "^{", "9", "0", "1", "22", " ", "\n", "\\frac{1}{2}", "\\sqrt{",
             "x", "=", ".", "e", "1e308", "9" * 50, "\x00", "\u200b", "é", "ﾟ", "\\", "$", "\\left(", "\\right)"]
piece = st.sampled_from(FRAGMENTS) | st.text(max_size=3)
mixed = st.lists(piece, max_size=40).map("".join)
repeated = st.tuples(st.sampled_from(FRAGMENTS), st.integers(0, 8000)).map(lambda t: t[0] * t[1])  # the 56 KB of 8,000 `\\boxed{` and beyond
completions = st.one_of(mixed, repeated, st.tuples(repeated, mixed, repeated).map("".join))
WRAPPED = st.one_of(completions, completions.map(lambda s: f"<answer>{s}</answer>"),
                    completions.map(lambda s: f"\\boxed{{{s}}}"))
def fuzz(n: int):
    return settings(max_examples=n, deadline=None, database=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))
COUNTDOWN = get_task("countdown")
MULTIPLY = get_task("multiply")
MATH = get_task("math", path="unused", time_limit=0.01)  # a tight limit: each case stays under 50 ms
PROBLEMS = {"countdown": COUNTDOWN.make([3, 5, 7], 22), "multiply": MULTIPLY.make(123, 45),
            "math": Problem("m", "math", "q", "\\frac{1}{2}")}


def _check_bounded(task, completion: str, wall_limit: float = 0.05) -> None:
    gc.disable()  # a collection of the test's own garbage (hypothesis makes plenty) is not the scorer's time
    try:
        t0, c0 = time.perf_counter(), time.thread_time()
        s = task.score(PROBLEMS[task.name], completion)
        cpu, wall = time.thread_time() - c0, time.perf_counter() - t0
    finally:
        gc.enable()
    what = f"{task.name} on {completion[:60]!r} ({len(completion)} chars)"
    assert cpu < 0.05, f"{what}: {cpu * 1000:.0f} ms of CPU"
    assert wall < wall_limit, f"{what}: {wall * 1000:.0f} ms"
    assert s.reward in (task.correct_reward, task.format_reward, task.none_reward, 0.0)
    assert s.correct == (s.reward == task.correct_reward) or s.reason == "timeout"
    assert (s.extracted is None) == (not s.formatted) or task.name == "multiply"


@pytest.fixture(scope="module")
def math_worker():
    """The math scorer's worker, started: its start-up (importing sympy) is not a completion's time."""
    assert MATH.score(PROBLEMS["math"], "\\boxed{0.5}").correct


# Each generated completion is scored by all three scorers: 3 x 3,400 = 10,200 cases, each under 50 ms of CPU
# (a quadratic scan shows there; a busy machine's scheduling does not). The math scorer's wall time is its
# worker's deadline (10 ms, killed by ~30 ms); it gets slack for a busy machine, the exact deadline is
# checked below.
@fuzz(3400)
@given(completion=WRAPPED)
def test_every_scorer_bounded(math_worker, completion):
    _check_bounded(COUNTDOWN, completion, wall_limit=1.0)
    _check_bounded(MULTIPLY, completion, wall_limit=1.0)
    _check_bounded(MATH, completion, wall_limit=0.25)


def _last_boxed_quadratic(text: str) -> str | None:
    """The scan `last_boxed` replaced: from every `\\boxed{`, walk to its closing brace."""
    starts = sorted((i for key in ("\\boxed", "\\fbox") for i in range(len(text)) if text.startswith(key, i)),
                    reverse=True)
    for start in starts:
        i = start + (6 if text.startswith("\\boxed", start) else 5)
        while i < len(text) and text[i] == " ":
            i += 1
        if i >= len(text) or text[i] != "{":
            continue
        depth = 0
        for j in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                return text[i + 1:j]
    return None


@fuzz(500)
@given(text=st.lists(st.sampled_from(["\\boxed", "\\fbox", "{", "}", " ", "a", "1", "\\"]), max_size=30).map("".join))
def test_last_boxed_matches_the_quadratic_scan(text):
    assert last_boxed(text) == _last_boxed_quadratic(text)


def test_last_boxed_is_linear():
    # 8,000 unclosed \boxed{ took the old scan 20 s; a linear one does 20,000 (140 KB) in milliseconds
    assert last_boxed("\\boxed{" * 20_000) is None
    assert last_boxed("\\boxed{" * 20_000 + "\\boxed{ \\frac{1}{2} }") == " \\frac{1}{2} "
    assert last_boxed("x \\boxed{1} \\boxed {2} \\boxed{") == "2"
    assert last_boxed("\\boxed{a{b}c} tail }") == "a{b}c"


HANGS = "\\boxed{9^{9^{9^{9}}}}"  # sympy computes a power with ~370 million digits: minutes in one C call


def _score_math(completion: str, limit: float):
    task, problem = get_task("math", path="unused", time_limit=limit), Problem("m", "math", "q", "\\frac{1}{2}")
    assert task.score(problem, "\\boxed{1/2}").correct  # the worker is up: its start-up is not the limit's
    t0 = time.perf_counter()
    s = task.score(problem, completion)
    return s.reward, s.correct, s.reason, time.perf_counter() - t0


def test_math_time_limit_in_a_thread_then_scores_again():
    got = []
    worker = threading.Thread(target=lambda: got.append(_score_math(HANGS, 0.5)))
    worker.start()
    worker.join(timeout=60)
    ((reward, correct, reason, took),) = got
    assert (reward, correct, reason) == (0.0, False, "timeout")
    assert 0.5 <= took < 1.5
    # the stuck worker was replaced: the next completion is scored normally
    assert _score_math("so \\boxed{0.5}", 5.0)[:3] == (1.0, True, None)
    assert _score_math("so \\boxed{1/3}", 5.0)[:3] == (0.1, False, None)


def test_math_time_limit_in_a_daemonic_worker_process():
    with multiprocessing.get_context("spawn").Pool(1) as pool:  # pool workers are daemonic
        reward, correct, reason, took = pool.apply(_score_math, (HANGS, 0.5))
        assert (reward, reason) == (0.0, "timeout") and took < 1.5
        assert pool.apply(_score_math, ("\\boxed{2/4}", 5.0))[:3] == (1.0, True, None)


def test_rl_metrics_count_timeouts():
    from budgetthink.tasks import Score
    from budgetthink.train.rl import rollout_metrics

    def roll(reason):
        score = Score(0.0, False, True, "x", reason=reason)
        return SimpleNamespace(reward=0.0, score=score, truncated=False,
                               completion=SimpleNamespace(sampled=[1, 1, 0]))

    m = rollout_metrics([roll("timeout"), roll(None), roll("timeout"), roll(None)], n=2)
    assert m["score_timeouts"] == 2 and m["tokens_generated"] == 8
