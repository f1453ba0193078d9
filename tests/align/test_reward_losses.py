"""The ranking losses of the reward model against hand computations: Plackett-Luce with tie groups, Rao-Kupper and
Davidson, their limits (k=2, θ=1, ν=0 give Bradley-Terry), finite gradients with ties, top-1 hits, labeler
weights and the ranking batch layout."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lmcycle.align.reward import (
    LearnedTie,
    collate_pairs,
    collate_rankings,
    davidson_log_probs,
    pair_loss_fn,
    pairwise_loss,
    plackett_luce_losses,
    ranked_pairs,
    ranking_loss_fn,
    ranking_units,
    rao_kupper_log_probs,
    tie_pair_losses,
    top1_hits,
    unit_weights,
)
from lmcycle.errors import LmcycleError


def lse(*xs: float) -> float:
    return math.log(sum(math.exp(x) for x in xs))


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def ranks_of(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long)


def test_plackett_luce_of_a_strict_order():
    s = [1.0, 0.5, -0.3]  # ranks 2, 1, 3: the order is s[1], s[0], s[2]
    expected = -(0.5 - lse(0.5, 1.0, -0.3)) - (1.0 - lse(1.0, -0.3)) - (-0.3 - -0.3)
    assert plackett_luce_losses(t([s]), ranks_of([[2, 1, 3]])).item() == pytest.approx(expected, rel=1e-12)


def test_plackett_luce_ties_share_the_denominator_of_what_is_not_placed_yet():
    a, b, c, d = 0.2, -0.4, 1.1, 5.0
    # a and b tie for first, c is last; d is unranked (rank 0): it is neither placed nor in any denominator
    top_tie = -(a + b) + 2 * lse(a, b, c)
    assert plackett_luce_losses(t([[a, b, c, d]]), ranks_of([[1, 1, 2, 0]])).item() == pytest.approx(top_tie)
    # a tie at the bottom still counts: the last group's own terms are -Σ s + |G|·lse(G)
    bottom_tie = -(a - lse(a, b, c)) - (b + c) + 2 * lse(b, c)
    assert plackett_luce_losses(t([[a, b, c]]), ranks_of([[1, 2, 2]])).item() == pytest.approx(bottom_tie)
    # ranks need not be consecutive: only their order matters
    assert plackett_luce_losses(t([[a, b, c]]), ranks_of([[1, 5, 5]])).item() == pytest.approx(bottom_tie)


def test_plackett_luce_over_two_completions_is_the_bradley_terry_pair_loss():
    scores = t([[0.3, 1.7], [2.0, -1.0], [0.5, 0.5]])
    ranks = ranks_of([[1, 2], [2, 1], [1, 2]])
    pl = plackett_luce_losses(scores, ranks)
    chosen, rejected = t([0.3, -1.0, 0.5]), t([1.7, 2.0, 0.5])
    bt = [pairwise_loss(chosen[i:i + 1], rejected[i:i + 1]).item() for i in range(3)]
    assert pl.tolist() == pytest.approx(bt, rel=1e-12)
    # padded rows in a batch of longer rankings change nothing
    padded = plackett_luce_losses(t([[0.3, 1.7, 9.0], [1.0, 2.0, 3.0]]), ranks_of([[1, 2, 0], [3, 2, 1]]))
    assert padded[0].item() == pytest.approx(bt[0], rel=1e-12)


def test_rao_kupper_matches_its_definition_and_sums_to_one():
    si, sj, theta = 0.9, 0.2, 1.5
    pi, pj = math.exp(si), math.exp(sj)
    win = pi / (pi + theta * pj)
    tie = (theta ** 2 - 1) * pi * pj / ((pi + theta * pj) * (theta * pi + pj))
    log_win, log_tie = rao_kupper_log_probs(t([si - sj]), math.log(theta))
    assert log_win.item() == pytest.approx(math.log(win), rel=1e-12)
    assert log_tie.item() == pytest.approx(math.log(tie), rel=1e-12)
    log_lose, _ = rao_kupper_log_probs(t([sj - si]), math.log(theta))
    assert win + tie + math.exp(log_lose.item()) == pytest.approx(1.0, rel=1e-12)


def test_davidson_matches_its_definition_and_sums_to_one():
    si, sj, nu = -0.4, 0.7, 0.8
    denom = math.exp(si) + math.exp(sj) + nu * math.exp((si + sj) / 2)
    log_win, log_tie = davidson_log_probs(t([si - sj]), math.log(nu))
    assert log_win.item() == pytest.approx(si - math.log(denom), rel=1e-12)
    assert log_tie.item() == pytest.approx(math.log(nu) + (si + sj) / 2 - math.log(denom), rel=1e-12)
    log_lose, _ = davidson_log_probs(t([sj - si]), math.log(nu))
    assert math.exp(log_win.item()) + math.exp(log_tie.item()) + math.exp(log_lose.item()) == pytest.approx(1.0)


def test_ranked_pairs_mark_each_strict_and_tied_pair_once():
    better, tied = ranked_pairs(ranks_of([[2, 1, 2, 0]]))
    assert sorted(map(tuple, better[0].nonzero().tolist())) == [(1, 0), (1, 2)]
    assert tied[0].nonzero().tolist() == [[0, 2]]


@pytest.mark.parametrize("loss", ["rao_kupper", "davidson"])
def test_tie_pair_losses_sum_the_strict_and_tied_pairs_of_each_ranking(loss):
    s = [0.5, -0.2, 1.0]  # ranks 1, 1, 2: 0 ≈ 1, both above 2
    param = 1.5 if loss == "rao_kupper" else 0.8

    def probs(si: float, sj: float) -> tuple[float, float]:  # (P(i≻j), P(i=j)), from the definitions
        pi, pj = math.exp(si), math.exp(sj)
        if loss == "rao_kupper":
            return pi / (pi + param * pj), (param ** 2 - 1) * pi * pj / ((pi + param * pj) * (param * pi + pj))
        denom = pi + pj + param * math.exp((si + sj) / 2)
        return pi / denom, param * math.exp((si + sj) / 2) / denom

    expected = -math.log(probs(s[0], s[2])[0]) - math.log(probs(s[1], s[2])[0]) - math.log(probs(s[0], s[1])[1])
    total, count = tie_pair_losses(t([s, [0.0, 3.0, 0.0]]), ranks_of([[1, 1, 2], [2, 1, 0]]), loss,
                                   math.log(param))
    assert total[0].item() == pytest.approx(expected, rel=1e-12)
    assert count.tolist() == [3, 1]
    bt = -math.log(1 / (1 + math.exp(-3.0)))  # the second ranking is one strict pair, not a tie
    assert total[1].item() > bt  # a tie model keeps some mass for the tie, so the strict pair costs more


def bt_sum(scores: list[float], order: list[int]) -> float:
    """Σ over the strict pairs of a strict ranking of the Bradley-Terry loss; ``order`` best first."""
    return sum(math.log1p(math.exp(-(scores[a] - scores[b]))) for i, a in enumerate(order) for b in order[i + 1:])


def test_rao_kupper_with_theta_one_and_davidson_with_nu_zero_are_bradley_terry():
    s = [0.3, -1.2, 0.8]
    ranks = ranks_of([[2, 3, 1]])
    expected = bt_sum(s, [2, 0, 1])
    rk, _ = tie_pair_losses(t([s]), ranks, "rao_kupper", 0.0)  # log θ = 0
    dv, _ = tie_pair_losses(t([s]), ranks, "davidson", float("-inf"))  # log ν = log 0
    assert rk.item() == pytest.approx(expected, rel=1e-12)
    assert dv.item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("loss", ["listwise", "rao_kupper", "davidson"])
def test_gradients_are_finite_with_ties_padding_and_a_learned_tie_parameter(loss):
    scores = torch.tensor([[0.5, 0.5, -2.0, 40.0], [3.0, -3.0, 0.0, 0.0]], requires_grad=True)
    ranks = ranks_of([[1, 1, 2, 0], [1, 1, 1, 1]])  # a tie with equal scores, padding, an all-tied ranking
    log_param = torch.tensor(0.4, requires_grad=True)
    if loss == "listwise":
        total = plackett_luce_losses(scores, ranks).sum()
    else:
        total = tie_pair_losses(scores, ranks, loss, log_param)[0].sum()
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(scores.grad).all()
    assert scores.grad[0, 3] == 0  # the padded slot gets no gradient
    assert scores.grad.abs().sum() > 0
    if loss != "listwise":
        assert torch.isfinite(log_param.grad) and log_param.grad != 0


def test_top1_hits_count_any_completion_of_a_tie_for_first():
    scores = t([[0.1, 0.9, 0.5], [2.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 9.0, 0.0]])
    ranks = ranks_of([[1, 1, 2], [2, 1, 3], [1, 1, 1], [1, 0, 2]])  # hit; miss; all tied; best is unranked
    hit, counted = top1_hits(scores, ranks)
    assert hit.tolist() == [True, False, True, True]
    assert counted.tolist() == [True, True, False, True]


def test_unit_weights_scale_to_a_mean_of_one_per_unit():
    w = unit_weights(["a", "a", "b", "c"], [1, 3, 2, 1], {"a": 2.0, "b": 0.5})
    scale = 7 / (2 * 1 + 2 * 3 + 0.5 * 2 + 1.25 * 1)  # c is not named: it gets the mean weight (2 + 0.5) / 2
    assert w == pytest.approx([2 * scale, 2 * scale, 0.5 * scale, 1.25 * scale])
    assert sum(wi * u for wi, u in zip(w, [1, 3, 2, 1], strict=True)) == pytest.approx(7)
    with pytest.raises(LmcycleError, match="finite number >= 0") as err:
        unit_weights(["a"], [1], {"a": -1.0})
    assert err.value.field == "labeler_weights"
    with pytest.raises(LmcycleError, match="weight 0"):
        unit_weights(["a", "b"], [1, 1], {"a": 0.0, "b": 0.0})


class FirstToken(nn.Module):
    """Scores a row by its first token id: known scores for the batch-layout tests."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return input_ids[:, 0].float() / 10 + 0 * self.unused


class Pad:
    padding_side = "right"
    pad_token_id = 0


def test_a_ranking_batch_scores_each_completion_once_and_weights_each_ranking():
    encoded = [{"rows": [[3, 7], [5], [1, 2, 2]], "ranks": [1, 2, 2], "labeler": "a", "weight": 2.0},
               {"rows": [[2], [4]], "ranks": [2, 1], "labeler": "b", "weight": 0.5}]
    batch = collate_rankings(encoded, Pad(), "listwise")
    assert batch["input_ids"].shape == (5, 3)  # five distinct completions, each one row
    assert batch["index"].tolist() == [[0, 1, 2], [3, 4, 0]]
    assert batch["ranks"].tolist() == [[1, 2, 2], [2, 1, 0]]
    s1, s2 = [0.3, 0.5, 0.1], [0.2, 0.4]
    first = -(s1[0] - lse(*s1)) - (s1[1] + s1[2]) + 2 * lse(s1[1], s1[2])
    second = -(s2[1] - lse(*s2))
    total, units = ranking_loss_fn("listwise")(FirstToken(), batch)
    assert units == 2 and total.item() == pytest.approx(2.0 * first + 0.5 * second, rel=1e-6)
    # a tie model's units are pairs, strict and tied: 3 + 1
    assert ranking_units(encoded, "davidson") == [3, 1]
    assert collate_rankings(encoded, Pad(), "davidson")["units"] == 4


def test_weighted_pairs_sum_the_weighted_pair_losses():
    encoded = [{"chosen": [5], "rejected": [2], "margin": 1.0, "weight": 3.0},
               {"chosen": [1], "rejected": [4], "margin": 1.0, "weight": 0.25}]
    total, n = pair_loss_fn(False)(FirstToken(), collate_pairs(encoded, Pad()))
    expected = 3.0 * math.log1p(math.exp(-0.3)) + 0.25 * math.log1p(math.exp(0.3))
    assert n == 2 and total.item() == pytest.approx(expected, rel=1e-6)
    unweighted = [{k: v for k, v in e.items() if k != "weight"} for e in encoded]
    assert "weight" not in collate_pairs(unweighted, Pad())  # the default batch is as before


@pytest.mark.parametrize("loss,init", [("rao_kupper", 1.5), ("davidson", 0.7)])
def test_a_learned_tie_parameter_starts_at_its_value_and_is_trained(loss, init):
    model = LearnedTie(FirstToken(), loss, init)
    assert model.log_param().exp().item() == pytest.approx(init, rel=1e-6)
    assert any(p is model.raw for p in model.parameters())  # the optimizer and the checkpoints see it
    model.raw.data.fill_(-3.0)
    expected = math.exp(math.log1p(math.exp(-3.0))) if loss == "rao_kupper" else math.exp(-3.0)
    assert model.log_param().exp().item() == pytest.approx(expected, rel=1e-6)  # θ = exp(softplus(raw)) > 1
