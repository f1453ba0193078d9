"""Dense, BM25 and hybrid retrieval over one set of chunk keys, and incremental indexing of documents.

Hybrid = reciprocal-rank fusion (Cormack, Clarke & Büttcher, SIGIR 2009): each ranking contributes
``weight / (rrf_k + rank)`` (rank 1 = best) to a key's fused score; ``rrf_k = 60`` by default (the paper's
value), weights 1. Each ranking is cut at ``depth`` (100) before fusing. Fusing ranks, not scores, needs no
calibration between cosine similarities and BM25 scores.
"""

from __future__ import annotations

from collections.abc import Sequence

from lmcycle.apps.rag.bm25 import BM25
from lmcycle.apps.rag.chunk import chunk_text
from lmcycle.apps.rag.encoder import Encoder
from lmcycle.apps.rag.ingest import Document
from lmcycle.apps.rag.store import Hit, VectorStore
from lmcycle.errors import LmcycleError

RRF_K = 60
FUSION_DEPTH = 100
MODES = ("dense", "bm25", "hybrid")


def rrf_fuse(rankings: Sequence[Sequence[str]], rrf_k: float = RRF_K,
             weights: Sequence[float] | None = None) -> list[tuple[str, float]]:
    """Fuse ranked key lists: ``score(key) = sum_i weights[i] / (rrf_k + rank_i(key))``, best first (ties: the
    key met first, scanning rankings in order)."""
    weights = [1.0] * len(rankings) if weights is None else list(weights)
    if len(weights) != len(rankings):
        raise LmcycleError(f"{len(weights)} weights for {len(rankings)} rankings", field="weights")
    fused: dict[str, float] = {}
    for ranking, weight in zip(rankings, weights, strict=True):
        for rank, key in enumerate(ranking, start=1):
            fused[key] = fused.get(key, 0.0) + weight / (rrf_k + rank)
    return sorted(fused.items(), key=lambda kv: -kv[1])


class Retriever:
    """Retrieves chunks of ``store`` by ``encoder`` embeddings, by BM25, or both fused.

    The BM25 index is built from the texts in the store, so a reopened store gets the same BM25 index back.
    """

    def __init__(self, store: VectorStore, encoder: Encoder | None, bm25: BM25 | None = None,
                 rrf_k: float = RRF_K, weights: tuple[float, float] = (1.0, 1.0), depth: int = FUSION_DEPTH):
        self.store, self.encoder = store, encoder
        self.rrf_k, self.weights, self.depth = rrf_k, weights, depth
        self.bm25 = bm25 or BM25()
        if len(self.bm25) == 0 and len(store):
            keys = store.keys()
            self.bm25.add(keys, [store.get(k).get("text", "") for k in keys])

    def retrieve(self, query: str, k: int = 5, mode: str = "hybrid") -> list[Hit]:
        """The ``k`` best chunks for ``query``: ``mode`` is ``dense``, ``bm25`` or ``hybrid``."""
        if mode == "dense":
            return self.dense(query, k)
        if mode == "bm25":
            return self.sparse(query, k)
        if mode == "hybrid":
            return self.hybrid(query, k)
        raise LmcycleError(f"unknown retrieval mode '{mode}' (known: {', '.join(MODES)})", field="mode")

    def dense(self, query: str, k: int = 5) -> list[Hit]:
        if self.encoder is None:
            raise LmcycleError("dense retrieval needs an encoder", field="encoder")
        return self.store.search(self.encoder.encode_queries([query], progress=False)[0], k)

    def sparse(self, query: str, k: int = 5) -> list[Hit]:
        return [Hit(key, score, self.store.get(key)) for key, score in self.bm25.search(query, k)]

    def hybrid(self, query: str, k: int = 5) -> list[Hit]:
        dense = [h.key for h in self.dense(query, self.depth)]
        sparse = [key for key, _ in self.bm25.search(query, self.depth)]
        fused = rrf_fuse([dense, sparse], self.rrf_k, self.weights)[:k]
        return [Hit(key, score, self.store.get(key)) for key, score in fused]

    def index(self, documents: Sequence[Document], tokenizer=None, max_tokens: int = 254,
              overlap_tokens: int = 32) -> int:
        """Chunk, embed and store ``documents``; a document already indexed has all its old chunks replaced.
        Returns the number of chunks written."""
        if self.encoder is None:
            raise LmcycleError("indexing needs an encoder", field="encoder")
        return index_documents(documents, self.store, self.encoder, self.bm25,
                               tokenizer or self.encoder.tokenizer, max_tokens, overlap_tokens)


def index_documents(documents: Sequence[Document], store: VectorStore, encoder: Encoder, bm25: BM25 | None,
                    tokenizer, max_tokens: int, overlap_tokens: int) -> int:
    """For each document: chunk by ``tokenizer``, embed the chunks as passages, and replace the document's
    chunks in ``store`` (and ``bm25``) in one transaction -- re-ingesting an edited file leaves no stale chunk."""
    written = 0
    for doc in documents:
        chunks = chunk_text(doc.text, tokenizer, max_tokens, overlap_tokens, source=doc.source)
        old = set(store.keys_of_source(doc.source))
        vectors = encoder.encode_passages([c.text for c in chunks])
        metas = [{"source": c.source, "start": c.start, "end": c.end, "text": c.text} for c in chunks]
        store.replace_source(doc.source, [c.key for c in chunks], vectors, metas)
        if bm25 is not None:
            bm25.delete(old)
            bm25.add([c.key for c in chunks], [c.text for c in chunks])
        written += len(chunks)
    return written
