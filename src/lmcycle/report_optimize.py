"""The optimization section of report.md: distillation (teacher vs student), pruning (sparsity and perplexity
before / after / healed), quantization (size), and per compare stage the deployer's table (quality, size, memory,
latency, throughput, parameters, each with its ratio to the original) with a quality-vs-latency plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmcycle.report import _filename, _is_number, _md, _read_json, _save_png, resolve

OPTIMIZE_KINDS = ("distill", "prune", "quantize", "compare")


def optimize_section(run_dir: Path, optimized: dict[str, str], rows: list[dict],
                     artifacts: dict[str, dict[str, str]]) -> str:
    """Tables for the finished distill, prune and quantize stages, then a table and a plot for every compare
    stage (its compare.json)."""
    parts = [_distill_table(run_dir, [n for n, k in optimized.items() if k == "distill"], artifacts),
             _prune_table(run_dir, [n for n, k in optimized.items() if k == "prune"], rows, artifacts),
             _quantize_table([n for n, k in optimized.items() if k == "quantize"], rows)]
    parts = [p for p in parts if p]
    for stage, produced in artifacts.items():
        path = resolve(run_dir, produced.get("compare", ""))
        data = _read_json(path) if path and path.is_file() else None
        if isinstance(data, dict) and data.get("rows"):
            parts.append(_compare_table(run_dir, stage, data))
    return "\n".join(["## Optimization", "", *parts]) if parts else ""


def _eval_json(run_dir: Path, artifacts: dict[str, dict[str, str]], stage: str) -> dict | None:
    path = resolve(run_dir, artifacts.get(stage, {}).get("eval", ""))
    data = _read_json(path) if path and path.is_file() else None
    return data if isinstance(data, dict) else None


def _distill_table(run_dir: Path, stages: list[str], artifacts: dict[str, dict[str, str]]) -> str:
    found = [(s, d) for s in stages if (d := _eval_json(run_dir, artifacts, s))]
    if not found:
        return ""
    lines = ["### Distillation", "", "Teacher → student on held-out data (the student's share of the teacher's "
             "score in brackets).", "", "| Stage | Student layers | Parameters (student / teacher) | Scores |",
             "|---|---|---:|---|"]
    for stage, data in found:
        m, s = data.get("metrics") or {}, data.get("settings") or {}
        scores = []
        for key, teacher in m.items():
            if key.startswith("teacher.") and key.endswith((".macro_f1", ".perplexity")):
                name = key.removeprefix("teacher.")
                student = m.get(name)
                share = f" ({100 * student / teacher:.1f}%)" if _is_number(student) and teacher else ""
                scores.append(f"{_md(name)}: {_num(teacher, 2)} → {_num(student, 2)}{share}")
        lines.append(f"| {_md(stage)} | {_md(str(s.get('student_layers') or s.get('student_config') or '—'))} | "
                     f"{_millions(m.get('student_params'))} / {_millions(m.get('teacher_params'))} "
                     f"({_share(m.get('student_params'), m.get('teacher_params'))}) | {'; '.join(scores) or '—'} |")
    return "\n".join(lines) + "\n"


def _prune_table(run_dir: Path, stages: list[str], rows: list[dict], artifacts: dict[str, dict[str, str]]) -> str:
    found = [(s, d) for s in stages if (d := _eval_json(run_dir, artifacts, s))]
    if not found:
        return ""
    lines = ["### Pruning", "", "Perplexity (lower is better) before pruning, after it, and after LoRA healing "
             "(merged, then re-masked: the sparsity stays).", "",
             "| Stage | Method | Sparsity of pruned layers | Whole model | Parameters | Data | Before | Pruned "
             "| Healed |", "|---|---|---:|---:|---:|---|---:|---:|---:|"]
    for stage, data in found:
        s, ppl = data.get("settings") or {}, data.get("perplexity") or {}
        event = next((r for r in reversed(rows) if r.get("stage") == stage and r.get("event") == "prune"), {})
        method = s.get("method", "—")
        method = {"nm": f"{s.get('n')}:{s.get('m')} ({s.get('score')})",
                  "structured": f"structured (heads {s.get('heads')}, MLP {s.get('mlp')})"}.get(method, method)
        datasets = list(ppl.get("before") or {}) or ["—"]
        for ds in datasets:
            lines.append(f"| {_md(stage)} | {_md(str(method))} | {_percent(event.get('sparsity'))} | "
                         f"{_percent(event.get('model_sparsity'))} | {_millions(event.get('params'))} | {_md(ds)} | "
                         + " | ".join(_num((ppl.get(k) or {}).get(ds), 2) for k in ("before", "after_prune",
                                                                                    "after_heal")) + " |")
    return "\n".join(lines) + "\n"


def _quantize_table(stages: list[str], rows: list[dict]) -> str:
    last = {r["stage"]: r for r in rows if r.get("event") == "quantize" and r.get("stage") in stages}
    found = [(s, last[s]) for s in stages if s in last]  # a resumed stage logs again: its last row counts
    if not found:
        return ""
    lines = ["### Quantization", "", "| Stage | Method | Weights before (MB) | After (MB) | Linear layers | "
             "Embeddings |", "|---|---|---:|---:|---:|---:|"]
    for stage, r in found:
        lines.append(f"| {_md(stage)} | {_md(str(r.get('method')))} | {_num(r.get('size_mb_before'), 1)} | "
                     f"{_num(r.get('size_mb_after'), 1)} | {r.get('n_linear_quantized', '—')} | "
                     f"{r.get('n_embeddings_quantized', '—')} |")
    return "\n".join(lines) + "\n"


def _percent(value: Any) -> str:
    return f"{100 * value:.1f}%" if _is_number(value) else "—"


def quality_columns(rows: list[dict]) -> list[str]:
    """The quality metrics of the table, in first-seen order (``<dataset>.macro_f1``, ``<dataset>.perplexity``)."""
    seen: dict[str, None] = {}
    for row in rows:
        for key in row.get("quality") or {}:
            if not key.endswith(".accuracy"):
                seen.setdefault(key, None)
    return list(seen)


def _compare_table(run_dir: Path, stage: str, data: dict) -> str:
    rows, settings = data["rows"], data.get("settings") or {}
    metrics = quality_columns(rows)
    head = ["Model", *[_md(m) for m in metrics], "Params", "Zeros", "Size (MB)", "× size", "Loaded (MB)", "Peak serving (MB)",
            "p50 ms (b=1)", "p95 ms", "× speed (b=1)", f"Examples/s (b={rows[0].get('batch_size', '?')})",
            "× throughput"]
    lines = [f"### {_md(stage)}", "",
             "Every ratio is against the first row, measured in the same run on the same threads.", "",
             "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in rows:
        quality = r.get("quality") or {}
        cells = [_md(str(r.get("label"))), *[_num(quality.get(m), 2) for m in metrics],
                 _millions(r.get("params")), _share(r.get("zero_params"), r.get("params")),
                 _mb(r.get("size_bytes")), _times(r.get("size_ratio")), _num(r.get("loaded_memory_mb"), 0), _num(r.get("peak_memory_mb"), 0),
                 _num(r.get("latency_p50_ms"), 2), _num(r.get("latency_p95_ms"), 2), _times(r.get("speedup_b1")),
                 _num(r.get("throughput"), 1), _times(r.get("speedup_throughput"))]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Measured with {settings.get('threads', '?')} thread(s), torch {settings.get('torch', '?')}"
                  f"{', torch.compile' if settings.get('compile') else ', eager'}. Latency: "
                  f"{settings.get('latency', '?')}. Throughput: {settings.get('throughput', '?')}. Loaded: "
                  f"{settings.get('loaded_memory', '?')}. Peak serving: {settings.get('peak_memory', '?')}. Size: "
                  f"{settings.get('size', '?')}.", ""]
    plot = _quality_latency_plot(run_dir, stage, rows, metrics[0] if metrics else None)
    if plot:
        lines += [f"![quality against latency]({plot})", ""]
    return "\n".join(lines)


def _num(value: Any, digits: int) -> str:
    return f"{value:,.{digits}f}" if _is_number(value) else "—"


def _millions(value: Any) -> str:
    return f"{value / 1e6:.2f}M" if _is_number(value) else "—"


def _share(part: Any, whole: Any) -> str:
    return f"{100 * part / whole:.1f}%" if _is_number(part) and _is_number(whole) and whole else "—"


def _mb(n_bytes: Any) -> str:
    return f"{n_bytes / 1e6:.1f}" if _is_number(n_bytes) else "—"


def _times(ratio: Any) -> str:
    return f"{ratio:.2f}×" if _is_number(ratio) else "—"


def _quality_latency_plot(run_dir: Path, stage: str, rows: list[dict], metric: str | None) -> str | None:
    from matplotlib.figure import Figure

    points = [(r["label"], r.get("latency_p50_ms"), (r.get("quality") or {}).get(metric), r.get("size_bytes"))
              for r in rows]
    points = [p for p in points if _is_number(p[1]) and _is_number(p[2])]
    if metric is None or not points:
        return None
    fig = Figure(figsize=(10, 3.8))
    ax_q, ax_s = fig.subplots(1, 2)
    for label, latency, quality, _ in points:
        ax_q.scatter([latency], [quality])
        ax_q.annotate(str(label), (latency, quality), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax_q.set_xlabel("latency p50, batch 1 (ms)")
    ax_q.set_ylabel(metric)
    ax_q.set_title("quality against latency" + (" (lower is better)" if metric.endswith("perplexity") else ""))
    sizes = [(str(r["label"]), r["size_bytes"] / 1e6) for r in rows if _is_number(r.get("size_bytes"))]
    ax_s.barh([s for s, _ in sizes][::-1], [v for _, v in sizes][::-1])
    ax_s.set_xlabel("weights on disk (MB)")
    ax_s.set_title("size")
    name = f"compare_{_filename(stage)}.png"
    _save_png(fig, run_dir / "plots" / name)
    return f"plots/{name}"
