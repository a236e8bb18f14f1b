"""`budgetthink generate`: scored samples as JSON lines (the function behind the command)."""

import json

import pytest

from budgetthink.engine import Budget, Sampling
from budgetthink.errors import UserError
from budgetthink.generate import run
from budgetthink.tasks import get_task
from budgetthink.tiny import init_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread (see conftest.py)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("random-test-model")
    model, tok = init_model("test", seed=0)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_json_lines_hold_prompt_completion_and_score(model_dir, capsys):
    budget = Budget(max_thinking_tokens=6, max_answer_tokens=5)
    records = run(str(model_dir), "countdown", n=3, seed=0, budget=budget, sampling=Sampling(max_tokens=40),
                  fmt="tinyzero", json_out=True, samples=2)
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert lines == records and len(lines) == 6
    task = get_task("countdown")
    problems = task.generate(3, 0)
    for i, r in enumerate(lines):
        p = problems[i // 2]
        assert r["problem_id"] == p.id and r["sample"] == i % 2
        assert r["prompt"] == p.prompt + "<think>"
        assert r["thinking_tokens"] <= 6 and r["answer_tokens"] <= 5
        assert r["finish_reason"] in ("stop", "length", "forced")
        assert len(r["token_ids"]) == len(r["logprobs"]) == len(r["sampled"])
        score = task.score(p, r["text"])
        assert (r["reward"], r["correct"], r["formatted"]) == (score.reward, score.correct, score.formatted)
    again = run(str(model_dir), "countdown", n=3, seed=0, budget=budget, sampling=Sampling(max_tokens=40),
                json_out=True, samples=2)
    assert [r["token_ids"] for r in again] == [r["token_ids"] for r in records]  # seeded


def test_readable_view_and_bad_input(model_dir, capsys):
    run(str(model_dir), "countdown", n=2, seed=1, budget=None, sampling=Sampling(max_tokens=10))
    out = capsys.readouterr().out
    assert "2 samples: accuracy" in out and "reward" in out
    with pytest.raises(UserError, match="not found"):
        run(str(model_dir / "missing"), "countdown", n=1, seed=0, budget=None, sampling=Sampling())
    with pytest.raises(UserError, match="unknown think format"):
        run(str(model_dir), "countdown", n=1, seed=0, budget=None, sampling=Sampling(), fmt="nope")
