"""Budgets for budget-aware RL (L1/LCPO): which thinking budget B each rollout group is told, whether the
engine also enforces it, how the reward is shaped by the thinking actually used, and what is logged.

    budgetthink rl --config recipes/tiny-countdown-budget.yaml --out runs/rl-budget

    cur = BudgetCurriculum(budgets=[16, 32, 64, 128], reward="exact", alpha=0.5)
    Bs = cur.draw(np.random.default_rng(0), k=16)              # one budget per prompt (its group of n samples)
    text = fmt.prompt(problem.prompt, budget=B)                # the think format states B in the prompt
    for engine_budget, idx in cur.engine_calls(Bs, base=cfg.budget):   # one generate call per distinct cap
        ...
    r = cur.shape(score.reward, used=completion.thinking_tokens, budget=B)
    m = budget_metrics(Bs_per_sample, used, correct, [cur.bucket(b) for b in Bs_per_sample], cur.labels())
    m = rollout_metrics(cur, rollouts)                         # the same from the RL loop's rollouts

Rewards (used = sampled thinking tokens, what budget forcing counts; base = the task's reward, 1 for a
correct answer, less otherwise):
- `exact` (LCPO-Exact): base - alpha * |used - B| / B. Thinking less than told is penalised as much as
  thinking more, so the model learns to use what it is given.
- `max` (LCPO-Max, soft form): base - alpha * max(0, used - B) / B. Only thinking beyond B costs. With
  `enforce: max` thinking never exceeds B, so this is plain correctness under a hard cap; with `slack` the
  model is penalised between B and the cap B x slack.
L1 penalises absolute token gaps (alpha = 0.0003 per token); here the gap is relative to B, so one alpha
serves budgets that differ by orders of magnitude.

Distributions: a list of budgets with weights (B = budgets[i] with probability weights[i] / sum), or a
log-uniform range: X = exp(U(log lo, log hi)), B = X rounded to the nearest integer, so each octave of
budgets is drawn as often as every other. Draws depend only on the generator given (deterministic per
seed).

Metrics per step (`budget_metrics`): `budget_error` (mean |used - B| / B, the eval's control error),
`over_budget` (share of samples with used > B), `thinking_mean`, and per budget bucket
`accuracy_<label>` and `thinking_<label>` (mean used). Buckets: one per listed budget (`B16`), or for a range `buckets`
log-spaced bins of whole budgets (`B16-31`).
"""

import math
from typing import Literal

import numpy as np
from pydantic import Field, ValidationError, model_validator

from budgetthink.config import Config, explain
from budgetthink.engine import Budget

REWARDS = ("exact", "max")


def reward(base: float, used: int, budget: int, kind: str = "exact", alpha: float = 0.5) -> float:
    """The shaped reward of one completion: the task's reward `base` (1.0 when correct) minus alpha times
    the relative gap |used - B| / B (`exact`) or the relative excess max(0, used - B) / B (`max`)."""
    if budget <= 0:
        raise ValueError(f"a thinking budget must be positive, got {budget}")
    if kind == "exact":
        gap = abs(used - budget) / budget
    elif kind == "max":
        gap = max(0, used - budget) / budget
    else:
        raise ValueError(f"unknown budget reward {kind!r}; use {' or '.join(REWARDS)}")
    return float(base) - alpha * gap


class BudgetCurriculum(Config):
    """Budget-aware RL: each rollout group is told a thinking budget B drawn from this distribution (stated
    in the prompt by the think format), optionally enforced by budget forcing, and rewarded for the thinking
    it used against B. Give either `budgets` (with optional `weights`) or `log_uniform`."""

    budgets: list[int] | None = Field(None, description="budgets to draw from (thinking tokens), e.g. [16, 32, 64, 128]")
    weights: list[float] | None = Field(None, description="relative weight of each listed budget (None: uniform)")
    log_uniform: tuple[int, int] | None = Field(
        None, description="[lo, hi]: draw B log-uniformly between lo and hi, rounded to a whole token count")
    buckets: int = Field(4, ge=1, description="log_uniform: log-spaced budget buckets for the per-bucket metrics")
    enforce: Literal["none", "max", "slack"] = Field(
        "none", description="budget forcing on top of the stated B: none, a cap at B, or a cap at B x slack")
    slack: float = Field(1.5, ge=1, description="enforce: slack caps thinking at ceil(B x slack)")
    reward: Literal["exact", "max"] = Field(
        "exact", description="exact: base - alpha |used-B|/B (LCPO-Exact); max: base - alpha max(0, used-B)/B")
    alpha: float = Field(0.5, ge=0, description="weight of the relative length gap in the reward")
    eval_budgets: list[int] | None = Field(
        None, description="budgets of the held-out evaluation (None: the listed budgets, or one per bucket)")

    @model_validator(mode="after")
    def _check(self):
        if (self.budgets is None) == (self.log_uniform is None):
            raise ValueError("give either budgets (a list, optionally with weights) or log_uniform: [lo, hi]")
        if self.budgets is not None:
            if not self.budgets or any(b < 1 for b in self.budgets):
                raise ValueError(f"budgets must be positive token counts, e.g. [16, 32, 64], got {self.budgets}")
            if len(set(self.budgets)) != len(self.budgets):
                raise ValueError(f"budgets are listed twice: {self.budgets}; give each once and use weights")
            if self.weights is not None and (len(self.weights) != len(self.budgets) or any(w < 0 for w in self.weights)
                                             or sum(self.weights) <= 0):
                raise ValueError(f"weights must be {len(self.budgets)} non-negative numbers, one per budget, "
                                 f"not all 0 (got {self.weights})")
        elif self.weights is not None:
            raise ValueError("weights apply to a list of budgets, not to log_uniform")
        else:
            lo, hi = self.log_uniform
            if not 1 <= lo < hi:
                raise ValueError(f"log_uniform needs 1 <= lo < hi, got [{lo}, {hi}]")
        if self.eval_budgets is not None and (not self.eval_budgets or any(b < 1 for b in self.eval_budgets)):
            raise ValueError(f"eval_budgets must be positive token counts, got {self.eval_budgets}")
        return self

    # --- drawing ---------------------------------------------------------------------------------------------
    def draw(self, rng: np.random.Generator | int, k: int) -> list[int]:
        """k budgets, deterministic for the generator (or seed) given."""
        rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
        if self.budgets is not None:
            w = np.asarray(self.weights if self.weights is not None else [1.0] * len(self.budgets), dtype=float)
            idx = rng.choice(len(self.budgets), size=k, p=w / w.sum())
            return [int(self.budgets[i]) for i in idx]
        lo, hi = self.log_uniform
        x = np.exp(rng.uniform(math.log(lo), math.log(hi), size=k))
        return [int(b) for b in np.clip(np.rint(x), lo, hi)]

    @property
    def largest(self) -> int:
        return max(self.budgets) if self.budgets is not None else self.log_uniform[1]

    # --- the engine ------------------------------------------------------------------------------------------
    def cap(self, budget: int) -> int | None:
        """What budget forcing caps thinking at for a stated B (None: no cap from the curriculum)."""
        return {"none": None, "max": budget, "slack": math.ceil(budget * self.slack)}[self.enforce]

    def engine_budget(self, budget: int, base: Budget | None = None) -> Budget | None:
        """The engine's Budget for a group told B: `base` (the run's own budget) with its maximum replaced by
        the curriculum's cap; `base` unchanged when nothing is enforced."""
        cap = self.cap(budget)
        if cap is None:
            return base
        fields = (base.model_dump() if base is not None else {}) | {"max_thinking_tokens": cap}
        try:  # Budget's own check (min <= max), named for this curriculum
            return Budget(**fields)
        except ValidationError as e:
            raise explain(Budget, e, f"budget.min_thinking_tokens under the enforced cap {cap} for budget {budget}") from None

    def engine_calls(self, budgets: list[int], base: Budget | None = None) -> list[tuple[Budget | None, list[int]]]:
        """Prompt indices grouped by the engine Budget they need (the engine takes one per generate call):
        [(Budget, [i, ...]), ...] in order of first appearance; a single call when nothing is enforced."""
        calls: dict[int | None, list[int]] = {}
        for i, b in enumerate(budgets):
            calls.setdefault(self.cap(b), []).append(i)
        return [(self.engine_budget(budgets[idx[0]], base), idx) for idx in calls.values()]

    # --- the reward ------------------------------------------------------------------------------------------
    def shape(self, base: float, used: int, budget: int) -> float:
        """This curriculum's reward (see `reward`)."""
        return reward(base, used, budget, self.reward, self.alpha)

    # --- buckets and evaluation ------------------------------------------------------------------------------
    def bucket_ranges(self) -> list[tuple[int, int]]:
        """[(first, last), ...] whole budgets per bucket: each listed budget alone, or for a range `buckets`
        bins with log-spaced edges lo * (hi/lo)^(i/buckets) (empty bins dropped)."""
        if self.budgets is not None:
            return [(b, b) for b in sorted(self.budgets)]
        lo, hi = self.log_uniform
        edges = [lo * (hi / lo) ** (i / self.buckets) for i in range(self.buckets + 1)]
        starts = [lo] + [math.ceil(e - 1e-9) for e in edges[1:-1]]
        ends = [s - 1 for s in starts[1:]] + [hi]
        return [(s, e) for s, e in zip(starts, ends) if s <= e]

    def labels(self) -> list[str]:
        return [f"B{s}" if s == e else f"B{s}-{e}" for s, e in self.bucket_ranges()]

    def bucket(self, budget: int) -> str:
        """The label of the bucket holding B (budgets outside every bucket, e.g. eval ones, get their own)."""
        for (s, e), label in zip(self.bucket_ranges(), self.labels()):
            if s <= budget <= e:
                return label
        return f"B{budget}"

    def eval_points(self) -> list[int]:
        """Budgets of the held-out evaluation: eval_budgets, the listed budgets, or each bucket's geometric
        middle."""
        if self.eval_budgets is not None:
            return sorted(set(self.eval_budgets))
        if self.budgets is not None:
            return sorted(self.budgets)
        return sorted({round(math.sqrt(s * e)) for s, e in self.bucket_ranges()})

    def check_room(self, max_response_tokens: int) -> None:
        """A stated budget the completion cap cuts off can never be met: raise ValueError naming both."""
        top = max([self.largest] + (self.eval_budgets or []))
        top = self.cap(top) or top
        if top >= max_response_tokens:
            raise ValueError(f"budget_curriculum allows {top} thinking tokens but max_response_tokens is "
                             f"{max_response_tokens}; raise max_response_tokens above it (room for the answer too)")


# --- metrics -----------------------------------------------------------------------------------------------------
def budget_metrics(budgets: list[int], used: list[int], correct: list[bool], buckets: list[str] | None = None,
                   labels: list[str] = ()) -> dict:
    """Per-sample budgets, thinking tokens used and correctness -> `budget_error` (mean |used - B| / B),
    `over_budget` (share with used > B) and `thinking_mean`; with `buckets` (a label per sample), for each
    label (of `labels`, then of `buckets`) `accuracy_<label>` and `thinking_<label>`, None for a label no
    sample fell in, so that every step logs the same keys."""
    if not budgets:
        return {}
    out = {"budget_error": float(np.mean([abs(u - b) / b for u, b in zip(used, budgets, strict=True)])),
           "over_budget": float(np.mean([u > b for u, b in zip(used, budgets)])),
           "thinking_mean": float(np.mean(used))}
    for label in dict.fromkeys([*labels, *(buckets or [])]):
        pick = [i for i, x in enumerate(buckets) if x == label]
        out[f"accuracy_{label}"] = float(np.mean([bool(correct[i]) for i in pick])) if pick else None
        out[f"thinking_{label}"] = float(np.mean([used[i] for i in pick])) if pick else None
    return out


def rollout_metrics(cur: BudgetCurriculum, rollouts: list) -> dict:
    """`budget_metrics` of RL rollouts (each with .budget, .completion.thinking_tokens, .score.correct),
    bucketed by the curriculum."""
    budgets = [r.budget for r in rollouts]
    return budget_metrics(budgets, [r.completion.thinking_tokens for r in rollouts],
                          [r.score.correct for r in rollouts], [cur.bucket(b) for b in budgets], cur.labels())
