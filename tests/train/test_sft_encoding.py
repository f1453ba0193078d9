from collections import Counter

import pytest
import tiny_lm
import torch
import torch.nn.functional as F

from lmcycle.data.examples import Example
from lmcycle.data.sft import IGNORE, collate_sft, encode_sft, mix_tasks
from lmcycle.data.templates import get_template
from lmcycle.train.loop import lm_loss_sum

TEMPLATE = get_template("summarize")


def test_decoder_labels_cover_exactly_the_completion_and_eos(tok):
    ex = tiny_lm.examples(1, seed=3)[0]
    [item] = encode_sft([ex], TEMPLATE, tok, max_len=128, seq2seq=False)
    prompt_ids = tok(TEMPLATE.render(ex, []))["input_ids"]
    n = len(prompt_ids)
    assert item["input_ids"][:n] == prompt_ids
    assert item["labels"][:n] == [IGNORE] * n
    assert item["labels"][n:] == item["input_ids"][n:]
    assert item["labels"][-1] == tok.eos_token_id
    # prompt + completion is the rendered example with its target: training matches what eval prompts with.
    assert tok.decode(item["input_ids"][:-1]) == TEMPLATE.render(ex, []) + TEMPLATE.render_target(ex)
    assert tok.decode(item["labels"][n:-1]).strip() == ex.target


def test_decoder_truncates_the_prompt_from_the_left_and_keeps_the_target(tok):
    ex = Example(input=" ".join(["river stone"] * 60), targets=["moon sun"])
    [full] = encode_sft([ex], TEMPLATE, tok, max_len=10_000, seq2seq=False)
    [cut] = encode_sft([ex], TEMPLATE, tok, max_len=40, seq2seq=False)
    assert len(full["input_ids"]) > 40 and len(cut["input_ids"]) == 40
    n_target = sum(label != IGNORE for label in full["labels"])
    assert cut["labels"][-n_target:] == full["labels"][-n_target:]  # the whole target survives
    assert cut["input_ids"] == full["input_ids"][-40:]  # what was dropped is the prompt's beginning


def test_decoder_keeps_a_leading_bos_when_cutting_the_prompt():
    bos_tok = tiny_lm.make_tokenizer(add_bos=True)
    ex = Example(input=" ".join(["river stone"] * 60), targets=["moon sun"])
    [cut] = encode_sft([ex], TEMPLATE, bos_tok, max_len=30, seq2seq=False)
    assert cut["input_ids"][0] == bos_tok.bos_token_id and len(cut["input_ids"]) == 30


def test_a_target_longer_than_max_len_is_cut_and_keeps_one_prompt_token(tok):
    ex = Example(input="cat", targets=[" ".join(["apple bread"] * 50)])
    [item] = encode_sft([ex], TEMPLATE, tok, max_len=16, seq2seq=False)
    assert len(item["input_ids"]) == 16
    assert item["labels"][0] == IGNORE and all(x != IGNORE for x in item["labels"][1:])


def test_seq2seq_inputs_are_the_prompt_and_labels_the_target_plus_eos(t5_tok):
    ex = tiny_lm.examples(1, seed=5)[0]
    [item] = encode_sft([ex], TEMPLATE, t5_tok, max_len=128, seq2seq=True)
    assert item["input_ids"] == t5_tok(TEMPLATE.render(ex, []))["input_ids"]
    assert item["labels"][-1] == t5_tok.eos_token_id
    assert t5_tok.decode(item["labels"], skip_special_tokens=True) == ex.target


def test_collate_pads_right_and_masks_padding(tok):
    items = [{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = collate_sft(items, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    s2s = collate_sft([{"input_ids": [5, 6], "labels": [1]}, {"input_ids": [5], "labels": [3, 4, 1]}], pad_id=0)
    assert s2s["labels"].tolist() == [[1, IGNORE, IGNORE], [3, 4, 1]]


def test_loss_is_computed_on_completion_tokens_only(tok):
    model = tiny_lm.tiny_llama(tok)
    exs = tiny_lm.examples(3, seed=1)
    items = encode_sft(exs, TEMPLATE, tok, max_len=128, seq2seq=False)
    batch = collate_sft(items, tok.pad_token_id)
    loss_sum, n = lm_loss_sum(model, batch)
    assert n == sum(len(it["labels"]) - it["labels"].count(IGNORE) for it in items)
    # The loss ignores what the prompt positions "predict": scrambling their labels would change nothing,
    # while the same sum over the completion positions, computed by hand, matches.
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    manual = 0.0
    for row, it in enumerate(items):
        for t, label in enumerate(it["labels"]):
            if label != IGNORE:
                manual += F.cross_entropy(logits[row, t - 1], torch.tensor(label)).item()
    assert loss_sum.item() == pytest.approx(manual, rel=1e-5)


def test_mix_tasks_is_deterministic_and_follows_the_weights():
    a, b = [("a", i) for i in range(50)], [("b", i) for i in range(500)]
    mixed = mix_tasks([(a, 1.0), (b, 3.0)], n=4000, seed=0)
    assert mixed == mix_tasks([(a, 1.0), (b, 3.0)], n=4000, seed=0)
    assert mixed != mix_tasks([(a, 1.0), (b, 3.0)], n=4000, seed=1)
    share = Counter(name for name, _ in mixed)["a"] / len(mixed)
    assert abs(share - 0.25) < 0.03


def test_mix_tasks_uses_every_item_before_repeating_one():
    a, b = list(range(10)), list(range(100, 110))
    mixed = mix_tasks([(a, 1.0), (b, 1.0)], n=200, seed=0)
    from_a = [x for x in mixed if x < 100]
    first_round = from_a[:10]
    assert sorted(first_round) == a  # a full pass over 'a' before any item repeats


def test_mix_tasks_rejects_bad_weights():
    with pytest.raises(ValueError):
        mix_tasks([([1], 0.0)], n=3, seed=0)
