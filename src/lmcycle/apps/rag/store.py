"""An embedded, persistent vector store: SQLite is the source of truth, search is exact in memory.

Why this design (measured, see BENCHMARKS.md "RAG vector store"): SQLite (stdlib) gives keys, metadata,
transactions and crash safety for free; an exact inner-product scan over a float32 numpy matrix answers a query
over 50k x 384 vectors in ~4 ms on one thread (as fast as FAISS ``IndexFlatIP``) with recall 1.0 and no index to
tune, and costs no dependency. ANN libraries (usearch, FAISS HNSW, LanceDB) add 60-200 MB of install and, on
these vectors with default settings, lost recall (0.58-0.77 @10) for a sub-millisecond query this size does not
need. Memory is ``4 * n * dim`` bytes (1M x 384 = 1.5 GB); far above ~100k-1M vectors, an HNSW index (usearch)
can be built from the same rows behind the same :class:`VectorStore` protocol, which a server store (Qdrant,
pgvector) implements too.

Layout: ``<dir>/store.sqlite`` with one table ``chunks(key PRIMARY KEY, source, start, end, text, meta JSON,
vec BLOB float32)`` and ``info(name, value)`` holding the dimension. Every change is one SQLite transaction
(rollback journal, ``synchronous=FULL``): after a crash or an exception mid-change the store reopens as it was
before that change. The in-memory matrix is updated only after the commit succeeds.

Scores are inner products (cosine for normalised vectors, which :class:`~lmcycle.apps.rag.encoder.Encoder` gives).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np

from lmcycle.errors import LmcycleError

FILE_NAME = "store.sqlite"
META_COLUMNS = ("source", "start", "end", "text")


class Hit(NamedTuple):
    """One search result: the chunk's key, its score (higher is better) and its metadata."""

    key: str
    score: float
    metadata: dict[str, Any]


@runtime_checkable
class VectorStore(Protocol):
    """What retrieval needs from a vector store (embedded or server-backed)."""

    def upsert(self, keys: Sequence[str], vectors: np.ndarray, metadatas: Sequence[dict]) -> None: ...
    def delete(self, keys: Iterable[str]) -> None: ...
    def replace_source(self, source: str, keys: Sequence[str], vectors: np.ndarray,
                       metadatas: Sequence[dict]) -> None: ...
    def search(self, query: np.ndarray, k: int = 10) -> list[Hit]: ...
    def get(self, key: str) -> dict[str, Any]: ...
    def keys(self) -> list[str]: ...
    def keys_of_source(self, source: str) -> list[str]: ...
    def __len__(self) -> int: ...


class SqliteVectorStore:
    """Vectors with keys and metadata in ``<directory>/store.sqlite``; ``directory=None`` keeps it in memory.

    Metadata is a dict; ``source`` (str), ``start``/``end`` (int character offsets) and ``text`` have their own
    columns, any other JSON-serialisable keys are kept too. ``dim`` is fixed by the first vectors added (or given).
    """

    def __init__(self, directory: str | Path | None = None, dim: int | None = None):
        self.path = None if directory is None else Path(directory) / FILE_NAME
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(":memory:" if self.path is None else self.path, isolation_level=None)
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("CREATE TABLE IF NOT EXISTS info (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
            self._db.execute("CREATE TABLE IF NOT EXISTS chunks (key TEXT PRIMARY KEY, source TEXT, start INTEGER,"
                             " end INTEGER, text TEXT, meta TEXT NOT NULL, vec BLOB NOT NULL)")
            self._db.execute("CREATE INDEX IF NOT EXISTS chunks_source ON chunks(source)")
            row = self._db.execute("SELECT value FROM info WHERE name = 'dim'").fetchone()
        except sqlite3.DatabaseError as e:
            raise LmcycleError(f"not a vector store: {e}", file=self.path) from e
        stored = None if row is None else int(row[0])
        if stored is not None and dim is not None and stored != dim:
            raise LmcycleError(f"store has dimension {stored}, asked for {dim}", file=self.path, field="dim")
        self.dim = stored or dim
        self._load()

    # -- reading ---------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: str) -> bool:
        return key in self._row

    def keys(self) -> list[str]:
        """Keys in matrix order (insertion order, deletions compacted)."""
        return list(self._keys)

    def keys_of_source(self, source: str) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT key FROM chunks WHERE source = ? ORDER BY rowid", (source,))]

    def get(self, key: str) -> dict[str, Any]:
        """The chunk's metadata (a copy), from memory: it mirrors what the last commit wrote."""
        return dict(self._meta[self._row[key]])

    def items(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """(key, metadata) of every chunk, in matrix order."""
        rows = self._db.execute("SELECT key, source, start, end, text, meta FROM chunks")
        by_key = {r[0]: _metadata(r[1:]) for r in rows}
        return ((k, by_key[k]) for k in self._keys)

    def vectors(self) -> np.ndarray:
        """All vectors, ``(len(self), dim)`` float32, in :meth:`keys` order (a copy)."""
        return self._vecs[:len(self._keys)].copy()

    def search(self, query: np.ndarray, k: int = 10) -> list[Hit]:
        """The ``k`` best chunks for ``query`` (``(dim,)``) by exact inner product, best first; ties by key order."""
        return self.search_many(np.asarray(query, dtype=np.float32)[None, :], k)[0]

    def search_many(self, queries: np.ndarray, k: int = 10) -> list[list[Hit]]:
        """:meth:`search` for each row of ``queries`` ``(q, dim)``."""
        queries = np.asarray(queries, dtype=np.float32)
        n = len(self._keys)
        if n == 0 or k <= 0:
            return [[] for _ in queries]
        self._check_dim(queries.shape[-1])
        scores = queries @ self._vecs[:n].T  # (q, n)
        k = min(k, n)
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < n else np.tile(np.arange(n), (len(queries), 1))
        hits = []
        for q, cand in enumerate(top):
            cand = cand[np.lexsort((cand, -scores[q, cand]))]
            hits.append([Hit(self._keys[i], float(scores[q, i]), self._meta[i]) for i in cand])
        return hits

    # -- writing ---------------------------------------------------------------------------------------------
    def upsert(self, keys: Sequence[str], vectors: np.ndarray, metadatas: Sequence[dict]) -> None:
        """Add the chunks, replacing any with the same key; one transaction."""
        self.replace_source(None, keys, vectors, metadatas)

    def delete(self, keys: Iterable[str]) -> None:
        """Remove these keys (unknown keys are ignored); one transaction."""
        keys = list(keys)
        with self._transaction():
            self._db.executemany("DELETE FROM chunks WHERE key = ?", ((k,) for k in keys))
        self._forget(keys)

    def replace_source(self, source: str | None, keys: Sequence[str], vectors: np.ndarray,
                       metadatas: Sequence[dict]) -> None:
        """Delete every chunk of ``source`` and upsert the given ones, as ONE transaction (re-ingesting a changed
        file: readers never see it half-replaced). ``source=None`` deletes nothing (a plain upsert)."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if len(keys) != len(vectors) or len(keys) != len(metadatas) or vectors.ndim != 2:
            raise LmcycleError(f"upsert needs as many keys ({len(keys)}), vectors ({vectors.shape}) and metadata "
                               f"({len(metadatas)}) rows", field="vectors")
        if len(set(keys)) != len(keys):
            raise LmcycleError("upsert got the same key twice", field="keys")
        if len(keys):
            self._check_dim(vectors.shape[1])
        rows = [(k, *_columns(m), v.tobytes()) for k, v, m in zip(keys, vectors, metadatas, strict=True)]
        with self._transaction():
            old = self.keys_of_source(source) if source is not None else []
            if old:
                self._db.execute("DELETE FROM chunks WHERE source = ?", (source,))
            if self.dim is not None:
                self._db.execute("INSERT OR IGNORE INTO info VALUES ('dim', ?)", (str(self.dim),))
            self._db.executemany("INSERT OR REPLACE INTO chunks VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
        self._forget(set(old) - set(keys))
        self._remember(keys, vectors, [_metadata(r[1:6]) for r in rows])

    def close(self) -> None:
        self._db.close()

    # -- internals -------------------------------------------------------------------------------------------
    def _transaction(self):
        return _Transaction(self._db)

    def _check_dim(self, dim: int) -> None:
        if self.dim is None:
            self.dim = int(dim)
        elif dim != self.dim:
            raise LmcycleError(f"vectors have dimension {dim}, the store has {self.dim}", file=self.path,
                               field="vectors")

    def _load(self) -> None:
        rows = self._db.execute("SELECT key, source, start, end, text, meta, vec FROM chunks ORDER BY rowid").fetchall()
        self._keys = [r[0] for r in rows]
        self._meta = [_metadata(r[1:6]) for r in rows]
        self._row = {k: i for i, k in enumerate(self._keys)}
        dim = self.dim or 0
        self._vecs = np.zeros((max(len(rows), 16), dim), dtype=np.float32)
        for i, r in enumerate(rows):
            self._vecs[i] = np.frombuffer(r[6], dtype=np.float32)

    def _remember(self, keys: Sequence[str], vectors: np.ndarray, metas: list[dict]) -> None:
        if self._vecs.shape[1] != self.dim:
            self._vecs = np.zeros((16, self.dim), dtype=np.float32)
        for key, vec, meta in zip(keys, vectors, metas, strict=True):
            i = self._row.get(key)
            if i is None:
                i = len(self._keys)
                if i == len(self._vecs):  # grow by doubling: amortised O(1) appends
                    self._vecs = np.concatenate([self._vecs, np.zeros_like(self._vecs)])
                self._keys.append(key)
                self._meta.append(meta)
                self._row[key] = i
            else:
                self._meta[i] = meta
            self._vecs[i] = vec

    def _forget(self, keys: Iterable[str]) -> None:
        drop = {self._row[k] for k in keys if k in self._row}
        if not drop:
            return
        keep = [i for i in range(len(self._keys)) if i not in drop]
        self._vecs = np.concatenate([self._vecs[keep], np.zeros((max(16, len(keep)), self._vecs.shape[1]),
                                                                 dtype=np.float32)])
        self._keys = [self._keys[i] for i in keep]
        self._meta = [self._meta[i] for i in keep]
        self._row = {k: i for i, k in enumerate(self._keys)}


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``; ``ROLLBACK`` on any exception (the store is then unchanged)."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb):
        self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")
        return False


def _columns(meta: dict) -> tuple:
    extra = {k: v for k, v in meta.items() if k not in META_COLUMNS}
    start, end = meta.get("start"), meta.get("end")
    return (meta.get("source"), None if start is None else int(start), None if end is None else int(end),
            meta.get("text"), json.dumps(extra, sort_keys=True, ensure_ascii=False))


def _metadata(row: Sequence) -> dict[str, Any]:
    source, start, end, text, extra = row
    meta = {name: value for name, value in zip(META_COLUMNS, (source, start, end, text), strict=True)
            if value is not None}
    meta.update(json.loads(extra))
    return meta
