"""PPO's math against plain-Python reference versions of the formulas, and its invariants."""

from __future__ import annotations

import math

import pytest
import torch

from lmcycle.align.ppo import (
    PpoSettings,
    adaptive_beta,
    finish_scores,
    gae,
    kl_estimates,
    per_token_rewards,
    policy_loss,
    steps_per_rollout,
    token_entropy,
    token_logprobs,
    value_loss,
    whiten,
)
from lmcycle.errors import LmcycleError


def reference_gae(rewards: list[float], values: list[float], gamma: float, lam: float) -> list[float]:
    """Textbook GAE for one episode of length T (no bootstrap past the end), written as the sum of discounted
    TD errors: A_t = sum_k (γλ)^k δ_{t+k}."""
    T = len(rewards)
    deltas = [rewards[t] + gamma * (values[t + 1] if t + 1 < T else 0.0) - values[t] for t in range(T)]
    return [sum((gamma * lam) ** k * deltas[t + k] for k in range(T - t)) for t in range(T)]


def test_gae_matches_the_textbook_sum_and_ignores_padding():
    gen = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(3, 5, generator=gen), torch.randn(3, 5, generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.float)
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    for row in range(3):
        n = int(mask[row].sum())
        expected = reference_gae(rewards[row, :n].tolist(), values[row, :n].tolist(), 0.9, 0.8)
        assert adv[row, :n].tolist() == pytest.approx(expected, abs=1e-5)
        assert adv[row, n:].abs().sum() == 0 and ret[row, n:].abs().sum() == 0
        assert ret[row, :n].tolist() == pytest.approx((adv[row, :n] + values[row, :n]).tolist(), abs=1e-6)


def test_gae_with_lambda_one_and_zero_values_is_the_return_to_go():
    rewards = torch.tensor([[0.5, -1.0, 2.0]])
    adv, _ = gae(rewards, torch.zeros(1, 3), torch.ones(1, 3), gamma=1.0, lam=1.0)
    assert adv[0].tolist() == pytest.approx([1.5, 1.0, 2.0])


def test_per_token_rewards_put_the_score_on_the_last_response_token():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.float)
    r = per_token_rewards(torch.tensor([1.0, -2.0]), kl, mask, beta=0.5)
    assert r[0].tolist() == pytest.approx([-0.05, -0.1, -0.15 + 1.0])
    assert r[1].tolist() == pytest.approx([-0.2, -0.25 - 2.0, 0.0])  # the padded position's KL is ignored


def test_kl_estimators_agree_in_expectation_and_k3_is_never_negative():
    gen = torch.Generator().manual_seed(1)
    p_logits = torch.randn(6, generator=gen)
    q_logits = p_logits + 0.3 * torch.randn(6, generator=gen)  # a policy near its reference, as in RLHF
    logp_all, logq_all = torch.log_softmax(p_logits, 0), torch.log_softmax(q_logits, 0)
    exact = float((logp_all.exp() * (logp_all - logq_all)).sum())
    tokens = torch.multinomial(logp_all.exp(), 200_000, replacement=True, generator=gen)
    k1, k3 = kl_estimates(logp_all[tokens], logq_all[tokens])
    assert float(k1.mean()) == pytest.approx(exact, rel=0.05)
    assert float(k3.mean()) == pytest.approx(exact, rel=0.05)
    assert float(k3.min()) >= 0 and float(k1.min()) < 0  # k1 is negative on some tokens; k3 never
    assert float(k3.var()) < float(k1.var())  # k3's advantage near the reference (Schulman, 2020)


def test_whiten_gives_zero_mean_unit_variance_over_valid_positions_only():
    x = torch.tensor([[1.0, 2.0, 3.0], [10.0, 100.0, 1000.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.float)
    w = whiten(x, mask)
    valid = w[mask.bool()]
    assert float(valid.mean()) == pytest.approx(0.0, abs=1e-6)
    assert float(valid.pow(2).mean()) == pytest.approx(1.0, abs=1e-4)
    assert w[1, 1] == 0 and w[1, 2] == 0


def test_policy_loss_clips_only_in_the_direction_that_gains():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 1.5, 0.5, 0.5]]))
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    loss, clipped = policy_loss(logp, old, adv, clip=0.2)
    # ratio 1.5, A>0: capped at 1.2; A<0: the unclipped (worse) term; ratio 0.5, A>0: unclipped; A<0: 0.8.
    assert loss[0].tolist() == pytest.approx([-1.2, 1.5, -0.5, 0.8], abs=1e-6)
    assert clipped[0].tolist() == [1.0, 0.0, 0.0, 1.0]
    logp_var = logp.clone().requires_grad_(True)
    policy_loss(logp_var, old, adv, clip=0.2)[0].sum().backward()
    assert logp_var.grad[0, 0] == 0 and logp_var.grad[0, 3] == 0  # clipped: no gradient
    assert logp_var.grad[0, 1] != 0 and logp_var.grad[0, 2] != 0


def test_value_loss_takes_the_worse_of_clipped_and_unclipped():
    old, ret = torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, -1.0]])
    values = torch.tensor([[2.0, 0.1]])
    # row 0: V=2 → (2-1)²=1; V_clip=0.2 → (0.2-1)²=0.64 → max 1. row 1: V=0.1 → 1.21; V_clip=0.1 → 1.21.
    assert value_loss(values, old, ret, clip=0.2)[0].tolist() == pytest.approx([0.5, 0.605])


def test_logprobs_and_entropy_follow_the_temperature():
    logits = torch.tensor([[[2.0, 0.0, -1.0]]])
    tokens = torch.tensor([[0]])
    for t in (0.5, 1.0, 2.0):
        expected = torch.log_softmax(logits / t, -1)
        assert float(token_logprobs(logits, tokens, t)) == pytest.approx(float(expected[0, 0, 0]))
        assert float(token_entropy(logits, t)) == pytest.approx(float(-(expected.exp() * expected).sum()))


def test_adaptive_beta_moves_toward_the_target_and_is_clipped():
    assert adaptive_beta(0.1, kl=0.2, target=0.1, episodes=100, horizon=1000) == pytest.approx(0.1 * 1.02)
    assert adaptive_beta(0.1, kl=0.05, target=0.1, episodes=100, horizon=1000) == pytest.approx(0.1 * 0.98)  # -0.5 clipped to -0.2
    assert adaptive_beta(0.1, kl=0.1, target=0.1, episodes=100, horizon=1000) == pytest.approx(0.1)


def test_missing_eos_penalty_and_score_clip():
    cfg = PpoSettings(missing_eos_penalty=1.0, score_clip=2.0)
    out = finish_scores(torch.tensor([0.5, 0.5, 5.0, -5.0]), ["eos", "length", "stop", "length"], cfg)
    assert out.tolist() == pytest.approx([0.5, -0.5, 2.0, -2.0])


def test_steps_per_rollout_and_a_rollout_that_does_not_split():
    assert steps_per_rollout(PpoSettings(rollout_size=16, ppo_epochs=4), batch_size=4, grad_accum=2) == 8
    with pytest.raises(LmcycleError, match="multiple"):
        steps_per_rollout(PpoSettings(rollout_size=10), batch_size=4, grad_accum=1)
    assert math.isfinite(adaptive_beta(0.05, 0.0, 0.1, 1, 1))


def test_one_log_softmax_gives_both_logprobs_and_entropy():
    from lmcycle.align.ppo import logprobs_and_entropy

    logits = torch.randn(2, 3, 7, generator=torch.Generator().manual_seed(2), requires_grad=True)
    tokens = torch.tensor([[0, 3, 6], [1, 1, 2]])
    logp, entropy = logprobs_and_entropy(logits, tokens, 0.8, entropy_grad=False)
    assert torch.allclose(logp, token_logprobs(logits, tokens, 0.8))
    assert torch.allclose(entropy, token_entropy(logits, 0.8))
    assert logp.requires_grad and not entropy.requires_grad  # measured only when its coefficient is 0
    assert logprobs_and_entropy(logits, tokens, 0.8)[1].requires_grad
