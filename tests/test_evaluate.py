"""Evaluation: s1's metrics, pass@k, majority vote and control on hand-made numbers; the whole `run` on
scripted completions (math task from a hand-made JSONL, scored by math-verify) and on the tiny model."""

import json
import math
import re
from pathlib import Path

import pytest

from budgetthink import evaluate as ev
from budgetthink import report
from budgetthink.engine import Completion
from budgetthink.errors import UserError


# --- pure metrics -----------------------------------------------------------------------------------------
def test_scaling_is_mean_pairwise_slope():
    # slopes: (40-20)/100 = 0.2, (50-20)/300 = 0.1, (50-40)/200 = 0.05  ->  mean 0.35/3
    assert ev.scaling([100, 200, 400], [20, 40, 50]) == pytest.approx(0.35 / 3)
    # negative scaling: -10/100, -30/300, -20/200  ->  -0.1
    assert ev.scaling([100, 200, 400], [50, 40, 20]) == pytest.approx(-0.1)
    # the order of the settings does not matter
    assert ev.scaling([400, 100, 200], [50, 20, 40]) == pytest.approx(0.35 / 3)
    # equal token counts give no slope: only (0,2) 40/100 and (1,2) 20/100 count
    assert ev.scaling([100, 100, 200], [10, 30, 50]) == pytest.approx(0.3)
    assert ev.scaling([100], [10]) is None and ev.scaling([5, 5], [1, 2]) is None
    assert ev.performance([20, 57, 40]) == 57


def test_pass_at_k_hand_computed():
    assert ev.pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert ev.pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert ev.pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)  # C(7,5)=21, C(10,5)=252
    assert ev.pass_at_k(3, 1, 3) == 1.0  # every draw of 3 holds the correct one
    assert ev.pass_at_k(8, 0, 4) == 0.0
    with pytest.raises(ValueError):
        ev.pass_at_k(4, 5, 1)


def test_pass_at_k_matches_closed_form():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                closed = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert ev.pass_at_k(n, c, k) == pytest.approx(closed, abs=1e-12), (n, c, k)


def test_majority_vote_breaks_ties_by_first_vote():
    assert ev.majority_vote(["a", "b", "a", "b"]) == 0  # tie: "a" was voted first
    assert ev.majority_vote(["b", "a", "a", "b"]) == 0  # tie: "b" first
    assert ev.majority_vote(["a", "b", "b"]) == 1  # "b" wins, first given by sample 1
    assert ev.majority_vote([None, "x", "y", "x"]) == 1  # no answer, no vote
    assert ev.majority_vote([None, None]) is None
    assert ev.vote_key(" 3 * 5 + 7 ") == ev.vote_key("3*5+7") == "3*5+7"
    assert ev.vote_key("1/2", correct=True) == ev.vote_key("0.5", correct=True)
    assert ev.vote_key(None, correct=True) is None


def test_parallel_scaling_hand_computed():
    # two problems, K = 4 samples each: (vote key, correct, thinking tokens)
    p1 = [("5", True, 10), ("3", False, 20), ("3", False, 30), ("5", True, 40)]
    p2 = [("7", False, 5), (None, False, 5), ("8", True, 10), ("8", True, 20)]
    rows = ev.parallel_scaling([p1, p2])
    assert [r["k"] for r in rows] == [1, 2, 4]
    # k=1: each sample on its own: 4 of 8 correct; tokens (100 + 40) / 8
    assert rows[0]["majority_accuracy"] == pytest.approx(0.5)
    assert rows[0]["pass_at_k"] == pytest.approx(0.5)
    assert rows[0]["total_thinking_tokens"] == pytest.approx(17.5)
    # k=2: groups (5,3) tie -> 5 right; (3,5) tie -> 3 wrong; (7,-) -> 7 wrong; (8,8) right. tokens 30,70,10,30
    assert rows[1]["majority_accuracy"] == pytest.approx(0.5)
    assert rows[1]["pass_at_k"] == pytest.approx(5 / 6)  # 1 - C(2,2)/C(4,2) for both problems
    assert rows[1]["total_thinking_tokens"] == pytest.approx(35)
    # k=4: 5:2 vs 3:2 tie -> 5 right; 8 has 2 of 3 votes -> right. tokens 100, 40
    assert rows[2]["majority_accuracy"] == pytest.approx(1.0)
    assert rows[2]["pass_at_k"] == pytest.approx(1.0)
    assert rows[2]["total_thinking_tokens"] == pytest.approx(70)
    assert ev.ks_up_to(6) == [1, 2, 4, 6] and ev.ks_up_to(1) == [1]


def test_control_share_and_error():
    assert ev.within_bounds(16, max_tokens=16) and not ev.within_bounds(17, max_tokens=16)
    assert not ev.within_bounds(3, min_tokens=5, max_tokens=16)
    assert not ev.within_bounds(10, 1, max_tokens=64, min_extensions=2)  # stopped before its 2nd "Wait"
    assert ev.within_bounds(64, 1, max_tokens=64, min_extensions=2)  # the cap came first: fine
    assert ev.within_bounds(30, 2, max_tokens=64, min_extensions=2)
    assert ev.control([True, True, False, True]) == 0.75 and ev.control([]) is None
    # |8-16|/16 = 0.5, 0, |40-32|/32 = 0.25  ->  0.25
    assert ev.control_error([8, 16, 40], [16, 16, 32]) == pytest.approx(0.25)


def _records(model, method, table):
    """Per-sample records from {budget: [(thinking tokens, correct), ...]}."""
    out = []
    for b, runs in table.items():
        for i, (t, ok) in enumerate(runs):
            out.append({"model": model, "method": method, "setting": f"B={b}", "kind": "budget", "budget": b,
                        "extensions_requested": 0, "problem": i, "problem_id": str(i), "sample": 0,
                        "thinking_tokens": t, "answer_tokens": 3, "extensions": 0, "finish_reason": "stop",
                        "reward": 1.0 if ok else 0.1, "correct": ok, "formatted": True, "extracted": "x",
                        "within": ev.within_bounds(t, max_tokens=b)})
    return out


def test_summary_from_hand_made_tables():
    T, F = True, False
    # model a, forced: accuracy 25, 50, 75 % at mean thinking 16, 28, 48 tokens
    a = _records("a", "forced", {16: [(16, T), (16, F), (16, F), (16, F)],
                                 32: [(32, T), (32, T), (32, F), (16, F)],
                                 64: [(64, T), (64, T), (32, T), (32, F)]})
    # model b, stated: accuracy 75, 50, 25 % at 16, 28, 48 tokens, one run over its budget (20 > 16)
    b = _records("b", "stated", {16: [(20, T), (16, T), (12, T), (16, F)],
                                 32: [(32, T), (32, T), (32, F), (16, F)],
                                 64: [(64, T), (64, F), (32, F), (32, F)]})
    res = ev.aggregate(a + b)
    rows = {(r["model"], r["setting"]): r for r in res["rows"]}
    assert rows[("a", "B=32")]["accuracy"] == 50 and rows[("a", "B=32")]["thinking_tokens"] == 28
    assert rows[("b", "B=16")]["control"] == 75
    assert rows[("a", "B=64")]["control_error"] == pytest.approx(0.25)  # (0 + 0 + .5 + .5) / 4
    sa, sb = res["summary"]
    # slopes in pp/token: 25/12, 50/32, 25/20 -> mean 1.6319444 -> 1631.94 pp per 1,000 tokens
    assert sa["scaling"] == pytest.approx(1631.944, abs=1e-3)
    assert sb["scaling"] == pytest.approx(-1631.944, abs=1e-3)
    assert (sa["control"], sa["performance"], sa["best_setting"]) == (100, 75, "B=64")
    assert sb["control"] == pytest.approx(100 * 11 / 12) and (sb["performance"], sb["best_setting"]) == (75, "B=16")
    assert sa["control_error"] == pytest.approx(1.5 / 12)  # 0.5 (16 of 32) + 2 x 0.5 (32 of 64), over 12 runs
    assert sb["control_error"] == pytest.approx(2.0 / 12)  # 0.25 + 0.25 + 0.5 + 2 x 0.5
    assert sa["majority_at_K"] is None


# --- the whole run on scripted completions --------------------------------------------------------------
class ScriptedEngine:
    """Stands in for an engine: `script(prompt, sample, budget)` gives (natural thinking tokens, answer text);
    thinking is cut at the budget's maximum, as budget forcing does."""

    class tokenizer:  # bytes as ids, no chat template: prompts are raw text
        chat_template = None

        @staticmethod
        def encode(text, add_special_tokens=True):
            return list(text.encode())

    def __init__(self, script):
        self.script, self.calls = script, []

    def generate(self, prompts, sampling, n=1, budget=None, fmt=None, prompt_ids=None):
        self.calls.append((list(prompts), sampling, n, budget))
        outs = []
        for i, p in enumerate(prompts):
            for s in range(n):
                natural, answer = self.script(p, s, budget)
                cap = budget.max_thinking_tokens
                t = natural if cap is None else min(natural, cap)
                ext = budget.extensions if t < (cap or 10**9) else 0
                text = "x" * t + fmt.think_close + answer
                outs.append(Completion(prompt_index=i, text=text, thinking="x" * t, answer=answer, token_ids=[],
                                       logprobs=[], sampled=[], finish_reason="forced" if t == cap else "stop",
                                       thinking_tokens=t, answer_tokens=len(answer), extensions=ext))
        return outs


@pytest.fixture
def math_file(tmp_path) -> Path:
    rows = [{"id": "half", "problem": "What is 1/4 + 1/4?", "answer": "\\frac{1}{2}"},
            {"id": "six", "problem": "What is 2 + 4?", "answer": "6"},
            {"id": "sqrt", "problem": "What is the square root of 16?", "answer": "4"}]
    path = tmp_path / "problems.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_run_math_scripted(math_file, tmp_path):
    gold = {"What is 1/4": "0.5", "What is 2 +": "6", "What is the": "\\sqrt{16}"}

    def script(prompt, sample, budget):
        # right (in a different but equivalent form) when allowed 32 tokens or more, else a wrong answer
        key = prompt[:11]
        if budget.max_thinking_tokens >= 32:
            return 40, f"\\boxed{{{gold[key]}}}"
        return 40, "\\boxed{7}"

    out = tmp_path / "eval"
    res = ev.run(["model-a"], "math", n=3, seed=0, budgets=[16, 32], extensions=[0], out=out, fmt="s1",
                 engine=ScriptedEngine(script), task_options={"path": str(math_file)}, quiet=True,
                 command="budgetthink eval --model model-a --task math")
    rows = {r["setting"]: r for r in res["rows"]}
    assert rows["B=16"]["accuracy"] == 0 and rows["B=32"]["accuracy"] == 100
    assert rows["B=16"]["thinking_tokens"] == 16 and rows["B=32"]["thinking_tokens"] == 32
    assert rows["ext=0"]["thinking_tokens"] == 32  # extension settings are capped at the largest budget
    assert rows["B=16"]["mean_reward"] == pytest.approx(0.1)  # boxed but wrong: math's format reward
    assert all(r["control"] == 100 for r in res["rows"])
    (s,) = res["summary"]
    # settings at (16, 0%), (32, 100%), (32, 100%): two pairs with a slope of 100/16 pp/token, one with none
    assert s["scaling"] == pytest.approx(1000 * 100 / 16)
    assert s["performance"] == 100 and s["control_error"] == 0  # forced to exactly 16 and 32
    lines = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(lines) == 9 and {x["setting"] for x in lines} == {"B=16", "B=32", "ext=0"}
    assert json.loads((out / "results.json").read_text())["summary"][0]["scaling"] == pytest.approx(6250)


def test_run_budget_in_prompt_and_parallel(tmp_path):
    seen = []

    def script(prompt, sample, budget):
        seen.append(prompt)
        stated = re.search(r"\[budget (\d+)\]", prompt)
        natural = int(stated.group(1)) + 4 if stated else 50  # overshoots a stated budget by 4 tokens
        return natural, "<answer>1+2</answer>" if sample % 2 == 0 else "<answer>3</answer>"

    eng = ScriptedEngine(script)
    res = ev.run(["m"], "countdown", n=2, seed=1, budgets=[8, 16], samples=4, temperature=0.7,
                 out=tmp_path / "e", engine=eng, methods=["forced", "stated"], quiet=True)
    assert any(p.endswith("[budget 8]<think>") for p in seen)  # stated: the tinyzero format's budget phrase
    assert any(p.endswith("\n<think>") and "[budget" not in p for p in seen)  # forced: the plain prompt
    rows = {(r["method"], r["setting"]): r for r in res["rows"]}
    assert rows[("forced", "B=8")]["control"] == 100 and rows[("forced", "B=8")]["thinking_tokens"] == 8
    assert rows[("stated", "B=8")]["control"] == 0 and rows[("stated", "B=8")]["thinking_tokens"] == 12
    assert rows[("stated", "B=16")]["control_error"] == pytest.approx(4 / 16)
    # the parallel setting sampled 4 per prompt at the temperature, under the smallest budget
    par_calls = [c for c in eng.calls if c[2] == 4]
    assert par_calls and all(c[1].temperature == 0.7 and c[3].max_thinking_tokens in (8, 32) for c in par_calls)
    assert all(c[1].temperature == 0 for c in eng.calls if c[2] == 1)
    par = [p for p in res["parallel"] if p["method"] == "forced"]
    assert [p["k"] for p in par] == [1, 2, 4] and par[-1]["total_thinking_tokens"] == 4 * 8
    # a rerun with the same settings reuses every sample
    again = ScriptedEngine(script)
    res2 = ev.run(["m"], "countdown", n=2, seed=1, budgets=[8, 16], samples=4, temperature=0.7,
                  out=tmp_path / "e", engine=again, methods=["forced", "stated"], quiet=True)
    assert again.calls == [] and res2["rows"] == res["rows"]


def test_run_rejects_bad_input(tmp_path):
    with pytest.raises(UserError, match="budgets"):
        ev.run(["m"], "countdown", n=2, seed=0, budgets=[0, 16], out=tmp_path, engine=ScriptedEngine(None))
    with pytest.raises(UserError, match="same run"):
        ev.run(["m"], "countdown", n=2, seed=0, budgets=[16], out=tmp_path, force=False, engine=ScriptedEngine(None))
    with pytest.raises(UserError, match="model"):
        ev.run([], "countdown", n=2, seed=0, budgets=[16], out=tmp_path, engine=ScriptedEngine(None))


# --- the tiny model ----------------------------------------------------------------------------------------
def test_run_tiny_model_report(tiny_model_dir, tmp_path, one_thread):
    pytest.importorskip("budgetthink.engine.torch")
    from PIL import Image

    out = tmp_path / "eval"
    res = ev.run([str(tiny_model_dir)], "countdown", n=4, seed=0, budgets=[8, 16], extensions=[1], out=out,
                 max_answer_tokens=8, quiet=True)
    forced = [r for r in res["rows"] if r["kind"] in ("budget", "ext")]
    assert len(forced) == 3 and all(r["control"] == 100 for r in forced)
    assert all(r["thinking_tokens"] <= r["budget"] for r in forced if r["kind"] == "budget")
    assert res["summary"][0]["control"] == 100
    for name in ("results.json", "scaling.png", "report.html", "samples.jsonl"):
        assert (out / name).exists(), name
    with Image.open(out / "scaling.png") as im:
        assert im.format == "PNG" and im.size == (1000, 700)
    page = (out / "report.html").read_text()
    assert '<img src="scaling.png"' in page and "<table>" in page and "B=16" in page
    assert "transformers" in page and "torch" in page


def test_models_are_named_by_their_run_not_a_generic_folder():
    assert [report.short_name(m) for m in ("runs/rl/model", "models/smollm2/hf", "runs/sft-long", "x")] == \
        ["rl", "smollm2", "sft-long", "x"]
