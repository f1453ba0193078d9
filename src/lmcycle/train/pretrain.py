"""Pre-training objectives on raw text: each model learns with its native objective.

- decoder (Llama, GPT-2): causal language modelling on packed blocks of tokens
  (:func:`lmcycle.data.packing.pack_sequences`), ``input_ids`` = ``labels`` (:func:`causal_lm_batches`);
- encoder-decoder (T5): span corruption (:func:`lmcycle.data.span_corruption.span_corrupt`) of each block,
  re-drawn at every step and seeded by ``(seed, step, block)`` (:func:`span_corruption_batches`), with the
  tokenizer's ``<extra_id_i>`` sentinels (:func:`sentinel_ids`).

:func:`split_blocks` holds out a random fraction of the blocks for held-out loss and perplexity.
"""

from __future__ import annotations

import random

import torch

from lmcycle.data.batching import pad_id_of
from lmcycle.data.sft import collate_sft
from lmcycle.data.span_corruption import span_corrupt
from lmcycle.errors import LmcycleError
from lmcycle.train.loop import TrainConfig, micro_batch_indices


def split_blocks(blocks: torch.Tensor, eval_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hold out a random ``eval_fraction`` of the blocks (at least one when asked for and there are two)."""
    n = len(blocks)
    n_eval = max(1, round(n * eval_fraction)) if eval_fraction > 0 and n >= 2 else 0
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return blocks[order[n_eval:].sort().values], blocks[order[:n_eval].sort().values]


def causal_lm_batches(blocks: torch.Tensor, cfg: TrainConfig, seed: int):
    """``batch_at(step)`` for causal LM: each micro-batch is ``input_ids`` = ``labels`` [B, seq_len]."""
    def batch_at(step: int) -> list[dict[str, torch.Tensor]]:
        return [{"input_ids": blocks[idx], "labels": blocks[idx]}
                for idx in micro_batch_indices(len(blocks), step, cfg.batch_size, cfg.grad_accum, seed)]
    return batch_at


def span_corruption_batches(blocks: torch.Tensor, sentinels: list[int], tokenizer, cfg: TrainConfig, seed: int):
    """``batch_at(step)`` for T5: blocks corrupted afresh at every step, seeded by ``(seed, step, block)``."""
    def batch_at(step: int) -> list[dict[str, torch.Tensor]]:
        out = []
        for idx in micro_batch_indices(len(blocks), step, cfg.batch_size, cfg.grad_accum, seed):
            items = [corrupt_block(blocks[i].tolist(), sentinels, tokenizer.eos_token_id,
                                   random.Random(f"{seed}:{step}:{i}")) for i in idx]
            out.append(collate_sft(items, pad_id_of(tokenizer)))
        return out
    return batch_at


def corrupt_block(ids: list[int], sentinels: list[int], eos_id: int, rng: random.Random) -> dict:
    input_ids, labels = span_corrupt(ids, sentinels, eos_id, rng=rng)
    return {"input_ids": input_ids, "labels": labels}


def sentinel_ids(tokenizer) -> list[int]:
    """Ids of ``<extra_id_0>``, ``<extra_id_1>``, ... as far as the tokenizer has them."""
    vocab = tokenizer.get_vocab()
    ids = []
    while f"<extra_id_{len(ids)}>" in vocab:
        ids.append(vocab[f"<extra_id_{len(ids)}>"])
    if not ids:
        raise LmcycleError("T5 span corruption needs sentinel tokens <extra_id_0>, <extra_id_1>, ... and this "
                           "model's tokenizer has none")
    return ids
