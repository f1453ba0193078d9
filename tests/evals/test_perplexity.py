"""Perplexity equals exp(mean NLL) computed by hand from the model's own logits, one text at a time."""

import math

import pytest
import torch

from lmcycle.evals.perplexity import conditional_perplexity, perplexity, seq2seq_perplexity

TEXTS = ["Hello, how are you today?", "Go straight and turn left at the bank. Then the station.", "Hi", "x"]


def _hand_nll(model, ids: list[int], first: int) -> tuple[float, int]:
    """Sum of -log p(ids[t] | ids[:t]) for t >= first, from an unpadded forward pass, and the count."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    logp = torch.log_softmax(logits.double(), dim=-1)
    total = -sum(float(logp[t - 1, ids[t]]) for t in range(first, len(ids)))
    return total, len(ids) - first


def test_causal_perplexity_matches_hand_computed_nll_with_padding(llama, tokenizer):
    sums = [_hand_nll(llama, tokenizer(t)["input_ids"], 1) for t in TEXTS]
    expected = math.exp(sum(s for s, _ in sums) / sum(n for _, n in sums))
    # batch_size 3 mixes long and short texts in one padded batch.
    score = perplexity(llama, tokenizer, TEXTS, batch_size=3)
    assert score.values["perplexity"] == pytest.approx(expected, rel=1e-4)
    assert score.values["n_tokens"] == sum(n for _, n in sums)
    for (s, n), ex in zip(sums, score.per_example, strict=True):
        assert ex["n_tokens"] == n
        if n:
            assert ex["nll"] == pytest.approx(s / n, rel=1e-4)
        else:
            assert ex["perplexity"] is None
    # Token-weighted, not a mean of per-text perplexities.
    per_text = [ex["perplexity"] for ex in score.per_example if ex["perplexity"] is not None]
    assert score.values["perplexity"] != pytest.approx(sum(per_text) / len(per_text), rel=1e-6)
    assert perplexity(llama, tokenizer, TEXTS, batch_size=1).values["perplexity"] == pytest.approx(
        score.values["perplexity"], rel=1e-5)


def test_max_len_truncates(llama, tokenizer):
    ids = tokenizer(TEXTS[1])["input_ids"]
    s, n = _hand_nll(llama, ids[:5], 1)
    score = perplexity(llama, tokenizer, [TEXTS[1]], max_len=5)
    assert score.values["n_tokens"] == 4 and score.settings["truncated"] == 1
    assert score.values["nll"] == pytest.approx(s / n, rel=1e-4)


def test_conditional_perplexity_counts_only_target_tokens(llama, tokenizer):
    prompts = ["#Person1#: Where is the train station?\nSummary:", "Dialogue: Hi.\nSummary:"]
    targets = [" #Person2# tells the way.", " They greet."]
    sums = []
    for p, t in zip(prompts, targets, strict=True):
        p_ids = tokenizer(p)["input_ids"]
        t_ids = tokenizer(t, add_special_tokens=False)["input_ids"]
        sums.append(_hand_nll(llama, p_ids + t_ids, len(p_ids)))
    score = conditional_perplexity(llama, tokenizer, prompts, targets, batch_size=2)
    assert score.values["n_tokens"] == sum(n for _, n in sums)
    assert score.values["nll"] == pytest.approx(sum(s for s, _ in sums) / sum(n for _, n in sums), rel=1e-4)
    # The prompt's tokens are really left out: counting them too gives another number.
    full = [_hand_nll(llama, tokenizer(p)["input_ids"] + tokenizer(t, add_special_tokens=False)["input_ids"], 1)
            for p, t in zip(prompts, targets, strict=True)]
    assert sum(n for _, n in full) > score.values["n_tokens"]


def test_signature_names_what_is_scored_and_the_window(llama, tokenizer):
    causal = perplexity(llama, tokenizer, TEXTS[:2])
    assert causal.signature == perplexity(llama, tokenizer, TEXTS[2:], batch_size=1).signature
    assert str(causal.signature).startswith("perplexity|kind:causal|tokens:after-first|window:256|trunc:end|")
    assert perplexity(llama, tokenizer, TEXTS[:2], max_len=5).settings["keys"]["window"] == "5"
    given = conditional_perplexity(llama, tokenizer, ["Hello,"], [" how are you"])
    assert given.settings["keys"]["tokens"] == "target" and given.signature != causal.signature


def test_conditional_truncation_keeps_the_target(llama, tokenizer):
    prompt, target = "Go straight and turn left at the bank. " * 3, " They meet."
    t_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    score = conditional_perplexity(llama, tokenizer, [prompt], [target], max_len=len(t_ids) + 4)
    assert score.values["n_tokens"] == len(t_ids) and score.settings["truncated"] == 1


def test_seq2seq_perplexity_matches_hand_computed(t5, tokenizer):
    model = t5
    inputs = ["Where is the train station?", "Hello, how are you today? I am fine."]
    targets = ["The way to the station.", "A greeting."]
    total, count = 0.0, 0
    for src, tgt in zip(inputs, targets, strict=True):
        labels = tokenizer(tgt)["input_ids"]
        decoder_in = [model.config.decoder_start_token_id] + labels[:-1]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([tokenizer(src)["input_ids"]]),
                           decoder_input_ids=torch.tensor([decoder_in])).logits[0]
        logp = torch.log_softmax(logits.double(), dim=-1)
        total -= sum(float(logp[t, labels[t]]) for t in range(len(labels)))
        count += len(labels)
    score = seq2seq_perplexity(model, tokenizer, inputs, targets, batch_size=2)
    assert score.values["n_tokens"] == count
    assert score.values["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)
