"""Supervised fine-tuning data: prompt/completion pairs with the loss on the completion only, and mixtures.

The prompt is exactly what evaluation will show the model (``template.render(example, shots=[])``); the
completion is what should follow it. For a decoder the completion is the template's continuation
(``template.render_target``: a space and the target after a prefix such as ``Summary:``), so that prompt +
completion is the rendered example with its target; for an encoder-decoder the decoder produces the target
text on its own.
"""

from __future__ import annotations

import random

import torch

from lmcycle.data.batching import pad_rows
from lmcycle.data.examples import Example

IGNORE = -100  # label value that cross-entropy skips


def encode_sft(examples: list[Example], template, tokenizer, max_len: int, seq2seq: bool) -> list[dict]:
    """Tokenize examples into ``{"input_ids": list[int], "labels": list[int]}`` items of at most ``max_len``.

    - decoder: ``input_ids = prompt + completion + EOS`` and ``labels`` the same with every prompt position set
      to -100 (loss on the completion only). Too long: the prompt loses tokens from its left (its end, next to
      the completion, is what matters most; a leading BOS is kept); the completion is kept whole unless it
      alone does not fit, then it is cut on the right (and has no EOS, as it did not end).
    - encoder-decoder: ``input_ids = prompt`` (with the tokenizer's own special tokens, as at inference; cut
      from the left to ``max_len``), ``labels = target + EOS`` (cut on the right to ``max_len``).
    """
    if max_len < 2:
        raise ValueError(f"max_len must be at least 2, got {max_len}")
    if not examples:
        return []
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    prompts = tokenizer([template.render(ex, []) for ex in examples], verbose=False)["input_ids"]
    # A decoder continues the prompt; an encoder-decoder's decoder writes the target from scratch.
    completions = [ex.target if seq2seq else template.render_target(ex) for ex in examples]
    targets = tokenizer(completions, add_special_tokens=False, verbose=False)["input_ids"]
    return [prompt_completion_item(prompt_ids, [*target_ids, eos], max_len, seq2seq, bos)
            for prompt_ids, target_ids in zip(prompts, targets, strict=True)]


def prompt_completion_item(prompt_ids: list[int], target_ids: list[int], max_len: int, seq2seq: bool,
                           bos: int | None) -> dict[str, list[int]]:
    """One ``{"input_ids", "labels"}`` item of at most ``max_len`` tokens, truncated as :func:`encode_sft` says
    (``target_ids`` already ends with EOS)."""
    if seq2seq:
        return {"input_ids": prompt_ids[-max_len:], "labels": target_ids[:max_len]}
    head = prompt_ids[:1] if bos is not None and prompt_ids[:1] == [bos] else []
    target_ids = target_ids[:max_len - len(head) - 1]  # leave room for at least one prompt token
    body = prompt_ids[len(head):]
    room = max_len - len(head) - len(target_ids)
    prompt_ids = head + body[max(0, len(body) - room):]
    return {"input_ids": prompt_ids + target_ids, "labels": [IGNORE] * len(prompt_ids) + target_ids}


def collate_sft(items: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad items into ``input_ids`` [B, T], ``attention_mask`` [B, T] (1 = real token) and ``labels``
    [B, L] (-100 on padding; L = T for decoder items, the longest target for encoder-decoder items)."""
    input_ids, attention_mask = pad_rows([it["input_ids"] for it in items], pad_id)
    labels, _ = pad_rows([it["labels"] for it in items], IGNORE)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def mix_tasks(datasets: list[tuple[list, float]], n: int, seed: int) -> list:
    """``n`` items drawn from several datasets, each draw picking dataset ``i`` with probability
    ``weight_i / sum(weights)``.

    Within a dataset items come in a shuffled order without repetition until it is used up, then in a new
    shuffled order, so a dataset drawn from ``len(dataset)`` times contributes each of its items once.
    Deterministic for a given ``seed``.
    """
    if not datasets:
        raise ValueError("mix_tasks needs at least one dataset")
    for items, weight in datasets:
        if not items:
            raise ValueError("mix_tasks got an empty dataset")
        if not weight > 0:
            raise ValueError(f"mixture weights must be positive, got {weight}")
    rng = random.Random(seed)
    weights = [w for _, w in datasets]
    queues: list[list[int]] = [[] for _ in datasets]
    out = []
    for _ in range(n):
        d = rng.choices(range(len(datasets)), weights=weights)[0]
        if not queues[d]:
            queues[d] = rng.sample(range(len(datasets[d][0])), len(datasets[d][0]))
        out.append(datasets[d][0][queues[d].pop()])
    return out
