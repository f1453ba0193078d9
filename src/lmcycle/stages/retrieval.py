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
