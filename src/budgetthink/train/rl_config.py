"""The settings of `budgetthink rl`: RLConfig (every key of an RL recipe, each with its description) and the
PPO critic's CriticConfig.

    budgetthink rl --config recipes/tiny-countdown-r1.yaml --out runs/rl [key=value ...]
"""

from typing import Literal

from pydantic import Field, model_validator

from budgetthink import tracking
from budgetthink.config import Config
from budgetthink.engine import Budget
from budgetthink.train.common import LoRA, Optim
from budgetthink.train.curriculum import BudgetCurriculum

ALGORITHMS = ("grpo", "dr_grpo", "rloo", "reinforce_pp", "ppo")


class CriticConfig(Config):
    """The PPO critic (used only with algorithm: ppo)."""

    model: str | None = Field(None, description="model directory to start the critic from; None: the policy's")
    optim: Optim = Field(default_factory=lambda: Optim(lr=1e-5), description="the critic's own optimizer")
    value_clip: float | None = Field(0.5, gt=0, description="clip on the value change in the value loss (None: off)")
    warmup_steps: int = Field(0, ge=0, description="steps that train only the critic before the actor updates")


class RLConfig(Config):
    """Settings of `budgetthink rl`. Shared keys (model, task, format, engine, seed, max_steps, budget) mean
    the same as in every other recipe."""

    model: str = Field(description="policy model directory (or hub id on a machine that has it)")
    task: str = Field("countdown", description="task name: countdown, multiply or math")
    task_options: dict = Field(default_factory=dict, description="options passed to the task (e.g. num_numbers)")
    format: str = Field("tinyzero", description="think format: tinyzero, s1 or r1")
    prompt: Literal["auto", "chat", "raw"] = Field(
        "auto", description="prompt style (formats.Prompter): auto = the model's chat template when its tokenizer "
                            "has one, else the task's prompt then the opening delimiter; chat insists; raw never")
    engine: str = Field("torch", description="generation engine: torch or vllm")
    engine_options: dict = Field(default_factory=dict,
                                 description="passed to the engine (vllm: gpu_memory_utilization, enforce_eager, ...)")
    seed: int = Field(0, description="seeds data order, sampling and mini-batch order")
    max_steps: int = Field(100, ge=1, description="number of RL steps (one batch of prompts each)")
    max_minutes: float | None = Field(None, gt=0, description="also stop (evaluated, checkpointed) after this many "
                                      "minutes of training (sampling and updates; held-out evaluation not counted)")
    budget: Budget | None = Field(None, description="thinking budget applied to every rollout and evaluation")

    # data
    train_size: int = Field(10000, ge=1, description="training problems generated from the task")
    eval_size: int = Field(200, ge=0, description="held-out problems (disjoint from training and from the tiny "
                           "base's pretraining problems) for the evaluation")
    train_file: str | None = Field(None, description="JSONL of problems to train on instead of generating")
    eval_file: str | None = Field(None, description="JSONL of held-out problems instead of generating")

    # rollouts
    prompts_per_step: int = Field(16, ge=1, description="prompts per step")
    n: int = Field(8, ge=1, description="completions sampled per prompt (the group size)")
    max_response_tokens: int = Field(128, ge=1, description="cap on sampled tokens per completion")
    temperature: float = Field(1.0, gt=0, description="sampling temperature (log-probs use the same)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass")
    top_k: int = Field(0, ge=0, description="top-k sampling; 0 keeps all")

    # algorithm
    algorithm: Literal["grpo", "dr_grpo", "rloo", "reinforce_pp", "ppo"] = Field(
        "grpo", description="advantage estimator; ppo trains a critic and uses GAE")
    norm_adv_by_std: bool = Field(True, description="grpo: divide by the group's reward std")
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = Field(
        "token-mean", description="how per-token losses become one number (Dr. GRPO: seq-mean-token-sum-norm)")
    clip_low: float = Field(0.2, ge=0, lt=1, description="importance ratio lower clip: 1 - clip_low")
    clip_high: float = Field(0.2, ge=0, description="importance ratio upper clip: 1 + clip_high (DAPO: 0.28)")
    dual_clip: float | None = Field(None, gt=1, description="dual-clip bound c for negative advantages (None: off)")
    ppo_epochs: int = Field(1, ge=1, description="passes over each batch (GRPO's iterations)")
    mini_batch_size: int | None = Field(None, ge=1, description="completions per optimizer update (None: the whole batch)")
    micro_batch_size: int = Field(16, ge=1, description="completions per forward/backward (gradient accumulation)")
    kl_coef: float = Field(0.0, ge=0, description="KL-to-reference coefficient; 0 keeps no reference model")
    kl_estimator: Literal["k1", "k3"] = Field("k3", description="KL estimator: k1 (log ratio) or k3 (low variance)")
    kl_in_reward: bool = Field(False, description="fold the KL into the reward (TinyZero PPO) instead of the loss")
    kl_target: float | None = Field(None, gt=0, description="adaptive KL: steer the measured KL to this (None: fixed coef)")
    kl_horizon: int = Field(10000, ge=1, description="adaptive KL horizon")
    entropy_coef: float = Field(0.0, ge=0, description="entropy bonus coefficient")
    gamma: float = Field(1.0, ge=0, le=1, description="discount (ppo, reinforce_pp)")
    lam: float = Field(1.0, ge=0, le=1, description="GAE lambda (ppo)")
    whiten_advantages: bool = Field(True, description="ppo: whiten GAE advantages over the batch")
    truncated: Literal["keep", "mask", "soft"] = Field(
        "keep", description="completions that hit max_response_tokens: keep, mask out of the loss, or soft penalty")
    overlong_cache: int = Field(16, ge=1, description="soft: the penalty ramps from 0 to -1 over the last this many tokens")
    dynamic_sampling: bool = Field(False, description="DAPO: drop groups whose accuracy is 0 or 1 (no signal to "
                                   "learn from) and sample further prompts until the batch is full")
    max_refills: int = Field(4, ge=0, description="dynamic sampling: at most this many extra generation rounds per step")
    critic: CriticConfig = Field(default_factory=CriticConfig, description="the PPO critic")
    budget_curriculum: BudgetCurriculum | None = Field(
        None, description="budget-aware RL (L1/LCPO): each group is told a drawn thinking budget, rewarded against it")

    # optimisation
    optim: Optim = Field(default_factory=Optim, description="policy optimizer and schedule")
    lora: LoRA | None = Field(None, description="train LoRA adapters instead of all weights")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="training compute dtype (bf16: autocast)")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward to save memory")
    device: str = Field("auto", description="auto, cpu or cuda[:i]")

    # bookkeeping
    eval_every: int = Field(10, ge=0, description="held-out evaluation every this many steps (0: never)")
    eval_batch_size: int = Field(256, ge=1, description="prompts per evaluation generate call")
    eval_max_tokens: int | None = Field(None, ge=1, description="cap on tokens per evaluation completion; None: the "
                                        "model's context, so a model that thinks past the rollout cap is not scored "
                                        "as truncated")
    eval_samples: int = Field(0, ge=0, description="also sample this many completions per held-out problem at the "
                              "rollout temperature and log their mean accuracy (mean@k) and pass@k; 0: greedy only")
    save_every: int = Field(10, ge=1, description="checkpoint every this many steps (and at the end)")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept on disk")
    warn_after: int = Field(5, ge=1, description="warn if the reward is still 0 after this many steps")
    warn_truncated: float = Field(0.2, ge=0, le=1, description="warn if more than this share is truncated")
    report_to: tracking.ReportTo = Field(default_factory=list, description=tracking.REPORT_TO)
    log_completions_every: int = Field(10, ge=0, description="with report_to: log one sampled completion per prompt "
                                       "(prompt, completion, reward) as a table every this many steps (0: never)")

    @model_validator(mode="after")
    def _check(self):
        if self.algorithm == "rloo" and self.n < 2:
            raise ValueError("rloo needs n >= 2 completions per prompt")
        if self.algorithm in ("grpo", "dr_grpo") and self.n < 2:
            raise ValueError(f"{self.algorithm} needs n >= 2 completions per prompt (or use algorithm: ppo)")
        if self.dynamic_sampling and self.algorithm == "ppo":
            raise ValueError("dynamic_sampling applies to the group estimators, not ppo")
        if self.kl_target is not None and not self.kl_in_reward:
            raise ValueError("kl_target (adaptive KL) needs kl_in_reward: true")
        if self.budget_curriculum is not None:
            self.budget_curriculum.check_room(self.max_response_tokens)
        return self
