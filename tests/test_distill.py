"""Teachers: the task solver, a local model through the engine, and an OpenAI-compatible endpoint (a real
`budgetthink serve` on 127.0.0.1); append-only output, resume after a crash or Ctrl-C, retries on 429."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_serve import Server  # `budgetthink serve` under uvicorn on a free loopback port

from budgetthink.data.distill import _ask, _retry_after, distill, parse_teacher, split_thinking
from budgetthink.engine import Budget, Sampling
from budgetthink.errors import UserError
from budgetthink.formats import get_format
from budgetthink.jsonl import read_jsonl
from budgetthink.tasks import Problem, get_task

FMT = get_format("tinyzero")
SRC = Path(__file__).resolve().parent.parent / "src"


def _ids(path) -> Counter:
    return Counter(r["id"] for r in read_jsonl(path))


def test_teacher_spec_and_reply_parsing(tmp_path):
    assert parse_teacher("solver") == ("solver", None)
    assert parse_teacher("model:runs/tiny") == ("model", "runs/tiny")
    assert parse_teacher("openai:http://127.0.0.1:8000/v1") == ("openai", "http://127.0.0.1:8000/v1")
    for bad in ("gpt", "model:", "openai:", "solver:x", ""):
        with pytest.raises(UserError, match=r"solver, model:PATH or openai:BASE_URL"):
            parse_teacher(bad)
    assert split_thinking("<think>a b</think><answer>3</answer>", None, FMT) == ("a b", "<answer>3</answer>")
    assert split_thinking("a b</think>\n\n<answer>3</answer>", None, FMT) == ("a b", "<answer>3</answer>")
    assert split_thinking("<answer>3</answer>", None, FMT) == ("", "<answer>3</answer>")
    assert split_thinking("<answer>3</answer>", "hmm", FMT) == ("hmm", "<answer>3</answer>")
    s1 = get_format("s1")
    assert split_thinking("<|im_start|>think\nx y\n<|im_start|>answer\nAnswer: 42", None, s1) == ("x y", "42")
    def resp(headers):
        return SimpleNamespace(response=SimpleNamespace(headers=headers))

    assert _retry_after(resp({"retry-after": "3"})) == 3.0
    assert _retry_after(resp({"retry-after-ms": "250"})) == 0.25
    assert _retry_after(resp({})) is None
    with pytest.raises(UserError, match="model-name"):
        distill("countdown", "openai:http://127.0.0.1:9/v1", 2, "/nonexistent/x.jsonl")
    env = "BUDGETTHINK_TEST_NO_SUCH_KEY"
    with pytest.raises(UserError, match=env):
        distill("countdown", "openai:https://api.example.com/v1", 2, str(tmp_path / "never-written.jsonl"),
                model_name="m",
                api_key_env=env)


def test_openai_reply_keeps_the_reported_reasoning_tokens_even_when_zero():
    import asyncio

    from openai.types.chat import ChatCompletion

    task = get_task("countdown")
    p = task.make([3, 5, 7], 22)

    def reply(reasoning_tokens):
        usage = {"prompt_tokens": 9, "completion_tokens": 20, "total_tokens": 29}
        if reasoning_tokens is not None:
            usage["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
        done = ChatCompletion.model_validate({
            "id": "x", "object": "chat.completion", "created": 0, "model": "m", "usage": usage,
            "choices": [{"index": 0, "finish_reason": "stop", "message": {
                "role": "assistant", "content": "<think>3*5=15</think><answer>(3*5)+7</answer>"}}]})

        async def create(**kwargs):
            return done
        return SimpleNamespace(chat=SimpleNamespace(completions=SimpleNamespace(create=create)))

    def ask(client, count):
        return asyncio.run(_ask(client, task, p, "openai:x", "m", FMT, Sampling(max_tokens=32), None, 0, 0.0, 0.0,
                                0.0, 0.0, count, {}, None))

    assert ask(reply(0), lambda text: 99)["thinking_tokens"] == 0  # a report of 0 is kept, not recounted
    assert ask(reply(4), lambda text: 99)["thinking_tokens"] == 4
    assert ask(reply(None), lambda text: len(text))["thinking_tokens"] == 6  # nothing reported: counted


def test_solver_teacher_writes_correct_traces(tmp_path):
    for task in ("countdown", "multiply"):
        out = tmp_path / f"{task}.jsonl"
        summary = distill(task, "solver", 25, out, seed=3)
        lines = read_jsonl(out)
        assert summary["written"] == 25 and summary["correct"] == 25 and len(lines) == 25
        t = get_task(task)
        for r in lines:
            assert set(r) >= {"id", "task", "problem", "thinking", "answer", "teacher", "reward", "correct",
                              "thinking_tokens", "usage", "cost"}
            p = Problem.from_dict(r["problem"])
            assert r["id"] == p.id and r["teacher"] == "solver" and r["error"] is None
            assert r["thinking"] and r["correct"] and r["reward"] == 1.0
            assert t.score(p, r["answer"]).correct  # an independent re-score of the written answer
        assert max(_ids(out).values()) == 1


def test_solver_teacher_writes_traces_under_stated_budgets(tmp_path):
    out = tmp_path / "stated.jsonl"
    distill("countdown", "solver", 40, out, seed=3, stated_budgets=[16, 128])
    lines = read_jsonl(out)
    task = get_task("countdown")
    assert {r["budget"] for r in lines} == {16, 128}
    seen = Counter()
    for r in lines:
        p = Problem.from_dict(r["problem"])
        assert len(r["thinking"]) <= r["budget"] and r["thinking_chars"] == len(r["thinking"])
        full = task.solve(p).thinking
        assert full.startswith(r["thinking"])  # the solver's own trace, cut
        t = r["problem"]["answer"]["target"]
        if re.search(rf"={t}=={t}(?!\d)", r["thinking"]):  # the cut kept the hit's whole check: the solution
            assert r["correct"]
            seen["hit"] += 1
        elif "<" in r["thinking"] or ">" in r["thinking"]:  # else the last attempt checked, a miss
            assert not r["correct"]
            seen["miss"] += 1
    assert seen["hit"] and seen["miss"], seen  # both branches were checked
    assert [r["budget"] for r in lines] == [r["budget"] for r in read_jsonl(
        distill("countdown", "solver", 40, tmp_path / "again.jsonl", seed=3, stated_budgets=[16, 128])["out"])]
    with pytest.raises(UserError, match="--teacher solver"):
        distill("countdown", "model:x", 4, tmp_path / "m.jsonl", stated_budgets=[16])
    with pytest.raises(UserError, match="countdown"):
        distill("multiply", "solver", 4, tmp_path / "x.jsonl", stated_budgets=[16])


def test_resume_after_a_crash_redoes_the_half_written_line(tmp_path):
    out = tmp_path / "traces.jsonl"
    distill("countdown", "solver", 20, out, seed=1)
    lines = out.read_text().splitlines(keepends=True)
    # a crash mid-write: 12 whole lines, then half of the 13th (no newline)
    out.write_text("".join(lines[:12]) + lines[12][: len(lines[12]) // 2])
    summary = distill("countdown", "solver", 20, out, seed=1)
    assert summary["skipped"] == 12 and summary["written"] == 8 and summary["repaired_bytes"] > 0
    ids = _ids(out)
    assert len(ids) == 20 and set(ids.values()) == {1}
    assert json.loads(lines[12])["id"] in ids
    again = distill("countdown", "solver", 20, out, seed=1)  # nothing left to do
    assert again["written"] == 0 and again["skipped"] == 20 and len(read_jsonl(out)) == 20


def test_model_teacher_uses_the_engine_with_budgets(tmp_path, tiny_model_dir, one_thread):
    out = tmp_path / "m.jsonl"
    budget = Budget(max_thinking_tokens=6, max_answer_tokens=8)
    summary = distill("countdown", f"model:{tiny_model_dir}", 5, out, budget=budget, concurrency=2,
                      sampling=Sampling(temperature=0.0, max_tokens=32), price_in=1.0, price_out=2.0)
    lines = read_jsonl(out)
    assert summary["written"] == 5 and len(lines) == 5
    task = get_task("countdown")
    for r in lines:
        assert r["teacher"] == f"model:{tiny_model_dir}" and r["thinking_tokens"] <= 6
        assert r["correct"] == task.score(Problem.from_dict(r["problem"]), r["answer"]).correct
        u = r["usage"]
        assert u["completion_tokens"] >= r["thinking_tokens"] and u["prompt_tokens"] > 0
        assert r["cost"] == pytest.approx((u["prompt_tokens"] * 1.0 + u["completion_tokens"] * 2.0) / 1e6)
    with pytest.raises(UserError, match="not found"):
        distill("countdown", f"model:{tmp_path / 'missing'}", 2, tmp_path / "x.jsonl")


# ---- the openai teacher against a real `budgetthink serve` ----------------------------------------------
@pytest.fixture(scope="module")
def server(tiny_model_dir, one_thread):
    from budgetthink.engine import load_engine
    from budgetthink.serve import create_app

    # max_queue=1: with 8 requests in flight most are refused with 429 until the one queued slot frees up
    app = create_app(load_engine(str(tiny_model_dir)), "tiny", FMT, max_batch=8, max_queue=1)
    with Server(app) as s:
        yield s


FAST_RETRY = {"retries": 200, "backoff": 0.01, "max_backoff": 0.05}
BUDGET = Budget(max_thinking_tokens=6, max_answer_tokens=8)
SAMPLING = Sampling(temperature=0.0, max_tokens=24)


def test_openai_teacher_retries_refused_requests(tmp_path, server):
    out = tmp_path / "o.jsonl"
    summary = distill("countdown", f"openai:{server.url}/v1", 12, out, model_name="tiny", concurrency=8, budget=BUDGET,
                      sampling=SAMPLING, price_in=1.0, price_out=2.0, **FAST_RETRY)
    assert summary["retry_reasons"].get("HTTP 429", 0) > 0, summary  # the full queue did refuse requests ...
    assert summary["failed"] == 0 and summary["written"] == 12  # ... and every one was retried, none skipped
    ids = _ids(out)
    assert len(ids) == 12 and set(ids.values()) == {1}
    for r in read_jsonl(out):
        assert r["error"] is None and r["model"] == "tiny"
        # serve reports the sampled thinking tokens; the budget caps them
        assert r["thinking_tokens"] == r["usage"]["reasoning_tokens"] <= 6
        u = r["usage"]
        assert r["cost"] == pytest.approx((u["prompt_tokens"] * 1.0 + u["completion_tokens"] * 2.0) / 1e6)
    with pytest.raises(UserError, match="404"):  # a wrong model name fails at once, not once per problem
        distill("countdown", f"openai:{server.url}/v1", 3, tmp_path / "x.jsonl", model_name="nope", **FAST_RETRY)


def test_openai_teacher_refusals_are_error_lines_until_retried(tmp_path, server):
    out = tmp_path / "e.jsonl"
    # 100000 tokens exceed the tiny model's context: the server answers 400 for each problem
    summary = distill("countdown", f"openai:{server.url}/v1", 3, out, model_name="tiny",
                      sampling=Sampling(max_tokens=100_000), **FAST_RETRY)
    lines = read_jsonl(out)
    assert summary["errors"] == 3 and all(r["error"].startswith("HTTP 400") for r in lines)
    assert distill("countdown", f"openai:{server.url}/v1", 3, out, model_name="tiny", **FAST_RETRY)["written"] == 0
    summary = distill("countdown", f"openai:{server.url}/v1", 3, out, model_name="tiny", sampling=SAMPLING,
                      budget=BUDGET, retry_errors=True, **FAST_RETRY)
    lines = read_jsonl(out)
    assert summary["written"] == 3 and len(lines) == 3 and all(r["error"] is None for r in lines)


def test_openai_teacher_resumes_after_ctrl_c_and_a_crash(tmp_path, server):
    out = tmp_path / "i.jsonl"
    n = 100  # enough that the run cannot finish before the Ctrl-C lands, even on a loaded machine
    script = (
        "from budgetthink.data.distill import distill\n"
        "from budgetthink.engine import Budget, Sampling\n"
        f"distill('countdown', 'openai:{server.url}/v1', {n}, {str(out)!r}, model_name='tiny', concurrency=4,\n"
        "        budget=Budget(max_thinking_tokens=6, max_answer_tokens=8), sampling=Sampling(temperature=0.0, "
        "max_tokens=24), retries=200, backoff=0.01, max_backoff=0.05)\n")
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "BUDGETTHINK_NO_PROGRESS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while (not out.exists() or out.read_text().count("\n") < 5) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)  # Ctrl-C with requests in flight
    _, err = proc.communicate(timeout=60)
    text = out.read_text()
    done = text.count("\n")
    assert 5 <= done < n, (done, err.decode()[-2000:])
    assert text.endswith("\n")  # every result written is a whole line
    before = _ids(out)
    assert len(before) == done and set(before.values()) == {1}
    # then a hard crash in the middle of a write: half a line for a problem that is not done yet
    todo = [p for p in get_task("countdown").generate(n, 0) if p.id not in before]
    with open(out, "a") as f:
        f.write(json.dumps({"id": todo[0].id, "task": "countdown", "thinking": "cut off"})[:25])
    summary = distill("countdown", f"openai:{server.url}/v1", n, out, model_name="tiny", concurrency=8, budget=BUDGET,
                      sampling=SAMPLING, **FAST_RETRY)
    assert summary["skipped"] == done and summary["written"] == n - done and summary["repaired_bytes"] > 0
    ids = _ids(out)
    assert len(ids) == n and set(ids.values()) == {1}
    assert all(r["error"] is None and r["thinking_tokens"] <= 6 for r in read_jsonl(out))
