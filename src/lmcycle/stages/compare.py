"""CompareStage: the deployer's table, a model and its optimized variants side by side.

For every model of ``models`` (the original first, then its distilled / quantized / pruned variants) one row of
quality, size, parameters, memory, latency at batch 1 and throughput, each model measured in its own child
process (:func:`lmcycle.optimize.compare.measure_in_child`) on the same eval texts and threads. Every ratio is
against the first model, measured in the same run. Writes ``<stage>/compare.json``: ``rows`` and ``settings``
(how the table was measured, which the report prints under it).
"""

from __future__ import annotations

import json
import platform
from typing import Any, Literal

import torch
from pydantic import Field

from lmcycle.atomic import atomic_write_json
from lmcycle.config import DatasetName, ModelRef
from lmcycle.errors import LmcycleError
from lmcycle.models.device import describe_device
from lmcycle.optimize.compare import WEIGHT_SUFFIXES, MeasureConfig, is_scalar, measure_in_child, with_ratios
from lmcycle.report.markdown import figure, filename, fixed, is_number, md, millions, row, save_png, share
from lmcycle.report.rundir import Run
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
        row = measure_in_child(path, data, cfg, ctx.device)
        rows.append({"label": label, "model": str(path), **row})
        ctx.log(name, kind="compare", model=label, **{k: v for k, v in row.items() if is_scalar(v)})
    result = {"rows": with_ratios(rows), "settings": settings(cfg, ctx.device)}
    path = out_dir / "compare.json"
    atomic_write_json(path, result)
    return {"compare": str(path)}


def settings(cfg: CompareStage, device: str) -> dict[str, Any]:
    """How the table was measured on ``device`` (the run's, resolved; the report prints it under the table)."""
    on_gpu = torch.device(device).type == "cuda"
    memory = ("peak CUDA memory torch allocates in a fresh process that loads the model and runs the timed "
              "batches, minus its allocations before loading" if on_gpu else
              "peak RSS of a fresh process that loads the model and runs the timed batches, minus its RSS before "
              "loading")
    return {"threads": cfg.threads or torch.get_num_threads(), "max_len": cfg.max_len,
            "latency": f"batch 1, one forward pass per eval input (cut to {cfg.max_len} tokens), {cfg.warmup} "
                       f"warm-up + {cfg.latency_runs} timed; p50/p95 of the timed passes",
            "throughput": f"batch {cfg.batch_size}, {cfg.throughput_batches} batches of eval inputs (after one "
                          "warm-up batch), examples per second",
            "peak_memory": f"{memory} (quality is scored afterwards)",
            "loaded_memory": f"{'CUDA memory' if on_gpu else 'RSS'} the loaded model adds to that process",
            "size": f"bytes of the weight files ({', '.join(WEIGHT_SUFFIXES)})",
            "compile": cfg.compile, "n_eval": cfg.n_eval, "eval_data": cfg.eval_data, "label_map": cfg.label_map,
            "device": describe_device(device), "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__}


def _example_dict(ex: Any) -> dict:
    return {"input": ex.input, "targets": list(ex.targets), "id": ex.id}


def section(run: Run) -> str:
    """Per compare stage (its compare.json), the deployer's table of report.md's Optimization chapter: quality,
    size, memory, latency, throughput and parameters of every model, each with its ratio to the first, and a
    quality-against-latency plot."""
    tables = []
    for stage, produced in run.artifacts.items():
        path = run.resolve(produced["compare"]) if "compare" in produced else None
        data = json.loads(path.read_text(encoding="utf-8")) if path and path.is_file() else None
        if isinstance(data, dict) and data.get("rows"):
            tables.append(_compare_table(run, stage, data))
    return "\n".join(tables)


def quality_columns(rows: list[dict]) -> list[str]:
    """The quality metrics of the table, in first-seen order (``<dataset>.macro_f1``, ``<dataset>.perplexity``)."""
    seen: dict[str, None] = {}
    for r in rows:
        for key in r.get("quality") or {}:
            if not key.endswith(".accuracy"):
                seen.setdefault(key, None)
    return list(seen)


def _compare_table(run: Run, stage: str, data: dict) -> str:
    rows, settings = data["rows"], data.get("settings") or {}
    metrics = quality_columns(rows)
    head = ["Model", *[md(m) for m in metrics], "Params", "Zeros", "Size (MB)", "× size", "Loaded (MB)",
            "Peak serving (MB)", "p50 ms (b=1)", "p95 ms", "× speed (b=1)",
            f"Examples/s (b={rows[0].get('batch_size', '?')})", "× throughput"]
    lines = [f"### {md(stage)}", "",
             "Every ratio is against the first row, measured in the same run on the same threads.", "",
             row(head), "|---|" + "---:|" * (len(head) - 1)]
    for r in rows:
        quality = r.get("quality") or {}
        lines.append(row([md(str(r.get("label"))), *[fixed(quality.get(m), 2) for m in metrics],
                          millions(r.get("params")), share(r.get("zero_params"), r.get("params")),
                          _mb(r.get("size_bytes")), _times(r.get("size_ratio")),
                          fixed(r.get("loaded_memory_mb"), 0), fixed(r.get("peak_memory_mb"), 0),
                          fixed(r.get("latency_p50_ms"), 2), fixed(r.get("latency_p95_ms"), 2),
                          _times(r.get("speedup_b1")), fixed(r.get("throughput"), 1),
                          _times(r.get("speedup_throughput"))]))
    on = f" on {md(str(settings['device']))}" if settings.get("device") else ""
    lines += ["", f"Measured{on} with {settings.get('threads', '?')} thread(s), torch {settings.get('torch', '?')}"
                  f"{', torch.compile' if settings.get('compile') else ', eager'}. Latency: "
                  f"{settings.get('latency', '?')}. Throughput: {settings.get('throughput', '?')}. Loaded: "
                  f"{settings.get('loaded_memory', '?')}. Peak serving: {settings.get('peak_memory', '?')}. Size: "
                  f"{settings.get('size', '?')}.", ""]
    note = _eager_quantized_note(run, rows, settings)
    if note:
        lines += [note, ""]
    plot = _quality_latency_plot(run, stage, rows, metrics[0] if metrics else None)
    if plot:
        lines += [f"![quality against latency]({plot})", ""]
    return "\n".join(lines)


def _eager_quantized_note(run: Run, rows: list[dict], settings: dict) -> str:
    """Why a quantized model is slower than the first row, when it was timed eagerly (else "")."""
    if settings.get("compile"):
        return ""
    slower = []
    for r in rows[1:]:
        folder = run.resolve(str(r.get("model"))) if r.get("model") else None
        if folder is not None and (folder / "quantization.json").is_file() and is_number(r.get("speedup_b1")) \
                and r["speedup_b1"] < 1:
            slower.append(f"{md(str(r.get('label')))} ({_times(r['speedup_b1'])})")
    if not slower:
        return ""
    return (f"Quantized and slower at batch 1: {', '.join(slower)}. These timings are eager (`compile: false`): "
            "torchao's quantized weights are tensor subclasses that quantize activations and dispatch from Python "
            "at every linear call, which costs more than a model this small computes, and only `torch.compile` "
            "fuses them into the int8 kernels a deployment would run. The gain measured here is the size; set "
            "`compile: true` on the compare stage to time what you would deploy.")


def _mb(n_bytes: Any) -> str:
    return f"{n_bytes / 1e6:.1f}" if is_number(n_bytes) else "—"


def _times(ratio: Any) -> str:
    return f"{ratio:.2f}×" if is_number(ratio) else "—"


def _quality_latency_plot(run: Run, stage: str, rows: list[dict], metric: str | None) -> str | None:
    points = [(r["label"], r.get("latency_p50_ms"), (r.get("quality") or {}).get(metric), r.get("size_bytes"))
              for r in rows]
    points = [p for p in points if is_number(p[1]) and is_number(p[2])]
    if metric is None or not points:
        return None
    fig = figure(10, 3.8)
    ax_q, ax_s = fig.subplots(1, 2)
    for label, latency, quality, _ in points:
        ax_q.scatter([latency], [quality])
        ax_q.annotate(str(label), (latency, quality), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax_q.set_xlabel("latency p50, batch 1 (ms)")
    ax_q.set_ylabel(metric)
    ax_q.set_title("quality against latency" + (" (lower is better)" if metric.endswith("perplexity") else ""))
    sizes = [(str(r["label"]), r["size_bytes"] / 1e6) for r in rows if is_number(r.get("size_bytes"))]
    ax_s.barh([s for s, _ in sizes][::-1], [v for _, v in sizes][::-1])
    ax_s.set_xlabel("weights on disk (MB)")
    ax_s.set_title("size")
    name = f"compare_{filename(stage)}.png"
    save_png(fig, run.dir / "plots" / name)
    return f"plots/{name}"
