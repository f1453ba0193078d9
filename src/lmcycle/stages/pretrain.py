"""PretrainStage: continue training a model on raw text with its native objective.

- decoder (Llama, GPT-2): causal language modelling on packed blocks of ``seq_len`` tokens
  (:func:`lmcycle.data.packing.pack_sequences`);
- encoder-decoder (T5): span corruption (:func:`lmcycle.data.span_corruption.span_corrupt`) of blocks of
  ``seq_len - 1`` tokens, re-drawn at every step, so that a corrupted input (plus EOS) fits in ``seq_len``.

The text is every input and target of the ``corpus`` datasets plus the plain-text ``files`` (paths relative to
the recipe). A fraction of the blocks is held out; every ``train.eval_every`` steps their loss and perplexity are
logged. Checkpoints live under the stage directory, so running the same run directory again resumes the training.
The objectives themselves are :mod:`lmcycle.train.pretrain`.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Literal

from pydantic import Field

from lmcycle.config import DatasetName, ModelRef
from lmcycle.data.batching import pad_id_of
from lmcycle.data.examples import plain_texts
from lmcycle.data.packing import pack_sequences
from lmcycle.data.sft import collate_sft
from lmcycle.errors import LmcycleError
from lmcycle.models.load import context_window, is_seq2seq
from lmcycle.stages.common import ModelStage, finish_training_stage, start_training_stage
from lmcycle.stages.context import RunContext
from lmcycle.train.loop import TrainConfig, held_out_metrics, lm_loss_sum, train
from lmcycle.train.pretrain import (
    causal_lm_batches,
    corrupt_block,
    sentinel_ids,
    span_corruption_batches,
    split_blocks,
)

TEXT_SUFFIXES = (".txt", ".md", ".text", ".markdown")


class PretrainStage(ModelStage):
    """Pre-train (or continue pre-training) on recipe datasets and/or text files."""

    type: Literal["pretrain"] = "pretrain"
    model: ModelRef | None = None
    corpus: list[DatasetName] = Field(default_factory=list, description="dataset names: every input and target")
    files: list[str] = Field(default_factory=list, description="text files, relative to the recipe's folder")
    seq_len: int = Field(256, ge=8)
    eval_fraction: float = Field(0.05, ge=0, lt=1)
    train: TrainConfig

    @property
    def trains_every_parameter(self) -> bool:
        return True


def run_pretrain(cfg: PretrainStage, ctx: RunContext) -> dict[str, str]:
    """Train the model on the stage's text; save it to ``<stage>/model``; return ``{"model": dir}``."""
    stage = start_training_stage(cfg, ctx, shardable=True)
    model, tokenizer, tcfg, seed = stage.model, stage.tokenizer, stage.train, stage.seed
    seq2seq = is_seq2seq(model)
    window = context_window(model, tokenizer)
    if cfg.seq_len > window:
        raise LmcycleError(f"seq_len {cfg.seq_len} is longer than the model's context window ({window})",
                           file=ctx.recipe_file, field="seq_len")
    texts = corpus_texts(cfg, ctx)
    token_lists = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []
    block_len = cfg.seq_len - 1 if seq2seq else cfg.seq_len
    blocks = pack_sequences(token_lists, block_len, tokenizer.eos_token_id)
    if len(blocks) == 0:
        raise LmcycleError(f"the corpus has {sum(map(len, token_lists))} tokens, fewer than one block of "
                           f"{block_len}; add text or lower seq_len", file=ctx.recipe_file, field="seq_len")
    train_blocks, eval_blocks = split_blocks(blocks, cfg.eval_fraction, seed)

    if seq2seq:
        sentinels = sentinel_ids(tokenizer)
        batch_at = span_corruption_batches(train_blocks, sentinels, tokenizer, tcfg, seed)
        eval_items = [corrupt_block(b, sentinels, tokenizer.eos_token_id, random.Random(f"{seed}:eval:{i}"))
                      for i, b in enumerate(eval_blocks.tolist())]
        eval_batches = [collate_sft(eval_items[i:i + tcfg.batch_size], pad_id_of(tokenizer))
                        for i in range(0, len(eval_items), tcfg.batch_size)]
    else:
        batch_at = causal_lm_batches(train_blocks, tcfg, seed)
        eval_batches = [{"input_ids": b, "labels": b} for b in eval_blocks.split(tcfg.batch_size)]
    eval_fn = (lambda m: held_out_metrics(m, eval_batches)) if eval_batches else None

    stage.log(event="data", train_blocks=len(train_blocks), eval_blocks=len(eval_blocks), seq_len=cfg.seq_len,
              objective="span_corruption" if seq2seq else "causal_lm")
    result = train(model, batch_at, lm_loss_sum, tcfg, stage.out_dir, log=stage.log, eval_fn=eval_fn,
                   desc=stage.name)
    return finish_training_stage(stage, result)


def corpus_texts(cfg: PretrainStage, ctx: RunContext) -> list[str]:
    """Every input and target of the ``corpus`` datasets, then the content of each file in ``files``."""
    texts = plain_texts(ex for name in cfg.corpus for ex in ctx.dataset(name))
    base = Path(ctx.recipe_file).parent
    for i, f in enumerate(cfg.files):
        path = base / f
        if not path.is_file():
            raise LmcycleError(f"text file not found: {path}", file=ctx.recipe_file, field=f"files.{i}")
        if path.suffix.lower() not in TEXT_SUFFIXES:
            raise LmcycleError(f"'{f}' is not a plain-text file ({', '.join(TEXT_SUFFIXES)})",
                               file=ctx.recipe_file, field=f"files.{i}")
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise LmcycleError(f"'{f}' is not valid UTF-8 ({e.reason} at byte {e.start})",
                               file=ctx.recipe_file, field=f"files.{i}") from None
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise LmcycleError("pretrain has no text: set 'corpus' (dataset names) and/or 'files'",
                           file=ctx.recipe_file, field="corpus")
    return texts
