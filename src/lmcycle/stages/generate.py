"""GenerateStage: continuations of fixed prompts with one decoding setting (:func:`lmcycle.models.generate.generate`).

Writes ``<stage>/generations.jsonl``: one ``{"prompt", "output", "settings"}`` object per prompt, in the order of
``prompts``; ``settings`` is the whole decoding config.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import Field

from lmcycle.artifacts import load_model
from lmcycle.atomic import atomic_write_text
from lmcycle.config import ModelRef
from lmcycle.models.generate import DecodingConfig, generate
from lmcycle.stages.common import ModelStage, model_dtype
from lmcycle.stages.context import RunContext


class GenerateStage(ModelStage):
    """Generate continuations of fixed prompts with one decoding setting."""

    type: Literal["generate"] = "generate"
    model: ModelRef | None = None
    prompts: list[str] = Field(min_length=1)
    decoding: DecodingConfig = DecodingConfig()


def run_generate(cfg: GenerateStage, ctx: RunContext) -> dict[str, str]:
    """Write ``generations.jsonl``: one ``{"prompt", "output", "settings"}`` object per prompt."""
    name = cfg.stage_name
    model, tokenizer = load_model(ctx.model_path(cfg.model), device=ctx.device, dtype=model_dtype(cfg, ctx),
                                  attn_implementation=ctx.attn_implementation)
    outputs = generate(model, tokenizer, cfg.prompts, cfg.decoding, progress=True)
    settings = cfg.decoding.model_dump()
    lines = [json.dumps({"prompt": p, "output": o, "settings": settings}, ensure_ascii=False)
             for p, o in zip(cfg.prompts, outputs, strict=True)]
    path = ctx.stage_dir(name) / "generations.jsonl"
    atomic_write_text(path, "\n".join(lines) + "\n")
    ctx.log(name, prompts=len(cfg.prompts), mean_output_chars=sum(map(len, outputs)) / len(outputs))
    return {"generations": str(path)}
