"""BuildStage: a model from scratch, with a tokenizer trained on the recipe's own datasets.

The stage trains a byte-level BPE tokenizer (:func:`lmcycle.models.build.train_tokenizer`) on every input and
target of its ``corpus`` datasets, initialises a model of a named size (``arch`` and ``size``, see
:data:`lmcycle.models.build.SIZES`) with the run's seed, and saves both to ``<stage>/model``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from lmcycle.atomic import atomic_dir
from lmcycle.config import DatasetName
from lmcycle.models.build import SIZES, Arch, build_model, count_params, min_vocab_size, train_tokenizer
from lmcycle.stages.common import StageConfig
from lmcycle.stages.context import RunContext


class BuildStage(StageConfig):
    """Train a tokenizer on the recipe's datasets and initialise a model of a named size."""

    type: Literal["build"] = "build"
    arch: Arch
    size: str
    corpus: list[DatasetName] = Field(min_length=1)
    vocab_size: int = 2048
    max_len: int = Field(default=512, ge=8)

    @field_validator("size")
    @classmethod
    def _known_size(cls, size: str, info: ValidationInfo) -> str:
        arch = info.data.get("arch")
        if arch in SIZES and size not in SIZES[arch]:
            raise ValueError(f"unknown size '{size}' for {arch} (known: {', '.join(SIZES[arch])})")
        return size

    @field_validator("vocab_size")
    @classmethod
    def _vocab_fits_bytes(cls, vocab_size: int, info: ValidationInfo) -> int:
        minimum = min_vocab_size(info.data.get("arch") == "t5")
        if vocab_size < minimum:
            raise ValueError(f"vocab_size must be at least {minimum} (256 bytes + special tokens)")
        return vocab_size


def corpus_texts(cfg: BuildStage, ctx: RunContext) -> Iterator[str]:
    """Every input and target of every example of the stage's corpus datasets."""
    for dataset in cfg.corpus:
        for ex in ctx.dataset(dataset):
            yield ex.input
            yield from ex.targets


def run_build(cfg: BuildStage, ctx: RunContext) -> dict[str, str]:
    """Train the tokenizer, build the model with ``ctx.seed`` and save both to ``<stage>/model``."""
    name = cfg.stage_name
    seq2seq = cfg.arch == "t5"
    tokenizer = train_tokenizer(corpus_texts(cfg, ctx), cfg.vocab_size, seq2seq=seq2seq, max_len=cfg.max_len)
    model = build_model(cfg.arch, cfg.size, tokenizer, cfg.max_len, ctx.seed, ctx.attn_implementation)
    out = ctx.stage_dir(name) / "model"
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)  # safetensors is the only format transformers 5 writes
        tokenizer.save_pretrained(tmp)
    ctx.log(name, params=count_params(model), vocab_size=len(tokenizer), arch=cfg.arch, size=cfg.size)
    return {"model": str(out)}
