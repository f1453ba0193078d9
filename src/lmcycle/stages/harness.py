"""HarnessStage: a benchmark harness as a recipe stage, so that its score lands in the run's report.

GSM8K (direct, cot, self_consistency, pal), TruthfulQA MC1 (letter, likelihood) or Constitutional AI HHH
(likelihood, letter; with the share of picks of option (A)) accuracy (:mod:`lmcycle.apps.harness`) of a model
of the run (``model``: latest, a stage name, a path or hub id) or of any served model (``backend``).
Writes ``<stage>/eval.json`` (``metrics`` and ``settings``) and ``<stage>/records.jsonl`` (per question:
prediction, gold, correct, and the completion, program or log-probabilities).
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
from lmcycle.report.markdown import md
from lmcycle.report.rundir import Run
from lmcycle.stages.common import ModelStage, model_dtype, write_eval
from lmcycle.stages.context import RunContext


class HarnessStage(ModelStage):
    """A benchmark harness over a model of the run or any OpenAI-compatible server."""

    type: Literal["harness"] = "harness"
    benchmark: Literal["gsm8k", "truthfulqa", "hhh"]
    path: str = Field(description="GSM8K folder / test jsonl, TruthfulQA folder / mc_task.json, or HHH "
                                  "438HHHEvaluations.jsonl (or its folder)")
    method: str = Field("cot", description="gsm8k: direct|cot|self_consistency|pal; truthfulqa: letter|likelihood; "
                                           "hhh: likelihood|letter")
    model: ModelRef | None = Field(None, description="latest, a stage name, a path or a hub id")
    backend: str | None = Field(None, description="openai:BASE_URL#MODEL instead of an in-process model")
    limit: int | None = Field(None, ge=1)
    n: int = Field(5, ge=1, description="self-consistency samples")
    decoding: DecodingConfig = DecodingConfig(max_new_tokens=256)


def run_harness(cfg: HarnessStage, ctx: RunContext) -> dict[str, str]:
    name = cfg.stage_name
    data = ctx.recipe_path(cfg.path)
    llm = backend_from_spec(cfg.backend) if cfg.backend else LocalLLM(
        ctx.model_path(cfg.model), device=ctx.device, attn_implementation=ctx.attn_implementation,
        dtype=model_dtype(cfg, ctx))
    result = run_benchmark(llm, cfg.benchmark, data, cfg.method, cfg.decoding, limit=cfg.limit, n=cfg.n)
    metric = next(iter(result))
    out = ctx.stage_dir(name)
    atomic_write_text(out / "records.jsonl",
                      "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in result["records"]))
    settings = result["settings"] | {"benchmark": cfg.benchmark, "data": data, "model": llm.name}
    metrics = {metric: result[metric], "n": result["n"]} | {k: result[k] for k in ("picked_a",) if k in result}
    eval_path = write_eval(out, {"metrics": metrics, "settings": settings})
    ctx.log(name, **{metric: result[metric], "n": result["n"]})
    return {"eval": eval_path, "records": str(out / "records.jsonl")}


def section(run: Run) -> str:
    """The benchmark table of report.md's Applications chapter: every harness stage's accuracy (with chance
    where the benchmark has one) and the settings that produced it."""
    found = [(stage, data) for stage in run.stages_of("harness") if (data := run.eval_json(stage)) is not None]
    if not found:
        return ""
    lines = ["### Benchmark harnesses", "",
             "| Stage | Benchmark | Method | Model | n | Accuracy | Settings |", "|---|---|---|---|---:|---:|---|"]
    for stage, data in found:
        m, s = data.get("metrics") or {}, data.get("settings") or {}
        metric = next((k for k in ("gsm8k_accuracy", "truthfulqa_mc1", "hhh_accuracy") if k in m), None)
        accuracy = f"{m[metric]:.1f}%" if metric else "—"
        if s.get("chance_accuracy") is not None:
            accuracy += f" (chance {s['chance_accuracy']:.1f}%)"
        details = "; ".join(f"{k}: {s[k]}" for k in ("decoding", "shots", "self_consistency_n", "extraction",
                                                         "option_order", "unparsed", "ties") if s.get(k) is not None)
        if s.get("picked_a") is not None:  # position bias, next to how often (A) is the right pick
            details += f"; picked (A): {100 * s['picked_a']:.1f}% (gold (A): {100 * s.get('gold_a', 0):.1f}%)"
        lines.append(f"| {md(stage)} | {md(str(s.get('benchmark')))} | {md(str(s.get('method') or s.get('mode')))} "
                     f"| `{md(str(s.get('model')))}` | {m.get('n', '—')} | {accuracy} | {md(details)} |")
    return "\n".join(lines) + "\n"
