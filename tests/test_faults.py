"""Faults and hostile input: bounded scorers, resume after kills, one error path for the CLI, no output lost.

Scorers: a hypothesis fuzz over every scorer (10,200 cases: 3,400 adversarial completions x 3 scorers, none over 50 ms of CPU), the linear
`last_boxed` against the old quadratic scan, and the hard per-completion limit from a thread and from a
daemonic worker process.
"""

import gc
import json
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from budgetthink.tasks import Problem, Score, get_task
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
        assert (reward, correct, reason) == (0.0, False, "timeout") and took < 1.5
        assert pool.apply(_score_math, ("\\boxed{2/4}", 5.0))[:3] == (1.0, True, None)


def test_rl_metrics_count_timeouts():
    from budgetthink.train.rl import rollout_metrics

    def roll(reason):
        score = Score(0.0, False, True, "x", reason=reason)
        return SimpleNamespace(reward=0.0, score=score, truncated=False,
                               completion=SimpleNamespace(sampled=[1, 1, 0]))

    m = rollout_metrics([roll("timeout"), roll(None), roll("timeout"), roll(None)], n=2)
    assert m["score_timeouts"] == 2 and m["tokens_generated"] == 8


# ---------------- resume after kills ----------------

def share_of_digits(self, problem, completion):
    """Stand-in verifier that varies within groups (the tiny model never writes an answer tag)."""
    share = sum(c.isdigit() for c in completion) / max(len(completion), 1)
    return Score(reward=share, correct=share > 0.2, formatted=True, extracted=completion[:4])


@pytest.fixture
def rl_digits(monkeypatch, one_thread):
    from budgetthink.train import rl

    real = rl._data

    def data(cfg):
        task, train, held = real(cfg)
        task.score = share_of_digits.__get__(task)
        return task, train, held

    monkeypatch.setattr(rl, "_data", data)
    return rl


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def _arm(point: str, step: int, monkeypatch) -> None:
    """In a forked child: SIGKILL this process at `point` of `step` (a kill -9 at exactly that moment)."""
    import shutil

    from budgetthink.train import common, rl

    if point == "after_metrics_line":  # the line is on disk, the checkpoint after it is not
        real_append = common.MetricsLog.append
        monkeypatch.setattr(common.MetricsLog, "append",
                            lambda self, r: (real_append(self, r), r["step"] == step and _die()))
    elif point == "after_eval_line":  # eval.jsonl has the step, metrics.jsonl does not yet
        real_eval = rl.append_jsonl
        monkeypatch.setattr(rl, "append_jsonl", lambda p, r: (real_eval(p, r), r["step"] == step and _die()))
    elif point == "torn_state_file":  # inside the checkpoint write: state.pt half on disk
        real_save = common.torch.save

        def save(obj, path):
            real_save(obj, path)
            if obj.get("step") == step:
                data = Path(path).read_bytes()
                Path(path).write_bytes(data[:len(data) // 2])
                _die()

        monkeypatch.setattr(common.torch, "save", save)
    elif point == "before_rename":  # inside the checkpoint write: every file and the manifest written
        real_fsync = common._fsync_tree
        monkeypatch.setattr(common, "_fsync_tree",
                            lambda root: (real_fsync(root), root.name.endswith(f"step_{step:08d}-{os.getpid()}")
                                          and _die()))
    elif point == "while_pruning":  # the new checkpoint in place, the old one half deleted
        real_rmtree = shutil.rmtree

        def rmtree(path, *a, **k):
            if Path(path).name.startswith("step_"):
                real_rmtree(Path(path) / "model")
                _die()
            real_rmtree(path, *a, **k)

        monkeypatch.setattr(common.shutil, "rmtree", rmtree)
    elif point == "while_rewinding":  # on resume: metrics.jsonl cut back, eval.jsonl not yet
        real_write = common.write_jsonl
        monkeypatch.setattr(common, "write_jsonl", lambda p, rs: (real_write(p, rs), _die()))
    else:
        raise ValueError(point)


def _killed_at(rl, cfg, out: Path, point: str, step: int) -> None:
    """Resume the run in `out` in a forked child that is killed at `point`; the child must die there."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            mp = pytest.MonkeyPatch()
            _arm(point, step, mp)
            rl.train(cfg, out, resume=True)
        finally:
            os._exit(3)  # reached only if the kill point was never hit
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"{point}@{step}: status {status}"


# kill points in order, each hit by a resume of the previous one's leftovers (save_every=2, keep_checkpoints=2);
# between two of them the newest checkpoint (step 4) is damaged, so the next resume falls back to step 2
KILLS = [("after_metrics_line", 1), ("after_metrics_line", 2), ("torn_state_file", 2), ("before_rename", 2),
         ("after_eval_line", 4), ("while_rewinding", 0), ("before_rename", 4), ("after_metrics_line", 5),
         ("damage_newest_checkpoint", 4), ("while_pruning", 6)]


def test_rl_resume_after_kills_everywhere_matches_an_uninterrupted_run(tiny_model_dir, tmp_path, rl_digits):
    """Nine kill -9s (before the first checkpoint, inside checkpoint writes, while pruning, while rewinding the
    logs on a resume) and a damaged newest checkpoint, each run resumed: the logs hold every step exactly once
    and equal, with the final weights, those of a run never killed."""
    from safetensors.torch import load_file

    from budgetthink.config import load_config

    rl = rl_digits
    cfg = load_config(rl.RLConfig, None, [
        f"model={tiny_model_dir}", "prompts_per_step=2", "n=4", "max_response_tokens=12", "train_size=40",
        "eval_size=4", "eval_every=2", "eval_max_tokens=12", "micro_batch_size=4", "optim.lr=1e-3", "max_steps=6",
        "save_every=2", "keep_checkpoints=2", "ppo_epochs=2", "mini_batch_size=4", "optim.schedule=cosine"])
    whole = tmp_path / "whole"
    rl.train(cfg, whole)
    out = tmp_path / "killed"
    for point, step in KILLS:
        if point == "damage_newest_checkpoint":
            weights = out / "checkpoints" / f"step_{step:08d}" / "model" / "model.safetensors"
            weights.write_bytes(weights.read_bytes()[:1000])
        else:
            _killed_at(rl, cfg, out, point, step)
    rl.train(cfg, out, resume=True)

    timing = {"generate_s", "train_s", "step_s"}
    lines = lambda d, name: [{k: v for k, v in json.loads(x).items() if k not in timing}
                             for x in (d / name).read_text().splitlines()]
    assert [r["step"] for r in lines(out, "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in lines(out, "eval.jsonl")] == [0, 2, 4, 6]
    assert lines(out, "metrics.jsonl") == lines(whole, "metrics.jsonl")
    assert lines(out, "eval.jsonl") == lines(whole, "eval.jsonl")
    a, b = load_file(whole / "model" / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Payload:
    """What a hostile state.pt could hold: unpickling it runs a command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_resume_falls_back_past_damaged_checkpoints_and_never_unpickles_code(tiny_model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from budgetthink.errors import UserError
    from budgetthink.train import common

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for step in (2, 4, 6, 8):
        common.save_checkpoint(tmp_path, step, model, None, {"rng": common.rng_state(), "x": step}, keep=4)
    ckpt = lambda s: tmp_path / "checkpoints" / f"step_{s:08d}"
    assert all(common.check_checkpoint(ckpt(s)) is None for s in (2, 4, 6, 8))
    found, state = common.resume_point(tmp_path)
    assert found == ckpt(8) and state["x"] == 8 and state["step"] == 8
    common.set_rng_state(state["rng"])  # RNG state survives the plain-types round trip

    weights = ckpt(8) / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # a copy cut short
    raw = bytearray((ckpt(6) / "state.pt").read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte, same size
    (ckpt(6) / "state.pt").write_bytes(bytes(raw))
    marker = tmp_path / "pwned"
    torch.save({"step": 4, "x": Payload(marker)}, ckpt(4) / "state.pt")  # hostile, with a matching manifest
    (ckpt(4) / common.MANIFEST).unlink()
    common._write_manifest(ckpt(4))
    found, state = common.resume_point(tmp_path)
    assert found == ckpt(2) and state["x"] == 2
    assert not marker.exists()
    err = capsys.readouterr().err
    assert "step_00000008 is damaged (model/model.safetensors has" in err
    assert "step_00000006 is damaged (state.pt does not match its checksum)" in err
    assert "step_00000004 is damaged (state.pt does not load safely" in err

    (ckpt(2) / common.MANIFEST).unlink()
    with pytest.raises(UserError, match=r"no intact checkpoint in .*step_00000002: no manifest.json"):
        common.resume_point(tmp_path)
    assert not marker.exists()
