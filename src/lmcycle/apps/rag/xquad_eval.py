"""Retrieval quality on XQuAD-en: can each question find its own paragraph among the 240?

Corpus: every distinct paragraph (``context``) as one chunk, key ``"<title>#<i>"`` (i-th paragraph of the
article). Queries: the questions; gold: the paragraph that holds the question. Metrics per method (``bm25``,
``dense``, ``hybrid``): recall@k = share of questions whose paragraph is among the top k, and MRR = mean of
1/rank of the paragraph (0 when it is not in the top ``depth``). Paragraphs longer than the encoder's 256 tokens
are truncated by the encoder, as a one-chunk-per-paragraph corpus implies (``n_truncated`` counts them).

    python -m lmcycle.apps.rag.xquad_eval ../shared/data/xquad_en            # all 1,190 questions
    python -m lmcycle.apps.rag.xquad_eval ../shared/data/xquad_en --rrf-k 60 --stopwords
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from lmcycle.apps.rag.bm25 import BM25, ENGLISH_STOPWORDS
from lmcycle.apps.rag.encoder import Encoder
from lmcycle.apps.rag.retrieve import FUSION_DEPTH, RRF_K, rrf_fuse
from lmcycle.apps.rag.store import SqliteVectorStore
from lmcycle.data.xquad import load_xquad

KS = (1, 5, 10)


def xquad_corpus(path: str | Path, articles: int | None = None) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """(paragraph key -> text, [(question, gold key)]) of the first ``articles`` articles (all when None)."""
    paragraphs: dict[str, str] = {}
    key_of: dict[tuple[str, str], str] = {}
    titles: list[str] = []
    questions = []
    for ex in load_xquad(path, "all"):
        title, context = ex.meta["title"], ex.meta["context"]
        if title not in titles:
            if articles is not None and len(titles) == articles:
                break
            titles.append(title)
        if (title, context) not in key_of:
            key_of[(title, context)] = f"{title}#{sum(k.startswith(title + '#') for k in paragraphs)}"
            paragraphs[key_of[(title, context)]] = context
        questions.append((ex.meta["question"], key_of[(title, context)]))
    return paragraphs, questions


def evaluate_xquad_retrieval(path: str | Path, encoder: Encoder | None = None, *, articles: int | None = None,
                             rrf_k: float = RRF_K, weights: tuple[float, float] = (1.0, 1.0),
                             stopwords: bool = False, depth: int = FUSION_DEPTH) -> dict:
    """recall@1/5/10 and MRR of ``bm25``, ``dense`` and ``hybrid`` (RRF of the two) on XQuAD-en at ``path``
    (the folder or the JSON file). ``weights`` = (dense, bm25) in the fusion; ``stopwords`` drops
    :data:`~lmcycle.apps.rag.bm25.ENGLISH_STOPWORDS` in BM25."""
    paragraphs, questions = xquad_corpus(path, articles)
    encoder = encoder or Encoder()
    keys, texts = list(paragraphs), list(paragraphs.values())
    store = SqliteVectorStore(None)
    store.upsert(keys, encoder.encode_passages(texts), [{"text": t} for t in texts])
    bm25 = BM25(stopwords=ENGLISH_STOPWORDS if stopwords else frozenset())
    bm25.add(keys, texts)
    qvecs = encoder.encode_queries([q for q, _ in questions])
    rankings: dict[str, list[list[str]]] = {"bm25": [], "dense": [], "hybrid": []}
    for (question, _), hits in zip(questions, store.search_many(qvecs, depth), strict=True):
        dense = [h.key for h in hits]
        sparse = [key for key, _ in bm25.search(question, depth)]
        rankings["dense"].append(dense)
        rankings["bm25"].append(sparse)
        rankings["hybrid"].append([key for key, _ in rrf_fuse([dense, sparse], rrf_k, weights)])
    gold = [g for _, g in questions]
    n_truncated = sum(len(encoder.tokenizer(t, verbose=False)["input_ids"]) > encoder.max_length for t in texts)
    result = {"n_questions": len(questions), "n_paragraphs": len(paragraphs), "n_truncated": n_truncated,
              "settings": {"encoder": encoder.name, "rrf_k": rrf_k, "weights": list(weights),
                           "stopwords": stopwords, "depth": depth, "bm25_k1": bm25.k1, "bm25_b": bm25.b}}
    result.update({method: ranking_metrics(ranked, gold) for method, ranked in rankings.items()})
    return result


def ranking_metrics(ranked: list[list[str]], gold: list[str], ks: tuple[int, ...] = KS) -> dict[str, float]:
    """recall@k for each k and MRR of ranked key lists against one gold key per query."""
    ranks = np.array([r.index(g) + 1 if g in r else 0 for r, g in zip(ranked, gold, strict=True)])
    out = {f"recall@{k}": float(np.mean((ranks > 0) & (ranks <= k))) for k in ks}
    out["mrr"] = float(np.mean(np.where(ranks > 0, 1.0 / np.maximum(ranks, 1), 0.0)))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="XQuAD folder or xquad.en.json")
    parser.add_argument("--rrf-k", type=float, default=RRF_K)
    parser.add_argument("--weights", type=float, nargs=2, default=(1.0, 1.0), metavar=("DENSE", "BM25"))
    parser.add_argument("--stopwords", action="store_true", help="drop English stop words in BM25")
    parser.add_argument("--articles", type=int, default=None, help="only the first N articles")
    parser.add_argument("--encoder", default=None, help="HF encoder name or folder (default all-MiniLM-L6-v2)")
    args = parser.parse_args(argv)
    result = evaluate_xquad_retrieval(args.path, Encoder(args.encoder) if args.encoder else None,
                                      articles=args.articles, rrf_k=args.rrf_k, weights=tuple(args.weights),
                                      stopwords=args.stopwords)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
