"""HarnessStage: a benchmark harness as a recipe stage, so that its score lands in the run's report.

GSM8K (direct, cot, self_consistency, pal) or TruthfulQA MC1 (letter, likelihood) accuracy
(:mod:`lmcycle.apps.harness`) of a model of the run (``model``: latest, a stage name, a path or hub id) or of any
served model (``backend``). Writes ``<stage>/eval.json`` (``metrics`` and ``settings``) and
``<stage>/records.jsonl`` (per question: prediction, gold, correct, and the completion or program).
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import Field

from lmcycle.apps.harness import run_benchmark
from lmcycle.apps.llm import LocalLLM, backend_from_spec
from lmcycle.atomic import atomic_write_text
from lmcycle.config import ModelRef
from lmcycle.models.generate import DecodingConfig
from lmcycle.stages.common import StageConfig, write_eval
from lmcycle.stages.context import RunContext


class HarnessStage(StageConfig):
    """A benchmark harness over a model of the run or any OpenAI-compatible server."""

    type: Literal["harness"] = "harness"
    benchmark: Literal["gsm8k", "truthfulqa"]
    path: str = Field(description="GSM8K folder / test jsonl, or TruthfulQA folder / mc_task.json")
    method: str = Field("cot", description="gsm8k: direct|cot|self_consistency|pal; truthfulqa: letter|likelihood")
    model: ModelRef | None = Field(None, description="latest, a stage name, a path or a hub id")
    backend: str | None = Field(None, description="openai:BASE_URL#MODEL instead of an in-process model")
    limit: int | None = Field(None, ge=1)
    n: int = Field(5, ge=1, description="self-consistency samples")
    decoding: DecodingConfig = DecodingConfig(max_new_tokens=256)


def run_harness(cfg: HarnessStage, ctx: RunContext) -> dict[str, str]:
    name = cfg.stage_name
    data = ctx.recipe_path(cfg.path)
    llm = backend_from_spec(cfg.backend) if cfg.backend else LocalLLM(ctx.model_path(cfg.model), device=ctx.device)
    result = run_benchmark(llm, cfg.benchmark, data, cfg.method, cfg.decoding, limit=cfg.limit, n=cfg.n)
    metric = next(iter(result))
    out = ctx.stage_dir(name)
    atomic_write_text(out / "records.jsonl",
                      "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in result["records"]))
    settings = result["settings"] | {"benchmark": cfg.benchmark, "data": data, "model": llm.name}
    eval_path = write_eval(out, {"metrics": {metric: result[metric], "n": result["n"]}, "settings": settings})
    ctx.log(name, **{metric: result[metric], "n": result["n"]})
    return {"eval": eval_path, "records": str(out / "records.jsonl")}
