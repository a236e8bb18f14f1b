"""The estimator against hand-computed examples, and against s1's published training figures."""

import json
from pathlib import Path

import pytest
import yaml

from budgetthink.errors import UserError
from budgetthink.ledger import estimate, model_params

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).parent.parent


@pytest.fixture(autouse=True)
def round_prices(tmp_path, monkeypatch):
    path = tmp_path / "prices.yaml"
    path.write_text("devices:\n  h100:\n    usd_per_hour: 3.0\n")
    monkeypatch.setenv("BUDGETTHINK_PRICES", str(path))


def write(tmp_path, recipe: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_sft_by_hand(tmp_path, capsys):
    path = write(tmp_path, {"model": "whatever", "params": 1.0e9, "epochs": 2, "estimate": {"tokens": 1.0e6}})
    r = estimate(path, gpu="h100", gpus=2, mfu=0.5)
    # 6 x 1e9 x (1e6 x 2) = 1.2e16 FLOPs over 2 x 989e12 x 0.5 = 9.89e14 FLOP/s -> 12/0.989 s
    assert r["stage"] == "sft" and r["tokens_trained"] == 2.0e6
    assert r["flops"]["total"] == pytest.approx(1.2e16)
    assert r["wall_s"] == pytest.approx(12.13346814964611, rel=1e-9)
    assert r["gpu_hours"] == pytest.approx(2 * 12.13346814964611 / 3600, rel=1e-9)
    assert r["cost_usd"] == pytest.approx(3.0 * 2 * 12.13346814964611 / 3600, rel=1e-9)
    out = capsys.readouterr().out
    assert "Assumptions" in out and "6 x params x tokens" in out
    # --tokens overrides the recipe's count
    assert estimate(path, "h100", 2, 0.5, tokens=2.0e6)["wall_s"] == pytest.approx(2 * 12.13346814964611)


def test_rl_by_hand(tmp_path):
    recipe = {"model": "x", "params": 1.0e9, "algorithm": "grpo", "max_steps": 10, "batch_size": 4,
              "group_size": 2, "max_prompt_tokens": 50, "max_new_tokens": 100, "kl_coef": 0.01}
    r = estimate(write(tmp_path, recipe), gpu="h100", gpus=1, mfu=0.5, gen_mfu=0.1)
    # 80 rollouts: 8,000 generated tokens; 2,000 prompt tokens prefilled once per group (10 x 4 x 50);
    # 12,000 trained tokens (80 x 50 + 8,000).
    assert (r["rollouts"], r["tokens_generated"], r["tokens_prefilled"], r["tokens_trained"]) == (80, 8000, 2000, 12000)
    assert r["flops"]["generate"] == pytest.approx(2e9 * 10_000)  # 2e13
    assert r["flops"]["train"] == pytest.approx(6e9 * 12_000)  # 7.2e13
    assert r["flops"]["reference"] == pytest.approx(2e9 * 12_000)  # 2.4e13
    assert "critic" not in r["flops"]
    # (7.2e13 + 2.4e13) / (989e12 x 0.5) + 2e13 / (989e12 x 0.1)
    assert r["wall_s"] == pytest.approx(9.6e13 / 4.945e14 + 2e13 / 9.89e13, rel=1e-9)
    assert r["wall_s"] == pytest.approx(0.3963599595551062, rel=1e-9)

    ppo = estimate(write(tmp_path, {**recipe, "algorithm": "ppo", "kl_coef": 0}), "h100", 1, 0.5, gen_mfu=0.1)
    assert ppo["flops"]["critic"] == pytest.approx(6e9 * 12_000 + 2e9 * 12_000)  # train it + values for GAE
    assert "reference" not in ppo["flops"]
    measured = estimate(write(tmp_path, recipe), "h100", 1, 0.5, gen_tokens=4000)  # responses shorter than max
    assert measured["tokens_generated"] == 4000 and measured["tokens_trained"] == 80 * 50 + 4000


def test_model_sizes():
    assert model_params("Qwen/Qwen2.5-32B-Instruct")[0] == 32.5e9
    assert model_params("Qwen2.5-1.5B")[0] == 1.54e9
    assert model_params("/models/qwen2.5-3b-instruct")[0] == 3.09e9
    with pytest.raises(UserError, match="--params"):
        model_params("meta-llama/Llama-3.1-8B")


def test_local_model_directory_counts_its_parameters(tmp_path):
    from transformers import Qwen2Config

    Qwen2Config(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, tie_word_embeddings=True).save_pretrained(tmp_path)
    # embeddings 10x8 = 80; q 8x8+8 = 72; k and v 8x4+4 = 36 each; o 8x8 = 64; MLP 3 x 8x16 = 384;
    # two RMSNorms 16; final norm 8; tied head 0  ->  80 + 608 + 8 = 696
    assert model_params(str(tmp_path))[0] == 696


def test_bad_inputs(tmp_path):
    path = write(tmp_path, {"model": "Qwen/Qwen2.5-7B", "epochs": 3})
    with pytest.raises(UserError, match="--tokens"):
        estimate(path, "h100", 8)
    with pytest.raises(UserError, match="unknown GPU"):
        estimate(path, "tpu-v9", 8, tokens=1e6)
    with pytest.raises(UserError, match="SFT or RL"):
        estimate(write(tmp_path, {"model": "Qwen/Qwen2.5-7B"}), "h100", 8, tokens=1e6)
    with pytest.raises(UserError, match="not found"):
        estimate(tmp_path / "none.yaml", "h100", 8)


def test_against_s1_published_figures(capsys):
    """s1 (reference/s1.md): s1K SFT 7 H100 GPU-hours (26 min on 16); 59K-full 394 H100 GPU-hours."""
    s1k = estimate(DATA / "s1k-sft-estimate.yaml", "h100", 16, mfu=0.4, as_json=True)
    assert json.loads(capsys.readouterr().out)["gpu_hours"] == pytest.approx(s1k["gpu_hours"])
    # 6 x 32.5e9 x 4.7e6 x 5 = 4.5825e18 FLOPs; / (16 x 989e12 x 0.4) = 724 s = 3.22 GPU-hours
    assert s1k["flops"]["total"] == pytest.approx(4.5825e18)
    assert s1k["gpu_hours"] == pytest.approx(3.2177, rel=1e-3)
    assert s1k["gpu_hours"] / 7 == pytest.approx(0.46, abs=0.01)  # estimate / published
    full = estimate(DATA / "s1-59k-sft-estimate.yaml", "h100", 16, mfu=0.4)
    assert full["gpu_hours"] / 394 == pytest.approx(0.37, abs=0.01)


def test_sft_recipe_of_the_project_if_present():
    recipe = ROOT / "recipes" / "s1-qwen2.5-32b.yaml"
    if not recipe.exists():
        pytest.skip("recipes/s1-qwen2.5-32b.yaml is not written yet")
    r = estimate(recipe, "h100", 16, mfu=0.4, tokens=4.7e6, params=None)
    assert r["stage"] == "sft" and r["params"] == 32.5e9
    assert 0.2 < r["gpu_hours"] / 7 < 1.0
