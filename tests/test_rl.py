"""The RL loop: metrics, masks, log-prob alignment with the engine, resume after SIGKILL, the NaN guard.

Runs use the `test` tiny model with a few prompts and short completions. A random or barely trained model
never writes an answer tag, so most tests score completions with a stand-in reward (the share of digits in
the text) that varies within groups, so that advantages, losses and gradients are not all zero.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from budgetthink.config import load_config
from budgetthink.engine import Budget, Completion, Sampling
from budgetthink.errors import UserError
from budgetthink.tasks import Score
from budgetthink.train import losses as L
from budgetthink.train import rl
from budgetthink.train.common import NonFiniteError, latest_checkpoint, list_checkpoints, load_state

ROOT = Path(__file__).resolve().parent.parent
TIMING = {"generate_s", "train_s", "step_s"}
BASE = ["prompts_per_step=2", "n=4", "max_response_tokens=12", "train_size=40", "eval_size=4",
        "eval_every=0", "micro_batch_size=4", "optim.lr=1e-3"]


def digit_reward(self, problem, completion):
    """Stand-in verifier: the share of digits in the completion (varies within every group)."""
    share = sum(c.isdigit() for c in completion) / max(len(completion), 1)
    return Score(reward=share, correct=share > 0.2, formatted=True, extracted=completion[:4])


def score_with(reward_fn):
    """Patch rl._data so that the training task scores with `reward_fn` (problem generation is untouched)."""
    real = rl._data

    def data(cfg):
        task, train, held = real(cfg)
        task.score = reward_fn.__get__(task)
        return task, train, held

    rl._data = data
    return real


@pytest.fixture
def digit_scored():
    real = score_with(digit_reward)
    yield
    rl._data = real


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread (see conftest.py)


def config(model_dir, *overrides):
    return load_config(rl.RLConfig, None, [f"model={model_dir}", *BASE, *overrides])


def strip(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


# --- configuration ---------------------------------------------------------------------------------------------
RECIPES = ["tiny-countdown-grpo.yaml", "tiny-countdown-ppo.yaml", "tinyzero-countdown-qwen2.5-3b.yaml",
           "tinyzero-countdown-qwen2.5-3b-grpo.yaml", "tiny-countdown-budget.yaml"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipes_load_and_validate(recipe):
    cfg = load_config(rl.RLConfig, ROOT / "recipes" / recipe)
    assert cfg.task == "countdown" and cfg.algorithm in rl.ALGORITHMS


def test_tinyzero_recipe_has_the_published_hyperparameters():
    cfg = load_config(rl.RLConfig, ROOT / "recipes" / "tinyzero-countdown-qwen2.5-3b.yaml")
    assert (cfg.algorithm, cfg.n, cfg.gamma, cfg.lam, cfg.temperature) == ("ppo", 1, 1.0, 1.0, 1.0)
    assert (cfg.prompts_per_step, cfg.mini_batch_size, cfg.micro_batch_size) == (256, 64, 8)
    assert (cfg.max_response_tokens, cfg.optim.lr, cfg.critic.optim.lr) == (1024, 1e-6, 1e-5)
    assert (cfg.kl_coef, cfg.kl_in_reward, cfg.kl_estimator, cfg.entropy_coef) == (0.001, True, "k1", 0.001)
    assert (cfg.clip_low, cfg.clip_high, cfg.ppo_epochs, cfg.eval_every, cfg.save_every) == (0.2, 0.2, 1, 100, 100)


def test_bad_config_is_one_line_user_error(tiny_model_dir):
    with pytest.raises(UserError, match="did you mean clip_high"):
        config(tiny_model_dir, "clip_hihg=0.3")
    with pytest.raises(UserError, match="rloo needs n >= 2"):
        config(tiny_model_dir, "algorithm=rloo", "n=1")


# --- shared pieces: schedule, checkpoints, warnings -----------------------------------------------------------
def test_warmup_then_cosine_schedule():
    from budgetthink.train.common import Optim, lr_factor

    cfg = Optim(lr=1.0, warmup_steps=2, schedule="cosine")
    # warm-up (s+1)/2; then 0.5 * (1 + cos(pi * (s-2)/4)): 1, 0.853553, 0.5, 0.146447, 0, and 0 after the end
    got = [lr_factor(s, cfg, total_steps=6) for s in range(8)]
    assert got == pytest.approx([0.5, 1.0, 1.0, 0.853553, 0.5, 0.146447, 0.0, 0.0], abs=1e-6)
    floor = Optim(lr=1.0, schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(2, floor, total_steps=4) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(5, Optim(lr=1.0), total_steps=6) == 1.0  # constant


def test_checkpoints_are_atomic_and_pruned(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from budgetthink.train.common import save_checkpoint

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    half = tmp_path / "checkpoints" / ".tmp-step_00000009-999"  # a save killed half-way: never a checkpoint
    half.mkdir(parents=True)
    (half / "state.pt").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path) is None
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, None, {"x": step}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]
    assert load_state(latest_checkpoint(tmp_path)) == {"x": 3, "step": 3}
    assert not half.exists()  # leftovers are cleaned by the next save
    save_checkpoint(tmp_path, 3, model, None, {"x": 33}, keep=2)  # re-saving a step replaces it
    assert load_state(latest_checkpoint(tmp_path))["x"] == 33
    assert AutoModelForCausalLM.from_pretrained(latest_checkpoint(tmp_path) / "model") is not None


def test_warnings_name_the_cause(tiny_model_dir, capsys):
    from types import SimpleNamespace

    run = SimpleNamespace(cfg=config(tiny_model_dir, "warn_after=2"), zero_reward_steps=0, warned=set())
    m = {"reward_mean": 0.0, "no_answer": 0.9, "truncated": 0.1}
    rl.warnings(run, m)
    assert capsys.readouterr().err == ""
    rl.warnings(run, m)
    assert "reward has been 0 for 2 steps: 90% of completions have no answer tag" in capsys.readouterr().err
    rl.warnings(run, {"reward_mean": 0.5, "no_answer": 0.0, "truncated": 0.6})
    err = capsys.readouterr().err
    assert "60% of completions hit max_response_tokens=12" in err and "truncated=mask" in err
    rl.warnings(run, {"reward_mean": 0.0, "no_answer": 0.9, "truncated": 0.9})
    assert capsys.readouterr().err == ""  # each warning once


# --- masks and alignment ------------------------------------------------------------------------------------------
def fake_rollout(prompt_ids, token_ids, sampled, truncated=False, reward=0.0):
    comp = Completion(prompt_index=0, text="", thinking="", answer="", token_ids=token_ids,
                      logprobs=[0.0] * len(token_ids), sampled=sampled, finish_reason="length" if truncated else "stop")
    return rl.Rollout(None, prompt_ids, comp, Score(reward, False, False, None), reward, truncated)


def test_collate_masks_inserted_tokens_padding_and_truncated_rows():
    rows = [fake_rollout([5, 6, 7], [10, 11, 12, 13], [True, False, False, True]),
            fake_rollout([5], [20, 21], [True, True]),
            fake_rollout([8, 9], [30, 31, 32], [True, True, True], truncated=True),
            fake_rollout([5, 6, 7], [40], [True])]
    b = rl.collate(rows, pad_id=0, truncated_mode="keep", device="cpu")
    assert b["p_ids"].tolist() == [[5, 6, 7], [0, 0, 5], [0, 8, 9]]  # each distinct prompt once, left-padded
    assert b["p_pos"].tolist() == [[0, 1, 2], [0, 0, 0], [0, 0, 1]]
    assert b["row_prompt"].tolist() == [0, 1, 2, 0]
    assert b["resp"].tolist() == [[10, 11, 12, 13], [20, 21, 0, 0], [30, 31, 32, 0], [40, 0, 0, 0]]
    assert b["c_pos"].tolist() == [[3, 4, 5, 6], [1, 2, 3, 4], [2, 3, 4, 5], [3, 4, 5, 6]]
    assert b["attn"].tolist() == [[1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1, 0],
                                  [1, 1, 1, 1, 0, 0, 0]]
    assert b["mask"].tolist() == [[1, 0, 0, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]]
    masked = rl.collate(rows, pad_id=0, truncated_mode="mask", device="cpu")
    assert masked["mask"][2].tolist() == [0, 0, 0, 0]


def test_shared_prompt_forward_equals_one_pass_with_gradients(tiny_model_dir):
    """Running each prompt once and the completions after its repeated KV cache gives the same log-probs and
    the same gradients as one pass over prompt + completion per row."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    rows = [fake_rollout([5, 6, 7], [10, 11, 12, 13], [True] * 4), fake_rollout([9], [20, 21], [True, True]),
            fake_rollout([5, 6, 7], [30, 31, 32], [True] * 3), fake_rollout([9], [40], [True])]
    batch = rl.collate(rows, 0, "keep", "cpu")
    grads, logps = [], []
    for share in (True, False):
        model.zero_grad()
        logp, _ = rl.policy_forward(model, batch, 1.0, entropy=False, dtype="float32", share=share)
        (logp * batch["mask"]).sum().backward()
        logps.append(logp.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(logps[0] * batch["mask"], logps[1] * batch["mask"], atol=1e-5, rtol=0)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_inserted_tokens_get_no_policy_gradient(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    rows = [fake_rollout([5, 6, 7], [10, 11, 12, 13, 14], [True, False, False, True, True])] * 2
    batch = rl.collate(rows, 0, "keep", "cpu")
    logp, _ = rl.policy_forward(model, batch, 1.0, entropy=False, dtype="float32")
    logp.retain_grad()
    loss, _ = L.policy_loss(logp, logp.detach(), torch.ones_like(logp))
    L.aggregate(loss, batch["mask"], "token-mean").backward()
    assert (logp.grad[:, 1:3] == 0).all()  # the two inserted tokens
    assert (logp.grad[:, [0, 3, 4]] != 0).all()


def test_recomputed_logprobs_match_the_engine_with_budget_forcing(tiny_model_dir):
    """The training forward must score exactly the tokens the engine sampled, at the same positions, also
    when budget forcing inserted tokens in the middle of a completion."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from budgetthink.engine import load_engine
    from budgetthink.formats import get_format

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    fmt = get_format("tinyzero")
    prompts = [fmt.prompt("3 5 7 -> 22\n"), fmt.prompt("10 2 -> 5\n")]
    ids = [tok.encode(p) for p in prompts]
    engine = load_engine(model, "torch", tokenizer=tok)
    comps = engine.generate(prompts, Sampling(temperature=1.0, max_tokens=20, seed=3), n=3,
                            budget=Budget(max_thinking_tokens=4, max_answer_tokens=8), fmt=fmt, prompt_ids=ids)
    assert any(not all(c.sampled) for c in comps)  # the forced end of thinking was inserted
    rows = [fake_rollout(ids[c.prompt_index], c.token_ids, c.sampled) for c in comps]
    batch = rl.collate(rows, tok.pad_token_id, "keep", "cpu")
    with torch.no_grad():
        logp, _ = rl.policy_forward(model, batch, 1.0, entropy=False, dtype="float32")
    for i, c in enumerate(comps):
        for t, (lp, s) in enumerate(zip(c.logprobs, c.sampled)):
            if s:
                assert logp[i, t].item() == pytest.approx(lp, abs=1e-4)


# --- runs -------------------------------------------------------------------------------------------------------
FIELDS = {"step", "reward_mean", "reward_std", "accuracy", "format_rate", "zero_spread_groups",
          "response_len_mean", "response_len_max", "truncated", "no_answer", "kl", "entropy", "loss", "grad_norm",
          "lr", "tokens_generated", "generate_s", "train_s", "step_s"}


@pytest.mark.parametrize("overrides", [
    ["algorithm=dr_grpo", "loss_agg=seq-mean-token-sum-norm"],
    ["algorithm=rloo", "loss_agg=seq-mean-token-mean", "ppo_epochs=2", "mini_batch_size=4", "dual_clip=3"],
    ["algorithm=reinforce_pp", "gamma=0.99", "kl_coef=0.01", "kl_in_reward=true", "kl_estimator=k1"],
    ["algorithm=grpo", "truncated=soft", "overlong_cache=4", "entropy_coef=0.01", "clip_high=0.28"],
], ids=["dr_grpo", "rloo", "reinforce_pp", "soft"])
def test_each_estimator_runs_a_step(tiny_model_dir, tmp_path, digit_scored, overrides):
    (r,) = rl.train(config(tiny_model_dir, "max_steps=1", *overrides), tmp_path)
    assert r["loss"] is not None and r["grad_norm"] is not None and r["grad_norm"] > 0


def test_lora_run_resumes_and_exports_a_merged_model(tiny_model_dir, tmp_path, digit_scored):
    """LoRA adapters train, the KL reference is the base with adapters off, a checkpoint holds the adapter,
    --resume continues exactly, and the final model directory is the merged, ordinary model."""
    from transformers import AutoModelForCausalLM

    args = ["lora.r=4", "kl_coef=0.01", "save_every=1"]
    whole = rl.train(config(tiny_model_dir, "max_steps=2", *args), tmp_path / "whole")
    assert whole[0]["kl"] == pytest.approx(0.0, abs=1e-6) and whole[1]["kl"] > 0  # adapters start as a no-op
    rl.train(config(tiny_model_dir, "max_steps=1", *args), tmp_path / "split")
    assert (latest_checkpoint(tmp_path / "split") / "model" / "adapter_config.json").exists()
    resumed = rl.train(config(tiny_model_dir, "max_steps=2", *args), tmp_path / "split", resume=True)
    assert strip(resumed) == strip(whole)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "whole" / "model")
    assert not any("lora" in name for name, _ in merged.named_parameters())


def test_budget_curriculum_states_budgets_shapes_rewards_and_evaluates_per_budget(tiny_model_dir, tmp_path,
                                                                                      digit_scored):
    from transformers import AutoTokenizer

    cfg = config(tiny_model_dir, "max_steps=1", "eval_every=1", "max_response_tokens=20",
                 "budget_curriculum.budgets=[4,8]", "budget_curriculum.enforce=max", "budget_curriculum.alpha=0.5")
    sampled = []
    from budgetthink.train import rollouts

    real = rollouts.generate

    def spy(run, problems, n, sampling, budgets=None):
        rolls = real(run, problems, n, sampling, budgets)
        if sampling.temperature > 0:  # the training rollouts (evaluation is greedy)
            sampled.extend(rolls)
        return rolls

    rollouts.generate = spy  # rollout() samples through it
    try:
        (r,) = rl.train(cfg, tmp_path)
    finally:
        rollouts.generate = real
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert len(sampled) == 8
    for x in sampled:
        assert x.budget in (4, 8) and f"[budget {x.budget}]<think>" in tok.decode(x.prompt_ids)  # stated
        assert x.completion.thinking_tokens <= x.budget  # and enforced (enforce: max)
        # LCPO-Exact: the task's (here: stand-in) reward minus alpha * |used - B| / B
        assert x.reward == pytest.approx(x.score.reward - 0.5 * abs(x.completion.thinking_tokens - x.budget) / x.budget)
    assert {"budget_error", "over_budget", "accuracy_B4", "accuracy_B8", "eval_accuracy_B4", "eval_accuracy_B8"} <= set(r)
    lines = [json.loads(x) for x in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert [(x["step"], x["budget"]) for x in lines] == [(0, 4), (0, 8), (1, 4), (1, 8)]


def test_dynamic_sampling_drops_zero_spread_groups(tiny_model_dir, tmp_path):
    def odd_target_reward(self, problem, completion):  # the same reward for every sample of an odd target
        r = 1.0 if problem.answer["target"] % 2 else float(len(completion) % 2)
        return Score(r, False, True, "x")

    real = score_with(odd_target_reward)
    try:
        records = rl.train(config(tiny_model_dir, "max_steps=2", "dynamic_sampling=true", "max_refills=3",
                                  "prompts_per_step=3"), tmp_path)
    finally:
        rl._data = real
    for r in records:
        assert r["groups_trained"] <= 3
        assert r["zero_spread_groups"] > 0 or r["groups_trained"] == 3


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tiny_model_dir, tmp_path, digit_scored,
                                                                       monkeypatch):
    calls = {"n": 0}
    real = L.policy_loss

    def poisoned(*a, **k):  # one actor micro-batch per step: the third call is step 3
        calls["n"] += 1
        loss, clipped = real(*a, **k)
        return (loss * float("nan"), clipped) if calls["n"] == 3 else (loss, clipped)

    monkeypatch.setattr(L, "policy_loss", poisoned)
    cfg = config(tiny_model_dir, "max_steps=5", "save_every=1", "micro_batch_size=8")
    with pytest.raises(NonFiniteError, match=r"step 3: loss=nan.*step_00000002 is intact"):
        rl.train(cfg, tmp_path)
    assert latest_checkpoint(tmp_path).name == "step_00000002"
    assert load_state(latest_checkpoint(tmp_path))["step"] == 2
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


# --- resume after SIGKILL ------------------------------------------------------------------------------------------
DRIVER = """
import sys
sys.path.insert(0, {tests!r})
from test_rl import digit_reward, score_with
score_with(digit_reward)
from budgetthink.cli import main
sys.argv = ["budgetthink", "rl", *sys.argv[1:]]
main()
"""


def check_grpo_run(records, out: Path):
    """What a user sees after a GRPO run: metrics lines, eval, checkpoints, the model and the plot."""
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines == records and [r["step"] for r in lines] == [1, 2, 3, 4]
    for r in lines:
        assert FIELDS <= set(r), FIELDS - set(r)
        assert r["tokens_generated"] > 0 and 0 < r["response_len_mean"] <= 12 and r["response_len_max"] <= 12
        assert r["grad_norm"] > 0 and r["kl"] is not None and r["kl"] >= 0
        assert ("eval_accuracy" in r) == (r["step"] in (2, 4))
    assert lines[-1]["kl"] > 0  # the policy moved away from the reference
    evals = [json.loads(x) for x in (out / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 2, 4] and all(e["n"] == 4 for e in evals)
    assert [p.name for p in list_checkpoints(out)] == ["step_00000004"]  # keep_checkpoints=1 pruned step 2
    assert load_state(latest_checkpoint(out))["data_pos"] == 8
    assert (out / "model" / "config.json").exists() and (out / "metrics.png").stat().st_size > 0
    bill = [json.loads(x) for x in (out / "ledger.jsonl").read_text().splitlines()]
    assert bill[-1]["stage"] == "rl" and bill[-1]["status"] == "ok"
    assert bill[-1]["tokens_generated"] >= sum(r["tokens_generated"] for r in records) and bill[-1]["tokens_trained"] > 0


def check_ppo_run(records, out: Path):
    for r in records:
        assert FIELDS | {"value_loss", "explained_var", "value_mean", "adv_mean", "return_mean", "kl_coef"} <= set(r)
    assert records[0]["loss"] is None and records[1]["loss"] is not None  # step 1 trains only the critic
    assert records[0]["value_mean"] == 0.0  # the value head starts at zero
    assert records[1]["kl_coef"] != 0.01  # the adaptive controller moved the coefficient
    assert (latest_checkpoint(out) / "critic" / "value_head.safetensors").exists()


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_resume_after_sigkill_matches_an_uninterrupted_run(tiny_model_dir, tmp_path, digit_scored, algo):
    """Kill -9 a run after its first checkpoint, resume it: every metric equals an uninterrupted run's."""
    extra = ["max_steps=4", "save_every=2", "eval_every=2"]
    if algo == "ppo":
        extra += ["algorithm=ppo", "n=1", "prompts_per_step=6", "mini_batch_size=3", "kl_coef=0.01",
                  "kl_in_reward=true", "kl_estimator=k1", "kl_target=0.1", "critic.warmup_steps=1"]
    else:
        extra += ["ppo_epochs=2", "mini_batch_size=4", "kl_coef=0.01", "optim.schedule=cosine",
                  "optim.warmup_steps=2", "keep_checkpoints=1"]
    overrides = [f"model={tiny_model_dir}", *BASE, *extra]
    cfg = load_config(rl.RLConfig, None, overrides)
    records = rl.train(cfg, tmp_path / "whole")
    (check_ppo_run if algo == "ppo" else check_grpo_run)(records, tmp_path / "whole")
    with pytest.raises(UserError, match="--resume"):
        rl.train(cfg, tmp_path / "whole")

    killed = tmp_path / "killed"
    path = os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}  # one thread, as in this process
    with open(tmp_path / "killed.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", DRIVER.format(tests=str(ROOT / "tests")), "--config",
                                 "/dev/null", "--out", str(killed), *overrides], env=env, stdout=log, stderr=log)
        deadline = time.time() + 300
        while latest_checkpoint(killed) is None and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-2000:]
    assert latest_checkpoint(killed) is not None and not (killed / "model").exists()  # killed before the end

    resumed = rl.train(load_config(rl.RLConfig, None, overrides), killed, resume=True)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert strip(resumed) == strip(records)
    evals = lambda d: [json.loads(x) for x in (d / "eval.jsonl").read_text().splitlines()]
    assert evals(killed) == evals(tmp_path / "whole")


# --- does it learn at all, and on what data ----------------------------------------------------------------------
def test_a_trivially_learnable_reward_rises(tiny_model_dir, tmp_path):
    """The loop optimises: rewarded for writing the character `7`, the share of completions holding one rises
    by at least 0.25 within 30 steps (measured: ~0.3 -> ~0.9; a broken sign or a zero gradient stays flat)."""

    def sevens(self, problem, completion):
        hit = "7" in completion
        return Score(float(hit), hit, True, None)

    real = score_with(sevens)
    try:
        records = rl.train(config(tiny_model_dir, "max_steps=30", "prompts_per_step=4", "n=8",
                                  "max_response_tokens=8", "train_size=200", "optim.lr=3e-3"), tmp_path)
    finally:
        rl._data = real
    first, last = records[:5], records[-5:]
    before = sum(r["accuracy"] for r in first) / 5
    after = sum(r["accuracy"] for r in last) / 5
    assert after >= before + 0.25, (before, after)


def test_rl_problems_are_disjoint_from_pretraining_and_held_out(tiny_model_dir):
    """RL trains on the `train` split, evaluates on `test`, and the tiny base was pretrained on `pretrain`:
    no training problem was seen in pretraining, none is held out."""
    from budgetthink import tiny
    from budgetthink.tasks import get_task

    cfg = config(tiny_model_dir, "train_size=2000", "eval_size=300")
    _, train, held = rl._data(cfg)
    pre = get_task("countdown", split="pretrain", **tiny.COUNTDOWN).generate(
        tiny.SCHEDULES["small"].train_problems, seed=0)
    keys = lambda ps: {(tuple(p.answer["numbers"]), p.answer["target"]) for p in ps}
    assert len(keys(train)) == 2000 and len(keys(held)) == 300
    assert not keys(train) & keys(pre)
    assert not keys(train) & keys(held)
    assert not keys(held) & keys(pre)


def test_dynamic_sampling_keeps_groups_with_mixed_accuracy_and_refills(tiny_model_dir, tmp_path):
    """DAPO's filter reads correctness, not the shaped reward: groups that differ only in reward (format
    credit) but are all wrong are dropped, and further prompts are sampled until the batch is full."""

    coin = random.Random(0)

    def graded(self, problem, completion):  # the reward varies everywhere; correctness only on even targets
        correct = problem.answer["target"] % 2 == 0 and coin.random() < 0.5
        return Score(1.0 if correct else 0.1 * coin.randrange(3), correct, True, "x")

    real = score_with(graded)
    try:
        records = rl.train(config(tiny_model_dir, "max_steps=2", "dynamic_sampling=true", "max_refills=6",
                                  "prompts_per_step=3", "n=4"), tmp_path)
    finally:
        rl._data = real
    for r in records:
        assert r["groups_trained"] == 3  # refilled to a full batch
        assert r["loss"] is not None and r["grad_norm"] > 0  # and trained on it
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["groups_trained"] == 3 for r in rows)


def test_eval_uses_the_context_not_the_rollout_cap_and_reports_mean_at_k(tiny_model_dir, tmp_path, digit_scored):
    cfg = config(tiny_model_dir, "max_steps=1", "eval_every=1", "eval_size=3", "max_response_tokens=4",
                 "eval_samples=2", "eval_max_tokens=30")
    rl.train(cfg, tmp_path)
    lines = [json.loads(x) for x in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [0, 1]
    assert max(x["response_len_mean"] for x in lines) > 4  # the rollout cap (4) did not apply
    for x in lines:
        assert 0 <= x["mean@2"] <= x["pass@2"] <= 1
