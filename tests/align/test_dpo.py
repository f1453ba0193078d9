"""DPO: the loss against hand computations, response log-probs, the LoRA reference, training, bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tiny_lm import marker_pairs, tiny_llama, tiny_t5

from lmcycle.adapt.lora import LoraConfig, add_lora, lora_layers
from lmcycle.align.dpo import (
    collate_dpo,
    dpo_batches,
    dpo_loss,
    dpo_loss_fn,
    dpo_metrics,
    encode_dpo_pairs,
    precompute_reference_logps,
    reference_logps,
    train_dpo,
)
from lmcycle.errors import LmcycleError
from lmcycle.train.loop import TrainConfig, sequence_logps


def lora_llama(tok, seed: int = 0):
    model = tiny_llama(tok, seed)
    add_lora(model, LoraConfig(r=4, alpha=8))
    return model


# -- the loss ------------------------------------------------------------------------------------------------------


def test_sigmoid_loss_matches_hand_computation():
    pol_c, pol_r = torch.tensor([-3.0, -10.0]), torch.tensor([-5.0, -4.0])
    ref_c, ref_r = torch.tensor([-4.0, -9.0]), torch.tensor([-4.5, -6.0])
    beta = 0.5
    loss, rc, rr = dpo_loss(pol_c, pol_r, ref_c, ref_r, beta)
    # pair 0: h = (1) - (-0.5) = 1.5; pair 1: h = (-1) - (2) = -3
    expected = [math.log(1 + math.exp(-beta * 1.5)), math.log(1 + math.exp(beta * 3))]
    assert loss.tolist() == pytest.approx(expected, rel=1e-6)
    assert rc.tolist() == pytest.approx([0.5, -0.5])
    assert rr.tolist() == pytest.approx([-0.25, 1.0])


def test_label_smoothing_matches_hand_computation():
    eps, beta, h = 0.2, 0.5, 1.5
    loss, _, _ = dpo_loss(torch.tensor([1.5]), torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]),
                          beta, label_smoothing=eps)
    sig = 1 / (1 + math.exp(-beta * h))
    assert float(loss) == pytest.approx(-(1 - eps) * math.log(sig) - eps * math.log(1 - sig), rel=1e-6)
    plain, _, _ = dpo_loss(torch.tensor([1.5]), torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]),
                           beta)
    assert float(loss) > float(plain)  # smoothing penalises a confident margin


def test_ipo_loss_matches_hand_computation():
    beta = 0.25  # target margin 1/(2β) = 2
    loss, _, _ = dpo_loss(torch.tensor([-3.0, -1.0]), torch.tensor([-5.0, -1.0]), torch.tensor([-4.0, -2.0]),
                          torch.tensor([-4.5, -1.0]), beta, loss_type="ipo")
    # h = (1) - (-0.5) = 1.5 -> (1.5-2)^2; h = (1) - (0) = 1 -> (1-2)^2
    assert loss.tolist() == pytest.approx([0.25, 1.0])


def test_policy_equal_to_reference_gives_log2_and_zero_rewards():
    logps = torch.tensor([-7.0, -2.5, -30.0])
    loss, rc, rr = dpo_loss(logps, logps - 1, logps, logps - 1, beta=0.1)
    assert torch.equal(loss, torch.full((3,), math.log(2)))
    assert torch.equal(rc, torch.zeros(3)) and torch.equal(rr, torch.zeros(3))


def test_loss_gradient_pushes_chosen_up_and_rejected_down():
    pol = torch.tensor([-5.0, -5.0], requires_grad=True)
    loss, _, _ = dpo_loss(pol[:1], pol[1:], torch.tensor([-5.0]), torch.tensor([-5.0]), beta=0.1)
    loss.sum().backward()
    assert pol.grad[0] < 0 < pol.grad[1]


@pytest.mark.parametrize("kwargs", [{"beta": 0.0}, {"beta": -1.0}, {"beta": 0.1, "loss_type": "hinge2"},
                                    {"beta": 0.1, "label_smoothing": 0.5},
                                    {"beta": 0.1, "loss_type": "ipo", "label_smoothing": 0.1}])
def test_bad_settings_raise(kwargs):
    x = torch.zeros(1)
    with pytest.raises(LmcycleError):
        dpo_loss(x, x, x, x, **kwargs)
    with pytest.raises(LmcycleError):
        dpo_loss_fn(**kwargs)


def test_empty_pairs_raise(tok):
    with pytest.raises(LmcycleError, match="no preference pairs"):
        encode_dpo_pairs([], tok, 64, seq2seq=False)


def test_train_dpo_rejects_bad_beta(tok, tmp_path):
    with pytest.raises(LmcycleError):
        train_dpo(lora_llama(tok), tok, marker_pairs(4, 0), TrainConfig(max_steps=1), tmp_path, lambda **k: None,
                  beta=0.0)
    with pytest.raises(LmcycleError):
        train_dpo(lora_llama(tok), tok, [], TrainConfig(max_steps=1), tmp_path, lambda **k: None)


# -- encoding and log-probs ----------------------------------------------------------------------------------------


def test_decoder_encoding_masks_the_prompt(tok):
    pair = marker_pairs(1, 0)[0]
    item = encode_dpo_pairs([pair], tok, 64, seq2seq=False)[0]["chosen"]
    n_prompt = len(tok(pair.prompt)["input_ids"])
    assert item["labels"][:n_prompt] == [-100] * n_prompt
    assert item["labels"][n_prompt:] == item["input_ids"][n_prompt:]
    assert tok.decode(item["labels"][n_prompt:-1]) == pair.chosen and item["labels"][-1] == tok.eos_token_id


def test_batch_stacks_chosen_over_rejected(tok):
    pairs = marker_pairs(3, 1)
    encoded = encode_dpo_pairs(pairs, tok, 64, seq2seq=False)
    batch = collate_dpo(encoded, tok.pad_token_id)
    assert batch["input_ids"].size(0) == 6
    for i, e in enumerate(encoded):
        assert batch["input_ids"][i, :len(e["chosen"]["input_ids"])].tolist() == e["chosen"]["input_ids"]
        assert batch["input_ids"][3 + i, :len(e["rejected"]["input_ids"])].tolist() == e["rejected"]["input_ids"]


def manual_decoder_logps(model, ids: list[int], n_prompt: int) -> float:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    logp = F.log_softmax(logits, dim=-1)
    return sum(float(logp[t - 1, ids[t]]) for t in range(n_prompt, len(ids)))


def manual_t5_logps(model, enc_ids: list[int], labels: list[int]) -> float:
    dec_in = [model.config.decoder_start_token_id] + labels[:-1]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([enc_ids]), decoder_input_ids=torch.tensor([dec_in])).logits[0]
    logp = F.log_softmax(logits.float(), dim=-1)
    return sum(float(logp[t, labels[t]]) for t in range(len(labels)))


def test_sequence_logps_decoder_is_manual_sum_and_ignores_padding(tok):
    model = tiny_llama(tok).eval()
    pairs = marker_pairs(4, 2)
    encoded = encode_dpo_pairs(pairs, tok, 64, seq2seq=False)
    with torch.no_grad():
        together = sequence_logps(model, collate_dpo(encoded, tok.pad_token_id))
    rows = [e["chosen"] for e in encoded] + [e["rejected"] for e in encoded]
    assert len({len(r["input_ids"]) for r in rows}) > 1  # some rows really are padded
    for i, row in enumerate(rows):
        n_prompt = sum(1 for x in row["labels"] if x == -100)
        assert float(together[i]) == pytest.approx(manual_decoder_logps(model, row["input_ids"], n_prompt), abs=1e-4)
    with torch.no_grad():
        alone = sequence_logps(model, collate_dpo(encoded[:1], tok.pad_token_id))
    assert alone[0] == pytest.approx(float(together[0]), abs=1e-4)
    assert alone[1] == pytest.approx(float(together[4]), abs=1e-4)


def test_sequence_logps_t5_is_manual_sum_and_ignores_padding(t5_tok):
    model = tiny_t5(t5_tok).eval()
    pairs = marker_pairs(4, 3)
    encoded = encode_dpo_pairs(pairs, t5_tok, 64, seq2seq=True)
    assert encoded[0]["chosen"]["input_ids"] == t5_tok(pairs[0].prompt)["input_ids"]  # encoder sees the prompt
    with torch.no_grad():
        together = sequence_logps(model, collate_dpo(encoded, t5_tok.pad_token_id))
    rows = [e["chosen"] for e in encoded] + [e["rejected"] for e in encoded]
    for i, row in enumerate(rows):
        assert float(together[i]) == pytest.approx(manual_t5_logps(model, row["input_ids"], row["labels"]), abs=1e-4)
    with torch.no_grad():
        alone = sequence_logps(model, collate_dpo(encoded[1:2], t5_tok.pad_token_id))
    assert alone.tolist() == pytest.approx([float(together[1]), float(together[5])], abs=1e-4)


# -- the reference -------------------------------------------------------------------------------------------------


def perturbed_lora_llama(tok):
    """A LoRA llama whose adapter is non-zero, so policy and base differ."""
    model = lora_llama(tok)
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B["default"].weight.normal_(0, 0.5)
    return model


def test_lora_reference_is_the_base_and_restores_the_adapter(tok):
    base = tiny_llama(tok).eval()
    model = perturbed_lora_llama(tok).eval()
    batch = collate_dpo(encode_dpo_pairs(marker_pairs(3, 4), tok, 64, seq2seq=False), tok.pad_token_id)
    with torch.no_grad():
        expected = sequence_logps(base, batch)
        policy = sequence_logps(model, batch)
    assert not torch.allclose(policy, expected, atol=1e-3)  # the adapter matters
    ref = reference_logps(model, batch)
    assert torch.allclose(ref, expected, atol=1e-5) and not ref.requires_grad
    assert all(layer.active == "default" for layer in lora_layers(model).values())
    with torch.no_grad():
        assert torch.allclose(sequence_logps(model, batch), policy)


def test_lora_reference_restores_the_adapter_after_an_exception(tok):
    model = perturbed_lora_llama(tok)
    with pytest.raises(KeyError):
        reference_logps(model, {"input_ids": torch.tensor([[3, 4]])})  # no labels
    assert all(layer.active == "default" for layer in lora_layers(model).values())
    assert model.training  # the mode comes back too


def test_separate_reference_model_and_missing_reference(tok):
    base = tiny_llama(tok).eval()
    other = tiny_llama(tok, seed=5)
    batch = collate_dpo(encode_dpo_pairs(marker_pairs(2, 5), tok, 64, seq2seq=False), tok.pad_token_id)
    with torch.no_grad():
        expected = sequence_logps(base, batch)
    assert torch.allclose(reference_logps(other, batch, ref_model=base), expected)
    with pytest.raises(LmcycleError, match="reference"):
        reference_logps(other, batch)


def test_precomputed_reference_is_cached_per_pair_and_gives_log2_at_init(tok):
    model = lora_llama(tok)  # B = 0: the policy equals its base
    encoded = encode_dpo_pairs(marker_pairs(5, 6), tok, 64, seq2seq=False)
    ref = precompute_reference_logps(model, encoded, tok.pad_token_id, batch_size=2)
    assert ref.shape == (5, 2) and all(e["ref_logps"] == tuple(r) for e, r in zip(encoded, ref.tolist(), strict=True))
    batches = dpo_batches(encoded, tok.pad_token_id, 2)
    assert torch.allclose(batches[0]["ref_logps"], torch.cat([ref[:2, 0], ref[:2, 1]]))
    metrics = dpo_metrics(model, batches, beta=0.1)
    assert metrics["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert metrics["margin"] == pytest.approx(0.0, abs=1e-5) and metrics["accuracy"] == 0.0


# -- training ------------------------------------------------------------------------------------------------------


def test_train_dpo_with_lora_learns_the_preference(tok, tmp_path):
    model = lora_llama(tok)
    held_out = marker_pairs(24, seed=99)
    cfg = TrainConfig(max_steps=30, batch_size=8, lr=1e-2, seed=0, log_every=30)
    logged = []
    result = train_dpo(model, tok, marker_pairs(64, seed=0), cfg, tmp_path, lambda **k: logged.append(k),
                       beta=0.1, max_len=64, eval_pairs=held_out)
    assert result.step == 30 and result.losses[0] == pytest.approx(math.log(2), abs=1e-4)
    # At init every margin is exactly 0 (accuracy 0, loss log 2); β = 0.1 keeps the reward scale small.
    assert result.eval["eval_margin"] > 0.03
    assert result.eval["eval_accuracy"] >= 0.9
    assert result.eval["eval_loss"] < math.log(2) - 0.02
    assert result.eval["eval_chosen_reward"] > result.eval["eval_rejected_reward"]
    # The base (the reference) is untouched: the adapter off gives the same log-probs as a fresh base.
    batch = collate_dpo(encode_dpo_pairs(held_out[:4], tok, 64, seq2seq=False), tok.pad_token_id)
    with torch.no_grad():
        fresh = sequence_logps(tiny_llama(tok).eval(), batch)
    assert torch.allclose(reference_logps(model, batch), fresh, atol=1e-5)
