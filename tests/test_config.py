"""Config loading: YAML + dotted overrides, and one-line errors naming the key."""

import pytest

from budgetthink.config import Config, load_config, parse_overrides
from budgetthink.engine import Budget
from budgetthink.errors import UserError


class Demo(Config):
    model: str = "runs/tiny"
    lr: float = 1e-5
    max_steps: int = 10
    budget: Budget = Budget()


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.001\nmax_steps: 5\nbudget:\n  max_thinking_tokens: 32\n")
    cfg = load_config(Demo, path, ["max_steps=2", "budget.extensions=3", "model=other"])
    assert (cfg.lr, cfg.max_steps, cfg.model) == (0.001, 2, "other")
    assert cfg.budget.max_thinking_tokens == 32 and cfg.budget.extensions == 3


def test_override_values_are_yaml_scalars():
    assert parse_overrides(["a=1", "b=1e-5", "c=true", "d=[1,2]", "e.f=x"]) == {
        "a": 1, "b": 1e-5, "c": True, "d": [1, 2], "e": {"f": "x"}}


@pytest.mark.parametrize("overrides, words", [
    (["max_stpes=2"], ["unknown key 'max_stpes'", "max_steps"]),
    (["budget.max_thinking_tokns=3"], ["budget.max_thinking_tokns", "max_thinking_tokens"]),
    (["lr=fast"], ["lr", "number"]),
    (["budget.min_thinking_tokens=9", "budget.max_thinking_tokens=4"], ["min_thinking_tokens (9)", "max_thinking_tokens (4)"]),
    (["budget.max_thinking_tokens=-1"], [">= 0"]),
    (["novalue"], ["key=value"]),
])
def test_errors_name_the_key(overrides, words):
    with pytest.raises(UserError) as e:
        load_config(Demo, None, overrides)
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(Demo, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(Demo, bad)
