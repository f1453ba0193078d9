"""Vector store: ingest throughput, query latency, recall@10 and disk size of lmcycle's ``SqliteVectorStore``
vs a FAISS flat inner-product index (``IndexFlatIP``) on the same embeddings; ``--peers all`` adds the other
embedded candidates that were measured when choosing the design (usearch HNSW, sqlite-vec, LanceDB, FAISS HNSW).

    python benchmarks/rag_store.py                                  # 50,000 random + XQuAD paragraph vectors
    python benchmarks/rag_store.py --n 20000 --peers all            # peers need their packages importable
    PYTHONPATH=src:/tmp/ragc/usearch python benchmarks/rag_store.py --peers usearch

Corpus: ``--n`` random unit vectors (d = 384, seed 0) plus the 240 XQuAD-en paragraphs embedded with
all-MiniLM-L6-v2, each with a ~400-character text as metadata (stores that keep metadata get it). Queries: the
1,190 XQuAD questions (their nearest neighbours are real paragraphs) and 1,000 noisy copies of random corpus
vectors (hard for approximate indexes). Ingest = adding everything in batches of 1,000, committed to disk where
the store persists (chunks/s). Latency = one query at a time, top 10, p50 / p95 over all queries, after 50
warm-up queries. Recall@10 = overlap of each store's top 10 with exact numpy search. Disk = bytes in the store's
folder after ingest (FAISS / usearch: the saved index, vectors only). faiss-cpu is only this benchmark's peer,
not a dependency of lmcycle.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from measure import load_average  # noqa: E402

from lmcycle.apps.rag.store import SqliteVectorStore  # noqa: E402


def threadpool_limits(n: int) -> None:
    """The same thread count for numpy's BLAS (ours) and faiss's OpenMP (the peer): a fair single-query race."""
    try:
        from threadpoolctl import threadpool_limits as limit

        limit(n)
    except ImportError:
        print("threadpoolctl not installed: numpy's BLAS keeps its default threads")
    try:
        import faiss

        faiss.omp_set_num_threads(n)
    except ImportError:
        pass

DIM, K, BATCH, WARMUP, NOISY = 384, 10, 1000, 50, 1000
XQUAD = Path(__file__).resolve().parents[2] / "shared" / "data" / "xquad_en"


def embeddings(n: int, cache: Path) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(corpus (n + 240, 384), corpus texts, queries (2190, 384)); XQuAD embeddings cached in ``cache``."""
    rng = np.random.default_rng(0)
    if not cache.exists():
        from lmcycle.apps.rag.encoder import Encoder
        from lmcycle.apps.rag.xquad_eval import xquad_corpus

        paragraphs, questions = xquad_corpus(XQUAD)
        enc = Encoder()
        np.savez(cache, p=enc.encode_passages(list(paragraphs.values())),
                 q=enc.encode_queries([q for q, _ in questions]), texts=np.array(list(paragraphs.values())))
    data = np.load(cache)
    rand = _unit(rng.standard_normal((n, DIM)).astype(np.float32))
    corpus = np.concatenate([rand, data["p"]])
    filler = "lorem ipsum dolor sit amet " * 15
    texts = [filler[: 380 + i % 40] for i in range(n)] + [str(t) for t in data["texts"]]
    noisy = _unit(rand[rng.integers(0, n, NOISY)] + 0.3 * rng.standard_normal((NOISY, DIM)).astype(np.float32) / DIM**0.5)
    return corpus, texts, np.concatenate([data["q"], noisy])


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class Ours:
    name = "lmcycle SqliteVectorStore (SQLite + numpy exact)"

    def __init__(self, folder: Path):
        self.folder = folder
        self.store = SqliteVectorStore(folder)

    def add(self, lo, keys, vecs, texts):
        self.store.upsert(keys, vecs, [{"source": "bench", "start": 0, "end": len(t), "text": t} for t in texts])

    def search(self, q):
        return [h.key for h in self.store.search(q, K)]

    def finish(self):
        return folder_bytes(self.folder)


class FaissFlat:
    name = "faiss IndexFlatIP (exact)"

    def __init__(self, folder: Path, hnsw: bool = False):
        import faiss

        self.faiss, self.folder = faiss, folder
        if hnsw:
            self.name = "faiss IndexHNSWFlat (M 32, efSearch 64)"
            self.index = faiss.IndexHNSWFlat(DIM, 32, faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efSearch = 64
        else:
            self.index = faiss.IndexFlatIP(DIM)
        self.keys: list[str] = []

    def add(self, lo, keys, vecs, texts):
        self.index.add(vecs)
        self.keys.extend(keys)

    def search(self, q):
        _, idx = self.index.search(q[None, :], K)
        return [self.keys[i] for i in idx[0] if i >= 0]

    def finish(self):
        self.faiss.write_index(self.index, str(self.folder / "index.faiss"))
        return folder_bytes(self.folder)


class USearch:
    name = "usearch HNSW (f32, ip, defaults)"

    def __init__(self, folder: Path):
        from usearch.index import Index

        self.folder, self.index, self.keys = folder, Index(ndim=DIM, metric="ip", dtype="f32"), []

    def add(self, lo, keys, vecs, texts):
        self.index.add(np.arange(lo, lo + len(keys)), vecs)
        self.keys.extend(keys)

    def search(self, q):
        return [self.keys[int(i)] for i in self.index.search(q, K).keys]

    def finish(self):
        self.index.save(str(self.folder / "index.usearch"))
        return folder_bytes(self.folder)


class SqliteVec:
    name = "sqlite-vec vec0 (exact, in SQLite)"

    def __init__(self, folder: Path):
        import sqlite3

        import sqlite_vec

        self.folder = folder
        self.db = sqlite3.connect(folder / "vec.sqlite")
        if not hasattr(self.db, "enable_load_extension"):  # Pythons built without loadable SQLite extensions
            raise ImportError("this Python's sqlite3 cannot load extensions (built without them)")
        self.db.enable_load_extension(True)
        sqlite_vec.load(self.db)
        self.db.execute(f"CREATE VIRTUAL TABLE v USING vec0(embedding float[{DIM}] distance_metric=cosine, "
                        "+key text, +text text)")

    def add(self, lo, keys, vecs, texts):
        with self.db:
            self.db.executemany("INSERT INTO v(rowid, embedding, key, text) VALUES (?, ?, ?, ?)",
                                [(lo + i, v.tobytes(), k, t) for i, (k, v, t) in enumerate(zip(keys, vecs, texts, strict=True))])

    def search(self, q):
        rows = self.db.execute("SELECT key FROM v WHERE embedding MATCH ? AND k = ? ORDER BY distance",
                               (q.tobytes(), K)).fetchall()
        return [r[0] for r in rows]

    def finish(self):
        return folder_bytes(self.folder)


class Lance:
    name = "LanceDB (no ANN index: exact scan)"

    def __init__(self, folder: Path):
        import lancedb

        self.db, self.folder, self.table = lancedb.connect(str(folder)), folder, None

    def add(self, lo, keys, vecs, texts):
        rows = [{"key": k, "vector": v.tolist(), "text": t} for k, v, t in zip(keys, vecs, texts, strict=True)]
        if self.table is None:
            self.table = self.db.create_table("chunks", data=rows)
        else:
            self.table.add(rows)

    def search(self, q):
        res = self.table.search(q).metric("dot").limit(K).select(["key"]).to_list()
        return [r["key"] for r in res]

    def finish(self):
        return folder_bytes(self.folder)


PEERS = {"faiss": FaissFlat, "faiss-hnsw": lambda f: FaissFlat(f, hnsw=True), "usearch": USearch,
         "sqlite-vec": SqliteVec, "lancedb": Lance}


def measure(make, corpus, texts, queries, exact: list[list[int]], keys: list[str]) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="ragbench-"))
    try:
        store = make(folder)
        t0 = time.perf_counter()
        for lo in range(0, len(corpus), BATCH):
            store.add(lo, keys[lo:lo + BATCH], corpus[lo:lo + BATCH], texts[lo:lo + BATCH])
        ingest_s = time.perf_counter() - t0
        disk = store.finish()
        for q in queries[:WARMUP]:
            store.search(q)
        times, recall = [], []
        for q, truth in zip(queries, exact, strict=True):
            t = time.perf_counter()
            got = store.search(q)
            times.append(time.perf_counter() - t)
            recall.append(len(set(got) & {keys[i] for i in truth}) / K)
        n_questions = len(queries) - NOISY
        times.sort()
        return {"name": store.name, "chunks_per_s": len(corpus) / ingest_s,
                "recall_questions": float(np.mean(recall[:n_questions])),
                "recall_noisy": float(np.mean(recall[n_questions:])),
                "p50_ms": 1000 * statistics.median(times), "p95_ms": 1000 * times[int(0.95 * len(times))],
                "recall@10": float(np.mean(recall)), "disk_mb": disk / 1e6}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000, help="random vectors besides the 240 XQuAD paragraphs")
    parser.add_argument("--peers", default="faiss", help="comma list of " + ", ".join(PEERS) + ", or 'all'")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "rag_store_xquad.npz"))
    parser.add_argument("--threads", type=int, default=1, help="threads for numpy's BLAS and faiss (both sides)")
    args = parser.parse_args()
    threadpool_limits(args.threads)
    corpus, texts, queries = embeddings(args.n, Path(args.cache))
    keys = [f"doc{i}" for i in range(len(corpus))]
    scores = queries @ corpus.T
    exact = [list(np.argsort(-s, kind="stable")[:K]) for s in scores]
    print(f"corpus {len(corpus)} x {DIM} float32, {len(queries)} queries, top {K}")
    rows = [measure(Ours, corpus, texts, queries, exact, keys)]
    names = list(PEERS) if args.peers == "all" else args.peers.split(",")
    for name in names:
        try:
            rows.append(measure(PEERS[name], corpus, texts, queries, exact, keys))
        except ImportError as e:
            print(f"skipped {name}: {e}")
    print(f"load average {load_average():.1f} on {os.cpu_count()} cores; faiss / BLAS threads: {args.threads}")
    print("\n| store | ingest chunks/s | query p50 ms | p95 ms | recall@10 all | XQuAD questions | noisy copies "
          "| disk MB |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['chunks_per_s']:,.0f} | {r['p50_ms']:.3f} | {r['p95_ms']:.3f} | "
              f"{r['recall@10']:.4f} | {r['recall_questions']:.4f} | {r['recall_noisy']:.4f} | {r['disk_mb']:.1f} |")
    ours = rows[0]
    for r in rows[1:]:
        print(f"ours / {r['name']}: ingest x{ours['chunks_per_s'] / r['chunks_per_s']:.2f}, "
              f"p50 x{ours['p50_ms'] / r['p50_ms']:.2f} (higher = ours slower), recall {ours['recall@10']:.4f} vs "
              f"{r['recall@10']:.4f}")
    assert ours["recall@10"] > 0.999, "our store is exact: its recall must be 1"


if __name__ == "__main__":
    main()
