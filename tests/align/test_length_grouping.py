"""Reward and DPO training batch pairs of similar length (``group_by_length``, on by default): same pairs per
step, less padding than plainly shuffled batches, and the stage configs carry the switch."""

from __future__ import annotations

import random

import pytest
import torch
from tiny_lm import tiny_llama

import lmcycle.align.dpo as dpo
import lmcycle.align.reward as reward
from lmcycle.align.dpo import dpo_pair_length, encode_dpo_pairs, train_dpo
from lmcycle.align.reward import RewardModel, encode_pairs, pair_step_indices, train_reward_model
from lmcycle.data.preferences import PreferencePair
from lmcycle.stages.dpo import DpoStage
from lmcycle.stages.reward import RewardStage
from lmcycle.train.loop import TrainConfig


def skewed_pairs(n: int, seed: int = 0) -> list[PreferencePair]:
    """Prompts of 1 to ~12 clauses (mostly short, a few long), like chat preference data."""
    rng = random.Random(seed)
    words = ["cat", "dog", "sun", "tree", "blue", "red"]
    out = []
    for i in range(n):
        clauses = min(1 + int(rng.expovariate(0.35)), 12)
        prompt = " ".join(f"the {rng.choice(words)} sees the {rng.choice(words)}" for _ in range(clauses)) + " :"
        out.append(PreferencePair(f"p{i}", prompt, " a " + rng.choice(words), " " + rng.choice(words)))
    return out


def mean_padding(lengths: list[int], steps: list[list[list[int]]]) -> float:
    pad = [max(lengths[i] for i in mb) - lengths[i] for step in steps for mb in step for i in mb]
    return sum(pad) / len(pad)


def test_pair_step_indices_groups_or_shuffles_the_same_number_of_pairs(tok):
    encoded = encode_pairs(skewed_pairs(96), tok, max_len=128)
    lengths = [max(len(e["chosen"]), len(e["rejected"])) for e in encoded]
    cfg = TrainConfig(max_steps=24, batch_size=4, grad_accum=2)
    grouped = [pair_step_indices(lengths, s, cfg, 0, True) for s in range(24)]
    plain = [pair_step_indices(lengths, s, cfg, 0, False) for s in range(24)]
    assert all(len(mb) == 4 for step in grouped + plain for mb in step) and all(len(s) == 2 for s in grouped)
    assert sorted(i for step in grouped[:12] for mb in step for i in mb) == list(range(96))
    assert mean_padding(lengths, grouped) < 0.5 * mean_padding(lengths, plain)


def widths_seen_in_training(monkeypatch, module, collate_name: str, run) -> list[int]:
    """Batch widths of the training steps only (the spy is switched off when training returns)."""
    real, widths, training = getattr(module, collate_name), [], [True]

    def spy(*args, **kwargs):
        batch = real(*args, **kwargs)
        if training[0]:
            widths.append(batch["input_ids"].size(1))
        return batch

    monkeypatch.setattr(module, collate_name, spy)
    real_train = module.train

    def train_then_stop(*args, **kwargs):
        try:
            return real_train(*args, **kwargs)
        finally:
            training[0] = False

    monkeypatch.setattr(module, "train", train_then_stop)
    run()
    return widths


@pytest.mark.parametrize("group", [True, False])
def test_reward_training_pads_less_when_grouped(tok, tmp_path, monkeypatch, group):
    pairs = skewed_pairs(48)
    cfg = TrainConfig(max_steps=12, batch_size=4, lr=1e-3, seed=0, log_every=100, save_every=0)
    encoded = encode_pairs(pairs, tok, max_len=128)
    lengths = [max(len(e["chosen"]), len(e["rejected"])) for e in encoded]

    def run():
        torch.manual_seed(0)
        model = RewardModel.from_causal_lm(tiny_llama(tok))
        train_reward_model(model, tok, pairs, cfg, tmp_path / str(group), lambda **k: None, max_len=128,
                           group_by_length=group)

    widths = widths_seen_in_training(monkeypatch, reward, "collate_pairs", run)
    expected = [max(lengths[i] for i in pair_step_indices(lengths, s, cfg, 0, group)[0]) for s in range(12)]
    assert widths == expected  # each batch is padded to its own longest row, with the grouped (or plain) pairs
    plain = [max(lengths[i] for i in pair_step_indices(lengths, s, cfg, 0, False)[0]) for s in range(12)]
    assert (sum(widths) < sum(plain)) == group


def test_dpo_training_uses_grouped_batches(tok, tmp_path, monkeypatch):
    pairs = skewed_pairs(48, seed=1)
    cfg = TrainConfig(max_steps=12, batch_size=4, lr=1e-3, seed=0, log_every=100, save_every=0)
    lengths = [dpo_pair_length(e) for e in encode_dpo_pairs(pairs, tok, 128, seq2seq=False)]

    def run():
        train_dpo(tiny_llama(tok), tok, pairs, cfg, tmp_path, lambda **k: None, max_len=128)

    widths = widths_seen_in_training(monkeypatch, dpo, "collate_dpo", run)
    # The precomputed reference pass is in data order; the last 12 collations are the training steps.
    expected = [max(lengths[i] for i in pair_step_indices(lengths, s, cfg, 0, True)[0]) for s in range(12)]
    assert widths[-12:] == expected
    plain = [max(lengths[i] for i in pair_step_indices(lengths, s, cfg, 0, False)[0]) for s in range(12)]
    assert sum(expected) < sum(plain)


def test_stage_configs_group_by_length_by_default():
    train = {"max_steps": 1}
    assert RewardStage(data="d", eval_data="e", train=train).group_by_length is True
    assert DpoStage(data="d", eval_data="e", train=train).group_by_length is True
    assert DpoStage(data="d", eval_data="e", train=train, group_by_length=False).group_by_length is False
