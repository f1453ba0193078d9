"""CompareStage: the deployer's table, a model and its optimized variants side by side.

For every model of ``models`` (the original first, then its distilled / quantized / pruned variants) one row of
quality, size, parameters, memory, latency at batch 1 and throughput, each model measured in its own child
process (:func:`lmcycle.optimize.compare.measure_in_child`) on the same eval texts and threads. Every ratio is
against the first model, measured in the same run. Writes ``<stage>/compare.json``: ``rows`` and ``settings``
(how the table was measured, which the report prints under it).
"""

from __future__ import annotations

import platform
from typing import Any, Literal

import torch
from pydantic import Field

from lmcycle.atomic import atomic_write_json
from lmcycle.config import DatasetName, ModelRef
from lmcycle.errors import LmcycleError
from lmcycle.optimize.compare import WEIGHT_SUFFIXES, MeasureConfig, is_scalar, measure_in_child, with_ratios
from lmcycle.stages.common import StageConfig
from lmcycle.stages.context import RunContext


class CompareModels(StageConfig):
    """Which models a compare stage measures, under which names, on which data."""

    type: Literal["compare"] = "compare"
    models: list[ModelRef] = Field(min_length=1, description="earlier stages, paths or hub ids; the first is the "
                                                             "reference of every ratio")
    labels: list[str] | None = Field(None, description="row names (default: the entries of 'models')")
    eval_data: list[DatasetName] = Field(min_length=1, description="datasets scored for quality; their inputs are timed")


# The measuring settings come second (a base later in the bases' order gives its fields first), so that the
# resolved config.yaml lists the keys as it always has: type, name, models, labels, eval_data, then label_map...
class CompareStage(MeasureConfig, CompareModels):
    """Measure a model and its optimized variants on the same data and threads; write compare.json."""


def run_compare(cfg: CompareStage, ctx: RunContext) -> dict[str, str]:
    """Measure every model in its own process; write ``<stage>/compare.json``; return ``{"compare": path}``."""
    name = cfg.stage_name
    out_dir = ctx.stage_dir(name)
    labels = cfg.labels or list(cfg.models)
    if len(labels) != len(cfg.models):
        raise LmcycleError(f"'labels' has {len(labels)} names for {len(cfg.models)} models",
                           file=ctx.recipe_file, field="labels")
    data = {ds: [_example_dict(ex) for ex in ctx.dataset(ds)[:cfg.n_eval]] for ds in cfg.eval_data}
    rows = []
    for label, ref in zip(labels, cfg.models, strict=True):
        path = ctx.model_path(ref)
        row = measure_in_child(path, data, cfg)
        rows.append({"label": label, "model": str(path), **row})
        ctx.log(name, kind="compare", model=label, **{k: v for k, v in row.items() if is_scalar(v)})
    result = {"rows": with_ratios(rows), "settings": settings(cfg)}
    path = out_dir / "compare.json"
    atomic_write_json(path, result)
    return {"compare": str(path)}


def settings(cfg: CompareStage) -> dict[str, Any]:
    """How the table was measured (the report prints it under the table)."""
    return {"threads": cfg.threads or torch.get_num_threads(), "max_len": cfg.max_len,
            "latency": f"batch 1, one forward pass per eval input (cut to {cfg.max_len} tokens), {cfg.warmup} "
                       f"warm-up + {cfg.latency_runs} timed; p50/p95 of the timed passes",
            "throughput": f"batch {cfg.batch_size}, {cfg.throughput_batches} batches of eval inputs (after one "
                          "warm-up batch), examples per second",
            "peak_memory": "peak RSS of a fresh process that loads the model and runs the timed batches, minus "
                           "its RSS before loading (quality is scored afterwards)",
            "loaded_memory": "RSS the loaded model adds to that process",
            "size": f"bytes of the weight files ({', '.join(WEIGHT_SUFFIXES)})",
            "compile": cfg.compile, "n_eval": cfg.n_eval, "eval_data": cfg.eval_data, "label_map": cfg.label_map,
            "device": "cpu", "cpu": platform.processor() or platform.machine(), "torch": torch.__version__}


def _example_dict(ex: Any) -> dict:
    return {"input": ex.input, "targets": list(ex.targets), "id": ex.id}
