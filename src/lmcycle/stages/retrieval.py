"""RetrievalStage: retrieval quality on XQuAD-format data, so that it lands in the run's report.

recall@1/5/10 and MRR of BM25, dense and hybrid (RRF) retrieval (:mod:`lmcycle.apps.rag.xquad_eval`): the
paragraphs are the corpus, each question's own paragraph the gold. Writes ``<stage>/eval.json`` (``metrics`` and
``settings``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from lmcycle.apps.rag.encoder import Encoder
from lmcycle.apps.rag.xquad_eval import evaluate_xquad_retrieval
from lmcycle.report.markdown import figure, filename, md, save_png
from lmcycle.report.rundir import Run
from lmcycle.stages.common import StageConfig, write_eval
from lmcycle.stages.context import RunContext


class RetrievalStage(StageConfig):
    """Retrieval quality on XQuAD-format data."""

    type: Literal["retrieval"] = "retrieval"
    path: str = Field(description="XQuAD / SQuAD v1.1 JSON file or its folder")
    encoder: str | None = Field(None, description="HF encoder (default all-MiniLM-L6-v2)")
    articles: int | None = Field(None, ge=1, description="only the first N articles")
    rrf_k: float = Field(60.0, gt=0)


def run_retrieval(cfg: RetrievalStage, ctx: RunContext) -> dict[str, str]:
    name = cfg.stage_name
    data = ctx.recipe_path(cfg.path)
    result = evaluate_xquad_retrieval(data, Encoder(cfg.encoder) if cfg.encoder else None,
                                      articles=cfg.articles, rrf_k=cfg.rrf_k)
    metrics = {f"{mode}.{k}": v for mode in ("bm25", "dense", "hybrid") for k, v in result[mode].items()}
    metrics |= {"n": result["n_questions"], "paragraphs": result["n_paragraphs"],
                "paragraphs_truncated": result["n_truncated"]}
    path = write_eval(ctx.stage_dir(name), {"metrics": metrics, "settings": result["settings"] | {"data": data}})
    ctx.log(name, **{k: v for k, v in metrics.items() if k.startswith("hybrid.")})
    return {"eval": path}


MODES = ("bm25", "dense", "hybrid")
RANKING = ("recall@1", "recall@5", "recall@10", "mrr")


def section(run: Run) -> str:
    """Per retrieval stage, for report.md's Applications chapter: recall@k and MRR of BM25, dense and hybrid
    search, as a table and a plot."""
    found = [(stage, data) for stage in run.stages_of("retrieval") if (data := run.eval_json(stage)) is not None]
    return "\n".join(_retrieval(run, stage, data) for stage, data in found)


def _retrieval(run: Run, stage: str, data: dict) -> str:
    m, s = data.get("metrics") or {}, data.get("settings") or {}
    lines = [f"### Retrieval: {md(stage)}", "",
             f"{m.get('n', '?')} questions over {m.get('paragraphs', '?')} paragraphs of `{md(str(s.get('data')))}` "
             f"({m.get('paragraphs_truncated', 0)} longer than the encoder's window, embedded truncated); encoder "
             f"`{md(str(s.get('encoder')))}`, BM25 k1 {s.get('bm25_k1')} b {s.get('bm25_b')}, hybrid = "
             f"reciprocal-rank fusion with k = {s.get('rrf_k')}.", "",
             "| Retrieval | Recall@1 | Recall@5 | Recall@10 | MRR |", "|---|---:|---:|---:|---:|"]
    for mode in MODES:
        lines.append(f"| {mode} | " + " | ".join(_cell(m.get(f"{mode}.{k}")) for k in RANKING) + " |")
    fig = figure(6, 3.4)
    ax = fig.subplots()
    for i, mode in enumerate(MODES):
        values = [float(m.get(f"{mode}.{k}") or 0.0) for k in RANKING]
        ax.bar([x + (i - 1) * 0.27 for x in range(len(RANKING))], values, width=0.27, label=mode)
    ax.set_xticks(range(len(RANKING)))
    ax.set_xticklabels(RANKING)
    ax.set_ylim(min(0.8, min(float(m.get(f"{mo}.recall@1") or 0) for mo in MODES) - 0.05), 1.0)
    ax.set_title(f"retrieval: {stage}")
    ax.legend()
    name = f"plots/retrieval_{filename(stage)}.png"
    save_png(fig, run.dir / name)
    return "\n".join(lines + ["", f"![recall@k and MRR per retrieval mode]({name})", ""])


def _cell(value) -> str:
    return f"{value:.3f}" if isinstance(value, int | float) else "—"
