"""Budget curriculum: shaped rewards against hand-computed numbers, the budget phrase in every format
through the tiny tokenizer, the distributions budgets are drawn from, engine caps, buckets and metrics."""

import math

import numpy as np
import pytest
from pydantic import ValidationError

from budgetthink.config import load_config
from budgetthink.engine import Budget
from budgetthink.errors import UserError
from budgetthink.formats import FORMATS, get_format
from budgetthink.tasks import get_task
from budgetthink.tiny import build_tokenizer
from budgetthink.train.curriculum import BudgetCurriculum, budget_metrics, reward


# --- rewards -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("base, used, budget, kind, alpha, expected", [
    # exact: base - alpha * |used - B| / B
    (1.0, 32, 32, "exact", 0.5, 1.0),      # on the budget: no penalty
    (1.0, 48, 32, "exact", 0.5, 0.75),     # 16 over 32: 1 - 0.5 * 0.5
    (1.0, 16, 32, "exact", 0.5, 0.75),     # 16 under 32: penalised the same
    (0.1, 64, 32, "exact", 1.0, -0.9),     # formatted but wrong, twice the budget: 0.1 - 1 * 1
    (0.0, 0, 100, "exact", 0.2, -0.2),     # no thinking at all against 100: 0 - 0.2 * 1
    (1.0, 130, 100, "exact", 0.0, 1.0),    # alpha 0: plain correctness
    # max: base - alpha * max(0, used - B) / B
    (1.0, 16, 32, "max", 0.5, 1.0),        # under the budget: free
    (1.0, 32, 32, "max", 0.5, 1.0),
    (1.0, 48, 32, "max", 0.5, 0.75),       # 16 over 32
    (1.0, 40, 32, "max", 0.3, 0.925),      # 1 - 0.3 * 8/32
    (0.0, 96, 64, "max", 2.0, -1.0),       # 0 - 2 * 32/64
])
def test_rewards_by_hand(base, used, budget, kind, alpha, expected):
    assert reward(base, used, budget, kind, alpha) == pytest.approx(expected, abs=1e-12)
    cur = BudgetCurriculum(budgets=[budget], reward=kind, alpha=alpha)
    assert cur.shape(base, used, budget) == pytest.approx(expected, abs=1e-12)


def test_reward_rejects_bad_budget_and_kind():
    with pytest.raises(ValueError, match="positive"):
        reward(1.0, 10, 0)
    with pytest.raises(ValueError, match="exact or max"):
        reward(1.0, 10, 10, "min")


# --- the budget phrase -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(FORMATS))
def test_budget_phrase_in_every_format_survives_the_tiny_tokenizer(name):
    fmt, tok = get_format(name), build_tokenizer()
    problem = get_task("countdown", template="compact").generate(1, seed=3)[0]
    for budget in (1, 16, 37, 128, 4096):
        phrase = fmt.budget_phrase(budget)
        assert str(budget) in phrase and phrase != str(budget)
        text = fmt.prompt(problem.prompt, budget=budget)
        assert text == problem.prompt + phrase + fmt.think_open
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
        # the phrase is tokenized the same inside the prompt as alone: its ids appear contiguously
        alone = tok(phrase, add_special_tokens=False)["input_ids"]
        assert any(ids[i:i + len(alone)] == alone for i in range(len(ids) - len(alone) + 1))
        # different budgets give different prompts (the model can tell them apart)
        assert fmt.prompt(problem.prompt, budget=budget) != fmt.prompt(problem.prompt, budget=budget + 1)
    assert fmt.prompt(problem.prompt) == problem.prompt + fmt.think_open  # no budget: no phrase


# --- drawing ---------------------------------------------------------------------------------------------------
DRAWS, TOL = 20_000, 0.02  # frequencies within 0.02 of the configured probabilities over 20,000 draws


def test_weighted_list_draws_with_the_configured_frequencies():
    cur = BudgetCurriculum(budgets=[16, 32, 64, 128], weights=[1, 2, 3, 4])
    draws = cur.draw(np.random.default_rng(123), DRAWS)
    expected = {16: 0.1, 32: 0.2, 64: 0.3, 128: 0.4}
    assert set(draws) == set(expected)
    freq = {b: draws.count(b) / DRAWS for b in expected}
    assert max(abs(freq[b] - p) for b, p in expected.items()) < TOL
    # and a chi-square test: 3 degrees of freedom, critical value 16.27 at p = 0.001
    chi2 = sum((draws.count(b) - DRAWS * p) ** 2 / (DRAWS * p) for b, p in expected.items())
    assert chi2 < 16.27


def test_uniform_list_by_default_and_zero_weight_never_drawn():
    draws = BudgetCurriculum(budgets=[10, 20]).draw(np.random.default_rng(0), DRAWS)
    assert abs(draws.count(10) / DRAWS - 0.5) < TOL
    draws = BudgetCurriculum(budgets=[10, 20, 30], weights=[1, 0, 1]).draw(np.random.default_rng(0), 2000)
    assert 20 not in draws


def test_log_uniform_draws_follow_the_log_uniform_cdf():
    lo, hi = 8, 128
    draws = np.array(BudgetCurriculum(log_uniform=(lo, hi)).draw(np.random.default_rng(7), DRAWS))
    assert draws.dtype.kind == "i" and draws.min() >= lo and draws.max() <= hi
    # B = round(X), X log-uniform on [lo, hi]: P(B <= b) = P(X < b + 0.5) = log((b + 0.5) / lo) / log(hi / lo)
    worst = 0.0
    for b in range(lo, hi):
        cdf = math.log((b + 0.5) / lo) / math.log(hi / lo)
        worst = max(worst, abs(np.mean(draws <= b) - cdf))
    assert worst < TOL
    # octaves are equally likely: [8, 16), [16, 32), [32, 64), [64, 128] each about 1/4
    # (P(B < 16) = log(15.5 / 8) / log 16 = 0.2386, P(B < 32) = log(31.5 / 8) / log 16 = 0.4943, ...)
    octave = np.histogram(draws, bins=[8, 16, 32, 64, 129])[0] / DRAWS
    expected = [math.log(15.5 / 8) / math.log(16), math.log(31.5 / 15.5) / math.log(16),
                math.log(63.5 / 31.5) / math.log(16), math.log(128 / 63.5) / math.log(16)]
    assert np.abs(octave - np.array(expected)).max() < TOL
    assert abs(expected[0] - 0.2386) < 1e-3 and abs(expected[1] - 0.2557) < 1e-3


def test_draws_are_deterministic_per_seed():
    for cur in (BudgetCurriculum(budgets=[16, 32, 64]), BudgetCurriculum(log_uniform=(16, 256))):
        assert cur.draw(np.random.default_rng(5), 50) == cur.draw(np.random.default_rng(5), 50)
        assert cur.draw(5, 50) == cur.draw(np.random.default_rng(5), 50)
        assert cur.draw(np.random.default_rng(5), 50) != cur.draw(np.random.default_rng(6), 50)


# --- configuration -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, match", [
    ({}, "either budgets"),
    ({"budgets": [16], "log_uniform": [8, 16]}, "either budgets"),
    ({"budgets": [0, 16]}, "positive"),
    ({"budgets": [16, 16]}, "twice"),
    ({"budgets": [16, 32], "weights": [1]}, "weights"),
    ({"budgets": [16, 32], "weights": [0, 0]}, "weights"),
    ({"log_uniform": [32, 16]}, "lo < hi"),
    ({"log_uniform": [8, 16], "weights": [1, 2]}, "weights"),
    ({"budgets": [16], "slack": 0.5}, "greater than or equal to 1"),
    ({"budgets": [16], "reward": "min"}, "exact"),
])
def test_bad_curriculum_is_rejected(bad, match):
    with pytest.raises(ValidationError, match=match):
        BudgetCurriculum(**bad)


def test_bad_curriculum_in_a_config_file_is_a_one_line_user_error(tmp_path):
    from pydantic import BaseModel

    class Holder(BaseModel):
        budget_curriculum: BudgetCurriculum | None = None

    with pytest.raises(UserError, match="budget_curriculum") as e:
        load_config(Holder, None, ["budget_curriculum.budgets=[16,16]"])
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="budget_curriculum.budget'"):
        load_config(Holder, None, ["budget_curriculum.budget=[16]"])


# --- enforcement ---------------------------------------------------------------------------------------------------
def test_engine_caps_for_none_max_and_slack():
    base = Budget(max_answer_tokens=8)
    assert BudgetCurriculum(budgets=[20]).engine_budget(20, base) is base
    assert BudgetCurriculum(budgets=[20]).engine_budget(20, None) is None
    b = BudgetCurriculum(budgets=[20], enforce="max").engine_budget(20, base)
    assert (b.max_thinking_tokens, b.max_answer_tokens) == (20, 8)
    slack = BudgetCurriculum(budgets=[20, 21], enforce="slack", slack=1.5)
    assert slack.engine_budget(20).max_thinking_tokens == 30
    assert slack.engine_budget(21).max_thinking_tokens == 32  # ceil(31.5)
    with pytest.raises(UserError, match="min_thinking_tokens"):
        BudgetCurriculum(budgets=[8], enforce="max").engine_budget(8, Budget(min_thinking_tokens=10))


def test_engine_calls_group_prompts_by_cap():
    budgets = [32, 16, 32, 64, 16]
    assert [(None, [0, 1, 2, 3, 4])] == BudgetCurriculum(budgets=[16, 32, 64]).engine_calls(budgets)
    calls = BudgetCurriculum(budgets=[16, 32, 64], enforce="max").engine_calls(budgets)
    assert [(b.max_thinking_tokens, idx) for b, idx in calls] == [(32, [0, 2]), (16, [1, 4]), (64, [3])]


def test_check_room_against_the_completion_cap():
    BudgetCurriculum(budgets=[16, 64]).check_room(100)
    with pytest.raises(ValueError, match="max_response_tokens"):
        BudgetCurriculum(budgets=[16, 64], enforce="slack", slack=2).check_room(100)  # cap 128 >= 100


# --- buckets and metrics -------------------------------------------------------------------------------------------
def test_buckets_for_lists_and_ranges():
    assert BudgetCurriculum(budgets=[64, 16, 32]).labels() == ["B16", "B32", "B64"]
    cur = BudgetCurriculum(log_uniform=(16, 128), buckets=3)  # edges 16, 32, 64, 128
    assert cur.bucket_ranges() == [(16, 31), (32, 63), (64, 128)]
    assert cur.labels() == ["B16-31", "B32-63", "B64-128"]
    assert [cur.bucket(b) for b in (16, 31, 32, 100, 128)] == ["B16-31", "B16-31", "B32-63", "B64-128", "B64-128"]
    assert cur.eval_points() == [22, 45, 91]  # round(sqrt(16*31)), round(sqrt(32*63)), round(sqrt(64*128))
    assert BudgetCurriculum(budgets=[32, 16], eval_budgets=[8, 8, 4]).eval_points() == [4, 8]


def test_budget_metrics_by_hand():
    budgets, used, correct = [16, 16, 32, 32], [16, 20, 40, 24], [True, False, True, True]
    m = budget_metrics(budgets, used, correct, ["B16", "B16", "B32", "B32"], ["B16", "B32", "B64"])
    # |used-B|/B: 0, 4/16, 8/32, 8/32 -> mean 0.1875; over budget: 20 > 16 and 40 > 32 -> 0.5
    assert m["budget_error"] == pytest.approx(0.1875)
    assert m["over_budget"] == pytest.approx(0.5)
    assert (m["accuracy_B16"], m["accuracy_B32"], m["accuracy_B64"]) == (0.5, 1.0, None)
    assert (m["thinking_B16"], m["thinking_B32"], m["thinking_B64"]) == (18.0, 32.0, None)
    assert m["thinking_mean"] == 25.0  # (16 + 20 + 40 + 24) / 4
    assert budget_metrics(budgets, used, correct) == {"budget_error": 0.1875, "over_budget": 0.5, "thinking_mean": 25.0}
    assert budget_metrics([], [], [], []) == {}
