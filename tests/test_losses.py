"""Every advantage estimator and loss mode against small examples computed by hand.

The expected numbers are written out (with the arithmetic in comments); none is recomputed by the code
under test.
"""

import math

import pytest
import torch

from budgetthink.train import losses as L


def t(x):
    return torch.tensor(x, dtype=torch.float32)


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a, t(b) if not isinstance(b, torch.Tensor) else b, atol=tol, rtol=0)


# --- outcome advantages -----------------------------------------------------------------------------------
REWARDS = [1.0, 0.0, 0.0, 1.0, 0.1, 0.1, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0]  # 3 groups of n=4


def test_grpo_group_mean_and_unbiased_std():
    # group 1: mean 0.5, deviations +-0.5, unbiased var = 4*0.25/3 = 1/3, std 0.577350 -> 0.5/0.577351 = 0.866024
    # group 2: mean 0.3, deviations [-0.2, -0.2, 0.7, -0.3], var = 0.66/3 = 0.22, std 0.469042
    # group 3: no spread -> 0 / (0 + eps) = 0
    adv = L.grpo_advantages(t(REWARDS), n=4)
    close(adv, [0.866024, -0.866024, -0.866024, 0.866024,
                -0.426401, -0.426401, 1.492402, -0.639601,
                0.0, 0.0, 0.0, 0.0])


def test_grpo_without_std_and_dr_grpo():
    want = [0.5, -0.5, -0.5, 0.5, -0.2, -0.2, 0.7, -0.3, 0.0, 0.0, 0.0, 0.0]
    close(L.grpo_advantages(t(REWARDS), n=4, norm_std=False), want)
    close(L.dr_grpo_advantages(t(REWARDS), n=4), want)


def test_groups_of_equal_rewards_get_exactly_zero():
    # eight format-only rewards (0.1 in float32): their float32 mean is 0.1 + 7.45e-9, which divided by
    # std + eps = 0 + 1e-6 would give every sample -0.0075. The second group has spread: 1 - 0.2125 etc.
    rewards = t([0.1] * 8 + [0.1] * 7 + [1.0])
    for adv in (L.grpo_advantages(rewards, n=8), L.dr_grpo_advantages(rewards, n=8), L.rloo_advantages(rewards, n=8)):
        assert adv[:8].tolist() == [0.0] * 8
    # group 2, no std: mean 0.2125 -> 0.1 - 0.2125 = -0.1125 (x7), 1 - 0.2125 = 0.7875
    close(L.dr_grpo_advantages(rewards, n=8)[8:], [-0.1125] * 7 + [0.7875])


def test_grpo_group_of_one_is_the_reward():
    close(L.grpo_advantages(t([0.1, 1.0]), n=1), [0.1, 1.0])


def test_rloo_leave_one_out_baseline():
    # group 2: sum 1.2; 0.1 - 1.1/3 = -0.266667; 1 - 0.2/3 = 0.933333; 0 - 1.2/3 = -0.4
    adv = L.rloo_advantages(t(REWARDS), n=4)
    close(adv, [0.666667, -0.666667, -0.666667, 0.666667,
                -0.266667, -0.266667, 0.933333, -0.4,
                0.0, 0.0, 0.0, 0.0])
    with pytest.raises(ValueError):
        L.rloo_advantages(t([1.0, 0.0]), n=1)


def test_outcome_dispatch_and_bad_shapes():
    close(L.outcome_advantages("dr_grpo", t([1.0, 0.0]), 2), [0.5, -0.5])
    with pytest.raises(ValueError):
        L.grpo_advantages(t([1.0, 0.0, 1.0]), n=2)
    with pytest.raises(ValueError):
        L.outcome_advantages("ppo", t([1.0, 0.0]), 2)


# --- token rewards, REINFORCE++ ---------------------------------------------------------------------------
def test_token_rewards_score_on_last_counted_token_and_kl_everywhere():
    scores = t([1.0, 0.1])
    mask = t([[1, 1, 1, 0], [1, 0, 1, 1]])
    kl = t([[0.1, 0.2, -0.1, 5.0], [0.3, 7.0, 0.0, 0.4]])
    rew = L.token_rewards(scores, mask, kl, beta=0.5)
    # row 0: -0.5*[0.1, 0.2, -0.1] and +1 on index 2 (index 3 is padding)
    # row 1: -0.5*0.3 at 0; index 1 is inserted (masked); 0 at 2; -0.5*0.4 + 0.1 at 3
    close(rew, [[-0.05, -0.1, 1.05, 0.0], [-0.15, 0.0, 0.0, -0.1]])
    close(L.token_rewards(scores, mask), [[0, 0, 1.0, 0], [0, 0, 0, 0.1]])
    close(L.token_rewards(t([1.0]), t([[0, 0]])), [[0.0, 0.0]])  # empty row: nothing


def test_reinforce_pp_returns_whitened_over_batch():
    rew = t([[0, 0, 1.0], [0, 0.5, 0]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    # gamma 1: returns [1,1,1] and [0.5,0.5,-]; mean 0.8, devs 0.2 x3, -0.3 x2, var = 0.3/4 = 0.075
    close(L.reinforce_pp_advantages(rew, mask, gamma=1.0),
          [[0.730297, 0.730297, 0.730297], [-1.095445, -1.095445, 0.0]])
    # gamma 0.5: returns [0.25, 0.5, 1] and [0.25, 0.5, -]; mean 0.5, var = 0.375/4 = 0.09375, std 0.306186
    close(L.reinforce_pp_advantages(rew, mask, gamma=0.5),
          [[-0.816497, 0.0, 1.632993], [-0.816497, 0.0, 0.0]])


# --- GAE ----------------------------------------------------------------------------------------------------
def test_gae_gamma_lambda_one_is_score_minus_value():
    rew = t([[0, 0, 0, 1.0]])  # TinyZero: the score sits on the last response token
    values = t([[0.5, 0.6, 0.7, 0.8]])
    adv, ret = L.gae(rew, values, t([[1, 1, 1, 1]]), gamma=1.0, lam=1.0)
    close(adv, [[0.5, 0.4, 0.3, 0.2]])
    close(ret, [[1.0, 1.0, 1.0, 1.0]])


def test_gae_gamma_lambda_one_with_padding_and_kl():
    # score 1 on index 2, k1 KL 0.1 per token with beta 1 -> rewards [-0.1, -0.1, 0.9, pad]
    rew = L.token_rewards(t([1.0]), t([[1, 1, 1, 0]]), t([[0.1, 0.1, 0.1, 0.1]]), beta=1.0)
    values = t([[0.2, 0.3, 0.4, 7.0]])  # the padded value must not leak in
    adv, ret = L.gae(rew, values, t([[1, 1, 1, 0]]), gamma=1.0, lam=1.0)
    # returns: 0.9, 0.8, 0.7 from the end; advantages: return - value
    close(ret, [[0.7, 0.8, 0.9, 0.0]])
    close(adv, [[0.5, 0.5, 0.5, 0.0]])


def test_gae_gamma_09_lambda_08():
    rew = t([[0.1, 0.0, 1.0]])
    values = t([[0.5, 0.4, 0.6]])
    adv, ret = L.gae(rew, values, t([[1, 1, 1]]), gamma=0.9, lam=0.8)
    # d2 = 1 - 0.6 = 0.4;                 A2 = 0.4
    # d1 = 0 + 0.9*0.6 - 0.4 = 0.14;      A1 = 0.14 + 0.72*0.4 = 0.428
    # d0 = 0.1 + 0.9*0.4 - 0.5 = -0.04;   A0 = -0.04 + 0.72*0.428 = 0.26816
    close(adv, [[0.26816, 0.428, 0.4]])
    close(ret, [[0.76816, 0.828, 1.0]])


def test_gae_skips_inserted_tokens():
    # index 1 was inserted by budget forcing: not a step; its value (9.9) is never used
    rew = t([[0.0, 0.0, 1.0]])
    values = t([[0.5, 9.9, 0.6]])
    adv, ret = L.gae(rew, values, t([[1, 0, 1]]), gamma=0.9, lam=0.8)
    # A2 = 0.4; d0 = 0.9*0.6 - 0.5 = 0.04; A0 = 0.04 + 0.72*0.4 = 0.328
    close(adv, [[0.328, 0.0, 0.4]])
    close(ret, [[0.828, 0.0, 1.0]])


def test_whiten():
    x = t([[1.0, 2.0, 3.0, 100.0]])
    # masked values 1,2,3: mean 2, unbiased var 1 -> [-1, 0, 1], masked entry 0
    close(L.whiten(x, t([[1, 1, 1, 0]])), [[-1.0, 0.0, 1.0, 0.0]])
    close(L.whiten(x, t([[1, 1, 1, 0]]), shift_mean=False), [[1.0, 2.0, 3.0, 0.0]])


# --- KL, entropy, logprobs --------------------------------------------------------------------------------
def test_kl_k1_and_k3():
    logp = torch.log(t([0.5, 0.2]))
    ref = torch.log(t([0.25, 0.4]))
    # k1 = log(0.5/0.25) = ln2, log(0.2/0.4) = -ln2
    close(L.kl_penalty(logp, ref, "k1"), [0.693147, -0.693147])
    # k3 = r - 1 - ln r with r = p_ref/p: r=0.5 -> 0.5 - 1 + ln2 = 0.193147; r=2 -> 2 - 1 - ln2 = 0.306853
    close(L.kl_penalty(logp, ref, "k3"), [0.193147, 0.306853])
    with pytest.raises(ValueError):
        L.kl_penalty(logp, ref, "k2")


def test_entropy_and_token_logprobs():
    logits = t([[[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3.0), -1e9, -1e9]]])  # [1, 2, 4]
    # uniform over 4: ln 4 = 1.386294; p = [1/4, 3/4]: 0.25 ln4 + 0.75 ln(4/3) = 0.562335
    close(L.entropy_from_logits(logits), [[1.386294, 0.562335]])
    close(L.token_logprobs(logits, torch.tensor([[2, 1]])), [[-1.386294, -0.287682]])


@pytest.mark.parametrize("bias", [False, True])
def test_chunked_head_logprobs_equal_the_whole_logits_with_gradients(bias):
    """Log-probs and entropy through the lm-head in chunks of 5 rows (logits recomputed in backward, by the
    hand-written gradient) equal the same quantities from the whole [N, V] logits through autograd, and so do
    the gradients of hidden and of the head's weight (and bias)."""
    torch.manual_seed(0)
    N, H, V, temp = 37, 8, 50, 0.7
    head = torch.nn.Linear(H, V, bias=bias)
    hidden = torch.randn(N, H, requires_grad=True)
    tokens = torch.randint(0, V, (N,))
    w = torch.randn(N)  # an arbitrary upstream gradient for each output
    results = []
    for chunked in (True, False):
        head.zero_grad()
        hidden.grad = None
        if chunked:
            lp, ent = L.head_logprobs(hidden, head, tokens, temp, entropy=True, entropy_grad=True,
                                      chunk_bytes=4 * V * 5)
        else:
            logits = head(hidden)[None] / temp  # [1, N, V]
            lp, ent = L.token_logprobs(logits, tokens[None])[0], L.entropy_from_logits(logits)[0]
        ((lp + 0.3 * ent) * w).sum().backward()
        results.append((lp.detach(), ent.detach(), hidden.grad.clone(), head.weight.grad.clone(),
                        *([head.bias.grad.clone()] if bias else [])))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # no graph: no checkpointing, the same numbers
        lp, ent = L.head_logprobs(hidden, head, tokens, temp, chunk_bytes=4 * V * 5)
    torch.testing.assert_close(lp, results[1][0], atol=1e-5, rtol=1e-5)
    assert ent is None


# --- policy loss ----------------------------------------------------------------------------------------------
def test_policy_loss_clip_higher_and_dual_clip():
    ratio = t([[1.5, 0.5, 0.5, 1.5, 4.0, 1.2]])
    adv = t([[1.0, 1.0, -1.0, -1.0, -1.0, 2.0]])
    old = torch.zeros_like(ratio)
    logp = torch.log(ratio).requires_grad_(True)
    loss, clipped = L.policy_loss(logp, old, adv, clip_low=0.2, clip_high=0.28)
    # A=1 r=1.5: max(-1.5, -1.28) = -1.28 (clipped)   A=1 r=0.5: max(-0.5, -0.8) = -0.5
    # A=-1 r=0.5: max(0.5, 0.8) = 0.8 (clipped)       A=-1 r=1.5: max(1.5, 1.28) = 1.5
    # A=-1 r=4: max(4, 1.28) = 4                      A=2 r=1.2: -2.4 inside the clip range
    close(loss.detach(), [[-1.28, -0.5, 0.8, 1.5, 4.0, -2.4]])
    assert clipped.tolist() == [[True, False, True, False, False, False]]
    loss.sum().backward()
    # d/dlogp of -A*ratio is -A*ratio; zero where clipped
    close(logp.grad, [[0.0, -0.5, 0.0, 1.5, 4.0, -2.4]])

    loss2, clipped2 = L.policy_loss(torch.log(ratio), old, adv, 0.2, 0.28, dual_clip=3.0)
    # dual clip: A=-1 r=4: min(4, 3*1) = 3
    close(loss2, [[-1.28, -0.5, 0.8, 1.5, 3.0, -2.4]])
    assert clipped2.tolist() == [[True, False, True, False, True, False]]
    with pytest.raises(ValueError):
        L.policy_loss(torch.log(ratio), old, adv, dual_clip=1.0)


def test_policy_loss_symmetric_clip():
    loss, _ = L.policy_loss(torch.log(t([1.5])), t([0.0]), t([1.0]), clip_low=0.2, clip_high=0.2)
    close(loss, [-1.2])


# --- aggregation ----------------------------------------------------------------------------------------------
def test_aggregation_modes():
    loss = t([[1, 2, 3, 4], [5, 6, 0, 0]])
    mask = t([[1, 1, 1, 0], [1, 1, 0, 0]])
    close(L.aggregate(loss, mask, "token-mean"), 3.4)  # (1+2+3+5+6) / 5
    close(L.aggregate(loss, mask, "seq-mean-token-mean"), 3.75)  # (6/3 + 11/2) / 2
    close(L.aggregate(loss, mask, "seq-mean-token-sum-norm", norm_len=8), 1.0625)  # 17 / (2*8)
    close(L.aggregate(loss, mask, "seq-mean-token-sum-norm"), 2.125)  # 17 / (2*4)
    with pytest.raises(ValueError):
        L.aggregate(loss, mask, "sum")


def test_masked_tokens_get_no_gradient():
    logp = torch.zeros(1, 3, requires_grad=True)
    loss, _ = L.policy_loss(logp, torch.zeros(1, 3), torch.ones(1, 3))
    L.aggregate(loss, t([[1, 0, 1]]), "token-mean").backward()
    close(logp.grad, [[-0.5, 0.0, -0.5]])  # -A*ratio / 2 counted tokens; the inserted one gets 0


# --- truncation -----------------------------------------------------------------------------------------------
def test_overlong_penalty():
    # max 10, cache 4: free up to 6, then (6 - L)/4, -1 beyond 10
    close(L.overlong_penalty(torch.tensor([5, 6, 8, 10, 11]), max_len=10, cache_len=4), [0, 0, -0.5, -1.0, -1.0])


# --- PPO critic -----------------------------------------------------------------------------------------------
def test_value_loss_clip():
    v = t([0.8, 0.3, -0.9, 2.0])
    old = t([0.0, 0.0, 0.0, 1.0])
    ret = t([1.0, 1.0, -1.0, 1.2])
    loss, clipped = L.value_loss(v, old, ret, clip=0.5)
    # v=0.8: (0.8-1)^2 = 0.04, clipped v=0.5: 0.25 -> 0.125     v=0.3: 0.49 both -> 0.245
    # v=-0.9: 0.01, clipped -0.5: 0.25 -> 0.125                  v=2: 0.64, clipped 1.5: 0.09 -> 0.32
    close(loss, [0.125, 0.245, 0.125, 0.32])
    assert clipped.tolist() == [True, False, True, False]
    close(L.value_loss(v, old, ret, clip=None)[0], [0.02, 0.245, 0.005, 0.32])


def test_explained_variance():
    # residual [0,0,1]: unbiased var 1/3; returns var 1 -> 2/3
    assert L.explained_variance(t([[1, 2, 2]]), t([[1, 2, 3]]), t([[1, 1, 1]])) == pytest.approx(0.666667, abs=1e-5)
    assert math.isnan(L.explained_variance(t([[1, 2]]), t([[1, 1]]), t([[1, 1]])))


def test_kl_controller_fixed_and_adaptive():
    fixed = L.KLController(coef=0.001)
    assert fixed.update(5.0) == 0.001
    ada = L.KLController(coef=0.1, target=0.05, horizon=100)
    # err = clip(0.1/0.05 - 1, -0.2, 0.2) = 0.2; coef *= 1 + 0.2*10/100
    assert ada.update(0.1, n_steps=10) == pytest.approx(0.102)
    # err = -0.2: coef *= 1 - 0.2/100
    assert ada.update(0.04) == pytest.approx(0.102 * 0.998)
    # err = 0.055/0.05 - 1 = 0.1: coef *= 1.001
    assert ada.update(0.055) == pytest.approx(0.102 * 0.998 * 1.001)
