"""The reward model: last-token reading, padding invariance, pairwise loss, training, save/load, bad input."""

from __future__ import annotations

import copy
import math

import pytest
import tiny_lm
import torch
from tiny_lm import tiny_gpt2, tiny_llama
from transformers import BertConfig, BertForSequenceClassification

from lmcycle.align.reward import (
    RewardModel,
    collate_pairs,
    encode_pairs,
    last_token_index,
    normalise,
    pair_batches,
    pair_metrics,
    pairwise_loss,
    preference_accuracy,
    reward_stats,
    train_reward_model,
)
from lmcycle.data.preferences import PreferencePair
from lmcycle.errors import LmcycleError
from lmcycle.train.loop import TrainConfig


def tiny_bert(tok, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=2, max_position_embeddings=128, num_labels=1, pad_token_id=0,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


def llama_rm(tok, seed: int = 0) -> RewardModel:
    lm = tiny_llama(tok, seed)
    torch.manual_seed(seed)
    return RewardModel.from_causal_lm(lm)


def marker_pairs(n: int, seed: int) -> list[PreferencePair]:
    return tiny_lm.marker_pairs(n, seed, longer_rejected=True)


@pytest.mark.parametrize("mask,expected", [
    ([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], [2, 4, 0]),  # right padding / none
    ([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]], [4, 4, 4]),  # left padding / none
])
def test_last_token_index(mask, expected):
    assert last_token_index(torch.tensor(mask)).tolist() == expected


@pytest.mark.parametrize("backbone", ["llama", "gpt2", "bert"])
def test_same_reward_for_left_right_and_no_padding(tok, backbone):
    # gpt2 and bert have absolute position embeddings: a left-padded row only matches when positions are fixed
    if backbone == "llama":
        model = llama_rm(tok)
    elif backbone == "gpt2":
        model = RewardModel.from_causal_lm(tiny_gpt2(tok))
    else:
        model = RewardModel.from_classifier(tiny_bert(tok))
    model.eval()
    pairs = [PreferencePair("a", "the cat sees", " the dog and the moon .", " red"),
             PreferencePair("b", "hi", " sun", " the bird sees the tree and the lake and the river .")]
    enc = encode_pairs(pairs, tok, 64)
    alone = [model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)).item()
             for e in enc for ids in (e["chosen"], e["rejected"])]
    alone = [alone[0], alone[2], alone[1], alone[3]]  # collate order: chosen rows, then rejected rows
    padded = {}
    for side in ("left", "right"):
        t = copy.deepcopy(tok)
        t.padding_side = side
        batch = collate_pairs(enc, t)
        assert batch["attention_mask"].min() == 0  # the rows really are padded
        with torch.no_grad():
            padded[side] = model(batch["input_ids"], batch["attention_mask"]).tolist()
    assert padded["left"] == pytest.approx(alone, abs=1e-5)
    assert padded["right"] == pytest.approx(alone, abs=1e-5)
    assert max(alone) - min(alone) > 1e-4  # texts really score differently, by more than the tolerance


def test_pairwise_loss_matches_hand_computation():
    rc, rr = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([1.0, 1.0, 0.5])
    expected = sum(math.log1p(math.exp(-(c - r))) for c, r in zip(rc.tolist(), rr.tolist(), strict=True)) / 3
    assert pairwise_loss(rc, rr).item() == pytest.approx(expected, rel=1e-6)
    m = torch.tensor([1.0, 0.0, 2.0])
    expected_m = sum(math.log1p(math.exp(-(c - r - k)))
                     for c, r, k in zip(rc.tolist(), rr.tolist(), m.tolist(), strict=True)) / 3
    assert pairwise_loss(rc, rr, m).item() == pytest.approx(expected_m, rel=1e-6)
    # stable where log(sigmoid) would underflow: a huge wrong-way gap costs about the gap itself
    assert pairwise_loss(torch.tensor([-200.0]), torch.tensor([0.0])).item() == pytest.approx(200.0)
    assert preference_accuracy(rc, rr) == pytest.approx(1 / 3)


def test_encode_truncates_from_the_left_keeping_specials_and_response_end():

    bos_tok = tiny_lm.make_tokenizer(add_bos=True)
    pair = PreferencePair("a", "the cat sees the dog and the moon and the sun", " red green blue", " tea")
    full = bos_tok(pair.prompt + pair.chosen)["input_ids"]
    enc = encode_pairs([pair], bos_tok, 6)[0]
    assert len(full) > 6 and len(enc["chosen"]) == 6
    assert enc["chosen"][0] == bos_tok.bos_token_id
    assert enc["chosen"][1:] == full[-5:]
    assert bos_tok.truncation_side == "right"  # the tokenizer is left as it was


def test_training_learns_a_marker_preference(tok, tmp_path):
    train_pairs, held_out = marker_pairs(96, seed=1), marker_pairs(48, seed=2)
    model = llama_rm(tok)
    held_batches = pair_batches(encode_pairs(held_out, tok, 64), tok, 16)
    model.eval()
    before = pair_metrics(model, held_batches)
    cfg = TrainConfig(max_steps=40, batch_size=16, lr=3e-3, warmup_steps=2, log_every=10, seed=0)
    logged = []
    result = train_reward_model(model, tok, train_pairs, cfg, tmp_path / "rm", lambda **kw: logged.append(kw),
                                max_len=64, eval_pairs=held_out)
    model.eval()
    after = pair_metrics(model, held_batches)
    assert result.step == 40 and len(result.losses) == 40
    assert after["accuracy"] > 0.9, (before, after)
    assert after["loss"] < before["loss"] - 0.2
    assert result.eval["eval_accuracy"] == pytest.approx(after["accuracy"])
    assert sum(result.losses[-5:]) < sum(result.losses[:5])
    assert any("loss" in kw for kw in logged)
    assert model.stats is not None and model.stats["std"] > 0
    rewards = torch.cat([model(b["input_ids"], b["attention_mask"]).detach()
                         for b in pair_batches(encode_pairs(train_pairs, tok, 64), tok, 16)])
    z = normalise(rewards, model.stats)
    assert z.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert z.std().item() == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("backbone", ["causal", "classifier"])
def test_save_load_round_trip(tok, tmp_path, backbone):
    model = llama_rm(tok, seed=3) if backbone == "causal" else RewardModel.from_classifier(tiny_bert(tok, 3))
    model.eval()
    batches = pair_batches(encode_pairs(marker_pairs(8, seed=4), tok, 64), tok, 4)
    model.stats = reward_stats(model, batches)
    model.save(tmp_path / "rm", tokenizer=tok)
    loaded = RewardModel.load(tmp_path / "rm")
    loaded.eval()
    assert loaded.kind == backbone
    assert loaded.stats == model.stats
    with torch.no_grad():
        for b in batches:
            assert torch.equal(loaded(b["input_ids"], b["attention_mask"]), model(b["input_ids"], b["attention_mask"]))
    assert not list(tmp_path.glob(".*tmp"))  # the atomic temp dir is gone


def test_bad_input_raises_lmcycle_error(tok, tmp_path):

    with pytest.raises(LmcycleError, match="no preference pairs"):
        encode_pairs([], tok, 64)
    with pytest.raises(LmcycleError, match="no room"):
        encode_pairs(marker_pairs(2, seed=0), tiny_lm.make_tokenizer(add_bos=True), 1)
    with pytest.raises(LmcycleError, match="no preference pairs"):
        train_reward_model(llama_rm(tok), tok, [], TrainConfig(max_steps=1), tmp_path, lambda **kw: None)
    with pytest.raises(LmcycleError, match="num_labels"):
        RewardModel.from_classifier(BertForSequenceClassification(BertConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_labels=2)))
    with pytest.raises(LmcycleError, match="not a saved reward model"):
        RewardModel.load(tmp_path)
