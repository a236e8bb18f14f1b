"""RL losses and advantage estimators as pure tensor functions (GRPO family, REINFORCE++, PPO).

Shapes: B sequences (rows, prompt-major: the n samples of prompt 0 first), n samples per prompt,
T response tokens (right-padded), V vocabulary. `mask [B, T]` is 1.0 where a token counts: sampled by
the model (never a token inserted by budget forcing) and not padding.

    adv = grpo_advantages(rewards, n)                          # [B]  group-normalised outcome advantage
    loss_tok, clipped = policy_loss(logp, old_logp, adv[:, None].expand_as(logp), 0.2, 0.28)
    loss = aggregate(loss_tok, mask, "token-mean")              # scalar

    # PPO (TinyZero): k1 KL folded into token rewards, the score on the last response token, GAE
    rew = token_rewards(scores, mask, kl_penalty(old_logp, ref_logp, "k1"), beta=0.001)   # [B, T]
    adv, ret = gae(rew, values, mask, gamma=1.0, lam=1.0)                                # [B, T] each
    adv = whiten(adv, mask)

Formulas follow the papers and veRL's conventions where those are the reference:
- GRPO (DeepSeekMath): A_i = (r_i - mean_group) / (std_group + eps), std unbiased; std optional.
- Dr. GRPO (Liu et al. 2025): A_i = r_i - mean_group, and loss normalised by a constant, not |o_i|.
- RLOO (Ahmadian et al. 2024): A_i = r_i - mean of the other n-1 rewards of the group.
- REINFORCE++ (Hu 2025): discounted return of the token rewards, whitened over the whole batch.
- PPO clip with clip-higher (DAPO): separate low and high bounds; dual clip (Ye et al. 2020) bounds the
  loss at -c * A for negative advantages.
- KL estimators (Schulman, "Approximating KL divergence"): k1 = log p - log p_ref,
  k3 = p_ref/p - 1 - log(p_ref/p).
- GAE (Schulman et al. 2016) over the tokens where mask is 1; a masked token in the middle (inserted by
  the engine) is skipped: it carries the next value and the running advantage through unchanged.
"""

import math
from dataclasses import dataclass

import torch

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


# --- masked statistics ------------------------------------------------------------------------------------
def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of x where mask is 1 (over `dim`, or everything). An all-zero mask gives 0."""
    mask = mask.to(x.dtype)
    total = (x * mask).sum() if dim is None else (x * mask).sum(dim)
    count = mask.sum() if dim is None else mask.sum(dim)
    return total / count.clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of x where mask is 1 (scalar); unbiased (n-1) by default."""
    mask = mask.to(x.dtype)
    mean = masked_mean(x, mask)
    count = mask.sum()
    var = (((x - mean) ** 2) * mask).sum() / count.clamp(min=1.0)
    if unbiased and count > 1:
        var = var * count / (count - 1)
    return var


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) with masked mean and unbiased variance; masked entries are set to 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


# --- outcome advantages (one scalar per sequence) ------------------------------------------------------
def _groups(rewards: torch.Tensor, n: int) -> torch.Tensor:
    if rewards.dim() != 1 or rewards.numel() % n:
        raise ValueError(f"rewards must be 1-D with a length divisible by the group size {n}, got {tuple(rewards.shape)}")
    return rewards.view(-1, n)  # [B/n, n]


def grpo_advantages(rewards: torch.Tensor, n: int, norm_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: rewards [B] -> advantages [B]: (r - group mean) / (group std + eps), std unbiased.

    Without std normalisation this is Dr. GRPO's advantage. A group of one (n=1) has no baseline:
    its advantage is its reward (mean 0, std 1), as veRL does. A group whose rewards are all equal gets
    exactly 0: in float32 the mean of eight 0.1s is off by ~7e-9, and divided by std + eps = 1e-6 that
    would be an advantage of -0.0075 on every sample of the group, a steady push away from the model's own
    samples in the most common kind of group."""
    g = _groups(rewards, n)  # [B/n, n]
    if n == 1:
        return rewards.clone()
    centred = (g - g.mean(dim=1, keepdim=True)) * _spread(g)  # [B/n, n]
    if norm_std:
        centred = centred / (g.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


def _spread(g: torch.Tensor) -> torch.Tensor:
    """1 for groups whose rewards differ, 0 for groups of equal rewards: [B/n, n] -> [B/n, 1]."""
    return (g.amax(dim=1, keepdim=True) > g.amin(dim=1, keepdim=True)).to(g.dtype)


def dr_grpo_advantages(rewards: torch.Tensor, n: int) -> torch.Tensor:
    """Dr. GRPO: rewards [B] -> r - group mean (no std normalisation; pair it with seq-mean-token-sum-norm)."""
    return grpo_advantages(rewards, n, norm_std=False)


def rloo_advantages(rewards: torch.Tensor, n: int) -> torch.Tensor:
    """RLOO: rewards [B] -> r_i - mean_{j != i} r_j over the group (needs n >= 2)."""
    if n < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt (n >= 2)")
    g = _groups(rewards, n)  # [B/n, n]
    others = (g.sum(dim=1, keepdim=True) - g) / (n - 1)  # [B/n, n] leave-one-out baseline
    return ((g - others) * _spread(g)).reshape(-1)  # equal rewards: exactly 0 (see grpo_advantages)


def outcome_advantages(estimator: str, rewards: torch.Tensor, n: int, norm_std: bool = True) -> torch.Tensor:
    """Dispatch for the outcome estimators: grpo, dr_grpo, rloo. rewards [B] -> [B]."""
    if estimator == "grpo":
        return grpo_advantages(rewards, n, norm_std=norm_std)
    if estimator == "dr_grpo":
        return dr_grpo_advantages(rewards, n)
    if estimator == "rloo":
        return rloo_advantages(rewards, n)
    raise ValueError(f"unknown outcome estimator {estimator!r}")


# --- token-level rewards, returns, REINFORCE++ and GAE ------------------------------------------------
def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last position where mask is 1, per row: mask [B, T] -> [B] (0 for an empty row)."""
    T = mask.shape[1]
    pos = torch.arange(T, device=mask.device).expand_as(mask)  # [B, T]
    return torch.where(mask > 0, pos, torch.zeros_like(pos)).max(dim=1).values


def token_rewards(scores: torch.Tensor, mask: torch.Tensor, kl: torch.Tensor | None = None,
                  beta: float = 0.0) -> torch.Tensor:
    """scores [B] on the last counted token, minus beta * kl [B, T] on every counted token -> [B, T].

    This is TinyZero's (veRL's) token reward: the verifier's score sits on the last response token and
    the KL penalty (k1 by default) is spread over every token. Rows whose mask is empty get nothing."""
    mask = mask.to(scores.dtype)
    rew = torch.zeros_like(mask)  # [B, T]
    if kl is not None and beta:
        rew = rew - beta * kl * mask
    has = mask.sum(dim=1) > 0  # [B]
    idx = last_token_index(mask)  # [B]
    rows = torch.arange(mask.shape[0], device=mask.device)
    rew[rows[has], idx[has]] += scores[has]
    return rew


def discounted_returns(rew: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """G_t = r_t + gamma * G_{t+1} over counted tokens (masked tokens are skipped, their G is 0). [B, T]."""
    mask = mask.to(rew.dtype)
    out = torch.zeros_like(rew)
    running = torch.zeros_like(rew[:, 0])  # [B]
    for t in reversed(range(rew.shape[1])):
        m = mask[:, t]
        running = m * (rew[:, t] + gamma * running) + (1 - m) * running
        out[:, t] = running * m
    return out


def reinforce_pp_advantages(rew: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """REINFORCE++: token rewards [B, T] -> discounted returns whitened over the whole batch [B, T]."""
    return whiten(discounted_returns(rew, mask, gamma), mask)


def gae(rew: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation: rewards, values, mask [B, T] -> (advantages, returns) [B, T].

        delta_t = r_t + gamma * V_{t+1} - V_t        (V after the last counted token is 0)
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t

    Masked tokens are not steps: they pass the next value and the running advantage through, and get
    advantage and return 0. With gamma = lam = 1 and the score on the last token, A_t = score - V_t."""
    mask = mask.to(rew.dtype)
    B, T = rew.shape
    adv = torch.zeros_like(rew)
    next_value = torch.zeros(B, dtype=rew.dtype, device=rew.device)  # [B]
    running = torch.zeros(B, dtype=rew.dtype, device=rew.device)  # [B]
    for t in reversed(range(T)):
        m = mask[:, t]
        delta = rew[:, t] + gamma * next_value - values[:, t]
        new_running = delta + gamma * lam * running
        running = m * new_running + (1 - m) * running
        next_value = m * values[:, t] + (1 - m) * next_value
        adv[:, t] = running * m
    returns = (adv + values) * mask
    return adv, returns


# --- KL, entropy, log-probs ---------------------------------------------------------------------------
def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from log-probs [B, T] of the sampled tokens -> [B, T].

    k1 = log p - log p_ref (unbiased, can be negative); k3 = p_ref/p - 1 - log(p_ref/p) (unbiased,
    always >= 0, lower variance; veRL's "low_var_kl", clamped to [-10, 10] as there)."""
    if kind == "k1":
        return logp - ref_logp
    if kind == "k3":
        log_ratio = ref_logp - logp
        return (torch.exp(log_ratio) - 1 - log_ratio).clamp(-10.0, 10.0)
    raise ValueError(f"unknown KL estimator {kind!r}; use k1 or k3")


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per position: logits [B, T, V] -> [B, T]."""
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)  # [B, T]
    return lse - (torch.softmax(logits, dim=-1) * logits).sum(dim=-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] per position: logits [B, T, V], tokens [B, T] -> [B, T] (float32)."""
    logits = logits.float()
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # [B, T]
    return picked - torch.logsumexp(logits, dim=-1)


def head_logprobs(hidden: torch.Tensor, head: torch.nn.Module, tokens: torch.Tensor, temperature: float = 1.0,
                  entropy: bool = False, entropy_grad: bool = False, chunk_bytes: int = 1 << 26):
    """(log p(token) [N], entropy [N] or None) under softmax(head(hidden) / temperature), for hidden [N, H] and
    tokens [N], without ever holding the [N, V] logits: rows go through the head in chunks of about
    `chunk_bytes` of float32 logits, and backward recomputes each chunk's logits (on a 49k vocabulary the
    logits of 64 rows x 512 tokens are 6.4 GB a copy; a chunk is 64 MB). The entropy carries a gradient only
    with entropy_grad. Under autocast the head's matmuls run in the autocast dtype, as the model's would."""
    rows = max(1, chunk_bytes // (4 * head.weight.shape[0]))
    lp, ent = _HeadLogprobs.apply(hidden, head.weight, head.bias, tokens, temperature, rows, entropy, entropy_grad)
    return lp, ent if entropy else None


class _HeadLogprobs(torch.autograd.Function):
    """Chunked log-softmax over the lm-head. With z = (h W^T + b) / T, p = softmax(z), per row:
        lp = z[t] - logsumexp(z)      d lp / dz = onehot(t) - p
        H  = -sum p log p             d H  / dz = -p (log p + H)
    and the chain through z: dh = dz W / T, dW = dz^T h / T, db = sum dz / T."""

    @staticmethod
    def _logits(h, weight, bias, temperature):
        return torch.nn.functional.linear(h, weight, bias).float() / temperature  # [n, V]

    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, temperature, rows, entropy, entropy_grad):
        lp, lse, ent = [], [], []
        for i in range(0, hidden.shape[0], rows):
            z = _HeadLogprobs._logits(hidden[i:i + rows], weight, bias, temperature)
            lse.append(torch.logsumexp(z, -1))  # [n]
            logp = z - lse[-1][:, None]  # [n, V]
            lp.append(logp.gather(-1, tokens[i:i + rows, None])[:, 0])
            if entropy:
                ent.append(-(logp.exp() * logp).sum(-1))
        empty = hidden.new_zeros(0, dtype=torch.float32)
        lp, lse = (torch.cat(x) if x else empty for x in (lp, lse))
        ent = torch.cat(ent) if ent else empty
        ctx.save_for_backward(hidden, weight, bias, tokens, lse, ent)
        ctx.temperature, ctx.rows, ctx.entropy_grad = temperature, rows, entropy and entropy_grad
        ctx.autocast = (hidden.device.type, torch.is_autocast_enabled(hidden.device.type),
                        torch.get_autocast_dtype(hidden.device.type))
        if not ctx.entropy_grad:
            ctx.mark_non_differentiable(ent)
        return lp, ent

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        hidden, weight, bias, tokens, lse, ent = ctx.saved_tensors
        T, rows = ctx.temperature, ctx.rows
        d_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        d_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        d_bias = torch.zeros_like(bias, dtype=torch.float32) if bias is not None and ctx.needs_input_grad[2] else None
        device, on, dtype = ctx.autocast
        with torch.autocast(device, dtype=dtype, enabled=on):
            for i in range(0, hidden.shape[0], rows):
                h, t = hidden[i:i + rows], tokens[i:i + rows]
                z = _HeadLogprobs._logits(h, weight, bias, T)
                logp = z - lse[i:i + rows, None]  # [n, V]
                p = logp.exp()
                dz = p * -g_lp[i:i + rows, None]
                dz.scatter_add_(-1, t[:, None], g_lp[i:i + rows, None])
                if ctx.entropy_grad and g_ent is not None:
                    dz -= g_ent[i:i + rows, None] * p * (logp + ent[i:i + rows, None])
                dz /= T
                if d_hidden is not None:
                    d_hidden[i:i + rows] = dz.to(weight.dtype) @ weight
                if d_weight is not None:
                    d_weight += dz.T @ h.float()
                if d_bias is not None:
                    d_bias += dz.sum(0)
        return (d_hidden, d_weight.to(weight.dtype) if d_weight is not None else None,
                d_bias.to(bias.dtype) if d_bias is not None else None, None, None, None, None, None)


# --- policy loss and aggregation ------------------------------------------------------------------------
def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, clip_low: float = 0.2,
                clip_high: float = 0.2, dual_clip: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped surrogate per token: logp, old_logp, adv [B, T] -> (loss [B, T], clipped [B, T] bool).

        ratio = exp(logp - old_logp)
        loss  = max(-A * ratio, -A * clamp(ratio, 1 - clip_low, 1 + clip_high))
        dual clip (c > 1): where A < 0, loss = min(loss, -c * A)

    `clipped` marks tokens whose loss came from a clipped branch (their gradient is zero)."""
    ratio = torch.exp(logp - old_logp)  # [B, T]
    unclipped = -adv * ratio
    clipped_term = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped_term)
    clipped = clipped_term > unclipped
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
        bound = -adv * dual_clip
        dual = (adv < 0) & (loss > bound)
        loss = torch.where(dual, bound, loss)
        clipped = clipped | dual
    return loss, clipped


def aggregate(loss: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean",
              norm_len: int | None = None) -> torch.Tensor:
    """Reduce a per-token loss [B, T] to a scalar over counted tokens.

    token-mean:              sum(loss * mask) / sum(mask)                (DAPO; veRL's default)
    seq-mean-token-mean:     mean over rows of (row sum / row count)    (GRPO as published)
    seq-mean-token-sum-norm: sum(loss * mask) / (B * norm_len)           (Dr. GRPO: a constant normaliser,
                             norm_len = the maximum response length, T if not given)"""
    mask = mask.to(loss.dtype)
    if mode == "token-mean":
        return (loss * mask).sum() / mask.sum().clamp(min=1.0)
    if mode == "seq-mean-token-mean":
        per_seq = (loss * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)  # [B]
        return per_seq.mean()
    if mode == "seq-mean-token-sum-norm":
        L = norm_len if norm_len is not None else loss.shape[1]
        return (loss * mask).sum() / (loss.shape[0] * L)
    raise ValueError(f"unknown loss aggregation {mode!r}; use one of {', '.join(LOSS_AGG_MODES)}")


# --- truncated completions -------------------------------------------------------------------------------
def overlong_penalty(lengths: torch.Tensor, max_len: int, cache_len: int) -> torch.Tensor:
    """DAPO's soft overlong punishment: lengths [B] -> penalty [B] (added to the reward).

        0                                   if L <= max_len - cache_len
        (max_len - cache_len - L) / cache_len  inside the last cache_len tokens (0 down to -1)
        -1                                  if L > max_len"""
    lengths = lengths.to(torch.float32)
    start = max_len - cache_len
    pen = (start - lengths) / max(cache_len, 1)
    pen = torch.where(lengths <= start, torch.zeros_like(pen), pen)
    return torch.where(lengths > max_len, -torch.ones_like(pen), pen)


# --- PPO critic --------------------------------------------------------------------------------------------
def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               clip: float | None = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss per token: [B, T] each -> (loss [B, T], clipped [B, T] bool).

        v_clip = old_v + clamp(v - old_v, -clip, clip)
        loss   = 0.5 * max((v - R)^2, (v_clip - R)^2)        (0.5 * (v - R)^2 without a clip)"""
    plain = (values - returns) ** 2
    if clip is None:
        return 0.5 * plain, torch.zeros_like(plain, dtype=torch.bool)
    v_clip = old_values + (values - old_values).clamp(-clip, clip)
    clipped_sq = (v_clip - returns) ** 2
    return 0.5 * torch.maximum(plain, clipped_sq), clipped_sq > plain


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var[R - V] / Var[R] over counted tokens (nan if the returns do not vary)."""
    var_r = masked_var(returns, mask)
    if var_r <= 0:
        return float("nan")
    return float(1.0 - masked_var(returns - values, mask) / var_r)


@dataclass
class KLController:
    """The coefficient of the KL penalty in the reward: fixed, or adaptive (Ziegler et al. 2019).

    Adaptive: after each step, err = clip(kl / target - 1, -0.2, 0.2) and
    coef *= 1 + err * n_steps / horizon, so the measured KL is steered towards `target`."""

    coef: float
    target: float | None = None  # None: fixed coefficient
    horizon: int = 10000

    def update(self, kl: float, n_steps: int = 1) -> float:
        if self.target is not None and math.isfinite(kl):
            err = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.coef *= 1.0 + err * n_steps / self.horizon
        return self.coef
