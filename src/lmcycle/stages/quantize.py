"""QuantizeStage: post-training quantization of a model of the run (:mod:`lmcycle.optimize.quantize`).

The stage loads ``model`` in float32 (:func:`~lmcycle.artifacts.load_for_quantize`), records activation
ranges over ``n_calibration`` seeded examples of ``calibration`` when given (required for ``int8_static``),
quantizes with ``method`` and saves ``<stage>/model`` with its ``quantization.json`` (the source model and the
calibration data recorded too). It logs the weight size before and after and how many layers were quantized.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from lmcycle.artifacts import load_for_quantize
from lmcycle.config import DatasetName, ModelRef
from lmcycle.optimize.compare import weights_mb
from lmcycle.optimize.quantize import calibrate, linear_targets, quantize_model, save_quantized
from lmcycle.report.markdown import fixed, md
from lmcycle.report.rundir import Run
from lmcycle.stages.common import StageConfig
from lmcycle.stages.context import RunContext


class QuantizeStage(StageConfig):
    """Quantize a model after training; writes ``<stage>/model`` (with ``quantization.json``)."""

    type: Literal["quantize"] = "quantize"
    model: ModelRef | None = Field(None, description="earlier stage, path or hub id; None = the latest language model")
    method: Literal["fp16", "bf16", "int8_weight_only", "int8_dynamic", "int8_static", "int4_weight_only"]
    calibration: DatasetName | None = Field(None, description="dataset whose texts calibrate activation ranges "
                                                              "(required for int8_static)")
    n_calibration: int = Field(128, ge=1, description="calibration examples drawn (seeded) from the dataset")
    max_len: int = Field(128, ge=1)
    batch_size: int = Field(16, ge=1)
    quantize_head: bool = Field(False, description="also quantize the LM head (output embeddings)")
    embeddings: bool = Field(True, description="int8 input embeddings when not tied to the head")
    group_size: int = Field(32, ge=1, description="int4 group size along the input dimension")
    compile: bool = Field(False, description="recorded in quantization.json: consumers should torch.compile it")
    seed: int | None = None

    @model_validator(mode="after")
    def _static_needs_data(self):
        if self.method == "int8_static" and not self.calibration:
            raise ValueError("method int8_static needs 'calibration' (a dataset name)")
        return self


def calibration_texts(examples: list, n: int, seed: int, causal_lm: bool) -> list[str]:
    """``n`` seeded examples as texts: a causal LM reads prompt and answer in one sequence, so its text is
    ``input + " " + targets[0]``; encoders, classifiers and T5 (whose encoder reads the input) get ``input``."""
    chosen = random.Random(seed).sample(list(examples), min(n, len(examples)))
    out = []
    for ex in chosen:
        text = getattr(ex, "input", ex)
        if causal_lm and getattr(ex, "targets", None):
            text = f"{text} {ex.targets[0]}"
        out.append(text)
    return out


def run_quantize(cfg: QuantizeStage, ctx: RunContext) -> dict[str, str]:
    """Load ``cfg.model``, calibrate (when a dataset is given), quantize, save ``<stage>/model``, log sizes."""
    name = cfg.stage_name
    out_dir = ctx.stage_dir(name)
    source = ctx.model_path(cfg.model)
    model, tokenizer = load_for_quantize(source, ctx.device, ctx.attn_implementation)
    calibration, texts = None, []
    if cfg.calibration:
        causal = not getattr(model.config, "is_encoder_decoder", False) and not any(
            a.endswith("ForSequenceClassification") for a in model.config.architectures or [])
        seed = ctx.seed_for(cfg.seed)
        texts = calibration_texts(ctx.dataset(cfg.calibration), cfg.n_calibration, seed, causal)
        calibration = calibrate(model, tokenizer, texts, max_len=cfg.max_len, batch_size=cfg.batch_size,
                                layers=linear_targets(model, cfg.quantize_head))
    quantized = quantize_model(model, cfg.method, calibration=calibration, quantize_head=cfg.quantize_head,
                               embeddings=cfg.embeddings, group_size=cfg.group_size, compile=cfg.compile)
    quantized.quantization.update(source=str(source), calibration_dataset=cfg.calibration,
                                  n_calibration=len(texts))
    model_dir = save_quantized(quantized, tokenizer, out_dir / "model")
    before = weights_mb(source) if Path(source).is_dir() else sum(
        p.numel() * p.element_size() for p in model.parameters()) / 1e6
    ctx.log(name, event="quantize", method=cfg.method, size_mb_before=round(before, 3),
            size_mb_after=round(weights_mb(model_dir), 3), n_linear_quantized=len(quantized.quantization["linears"]),
            n_embeddings_quantized=len(quantized.quantization["embeddings"]))
    return {"model": str(model_dir)}


def section(run: Run) -> str:
    """The quantization table of report.md's Optimization chapter: method, weight size before and after, and how
    many layers were quantized, per stage."""
    stages = run.stages_of("quantize")
    found = [(s, r) for s in stages if (r := run.last_event(s, "quantize"))]  # a resumed stage logs again
    if not found:
        return ""
    lines = ["### Quantization", "", "| Stage | Method | Weights before (MB) | After (MB) | Linear layers | "
             "Embeddings |", "|---|---|---:|---:|---:|---:|"]
    for stage, r in found:
        lines.append(f"| {md(stage)} | {md(str(r.get('method')))} | {fixed(r.get('size_mb_before'), 1)} | "
                     f"{fixed(r.get('size_mb_after'), 1)} | {r.get('n_linear_quantized', '—')} | "
                     f"{r.get('n_embeddings_quantized', '—')} |")
    return "\n".join(lines) + "\n"
