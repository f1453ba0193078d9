"""The applications section of report.md: per retrieval stage recall@k and MRR of BM25, dense and hybrid search
(table and plot), and one table of every harness stage's benchmark accuracy with its settings."""

from __future__ import annotations

from pathlib import Path

from lmcycle.report import _filename, _md, _read_json, _save_png, resolve

APP_KINDS = ("retrieval", "harness")
MODES = ("bm25", "dense", "hybrid")
RANKING = ("recall@1", "recall@5", "recall@10", "mrr")


def apps_section(run_dir: Path, stages: dict[str, str], artifacts: dict[str, dict[str, str]]) -> str:
    """Tables (and a plot per retrieval stage) for the finished retrieval and harness stages."""
    found = {}
    for stage, kind in stages.items():
        path = resolve(run_dir, artifacts.get(stage, {}).get("eval", ""))
        data = _read_json(path) if path and path.is_file() else None
        if isinstance(data, dict):
            found[stage] = (kind, data)
    parts = [_retrieval(run_dir, stage, data) for stage, (kind, data) in found.items() if kind == "retrieval"]
    harness = {stage: data for stage, (kind, data) in found.items() if kind == "harness"}
    if harness:
        parts.append(_harness(harness))
    return "\n".join(["## Applications", "", *parts]) if parts else ""


def _retrieval(run_dir: Path, stage: str, data: dict) -> str:
    m, s = data.get("metrics") or {}, data.get("settings") or {}
    lines = [f"### Retrieval: {_md(stage)}", "",
             f"{m.get('n', '?')} questions over {m.get('paragraphs', '?')} paragraphs of `{_md(str(s.get('data')))}` "
             f"({m.get('paragraphs_truncated', 0)} longer than the encoder's window, embedded truncated); encoder "
             f"`{_md(str(s.get('encoder')))}`, BM25 k1 {s.get('bm25_k1')} b {s.get('bm25_b')}, hybrid = "
             f"reciprocal-rank fusion with k = {s.get('rrf_k')}.", "",
             "| Retrieval | Recall@1 | Recall@5 | Recall@10 | MRR |", "|---|---:|---:|---:|---:|"]
    for mode in MODES:
        lines.append(f"| {mode} | " + " | ".join(_cell(m.get(f"{mode}.{k}")) for k in RANKING) + " |")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.4))
    ax = fig.subplots()
    for i, mode in enumerate(MODES):
        values = [float(m.get(f"{mode}.{k}") or 0.0) for k in RANKING]
        ax.bar([x + (i - 1) * 0.27 for x in range(len(RANKING))], values, width=0.27, label=mode)
    ax.set_xticks(range(len(RANKING)))
    ax.set_xticklabels(RANKING)
    ax.set_ylim(min(0.8, min(float(m.get(f"{mo}.recall@1") or 0) for mo in MODES) - 0.05), 1.0)
    ax.set_title(f"retrieval: {stage}")
    ax.legend()
    name = f"plots/retrieval_{_filename(stage)}.png"
    _save_png(fig, run_dir / name)
    return "\n".join(lines + ["", f"![recall@k and MRR per retrieval mode]({name})", ""])


def _harness(stages: dict[str, dict]) -> str:
    lines = ["### Benchmark harnesses", "",
             "| Stage | Benchmark | Method | Model | n | Accuracy | Settings |", "|---|---|---|---|---:|---:|---|"]
    for stage, data in stages.items():
        m, s = data.get("metrics") or {}, data.get("settings") or {}
        metric = next((k for k in ("gsm8k_accuracy", "truthfulqa_mc1") if k in m), None)
        accuracy = f"{m[metric]:.1f}%" if metric else "—"
        if s.get("chance_accuracy") is not None:
            accuracy += f" (chance {s['chance_accuracy']:.1f}%)"
        details = "; ".join(f"{k}: {s[k]}" for k in ("decoding", "shots", "self_consistency_n", "extraction",
                                                         "option_order") if s.get(k) is not None)
        lines.append(f"| {_md(stage)} | {_md(str(s.get('benchmark')))} | {_md(str(s.get('method') or s.get('mode')))} "
                     f"| `{_md(str(s.get('model')))}` | {m.get('n', '—')} | {accuracy} | {_md(details)} |")
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    return f"{value:.3f}" if isinstance(value, int | float) else "—"
