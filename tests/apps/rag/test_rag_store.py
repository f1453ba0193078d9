import sqlite3
import subprocess
import sys

import numpy as np
import pytest

from lmcycle.apps.rag.store import SqliteVectorStore, VectorStore
from lmcycle.errors import LmcycleError

DIM = 8


def vectors(n, seed=0):
    v = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def metas(keys, source="a.txt"):
    return [{"source": source, "start": i, "end": i + 3, "text": f"text of {k}", "lang": "en"}
            for i, k in enumerate(keys)]


def exact_top(matrix, keys, q, k):
    scores = matrix @ q
    order = sorted(range(len(keys)), key=lambda i: (-scores[i], i))[:k]
    return [keys[i] for i in order]


def test_search_is_exact_and_returns_metadata():
    store = SqliteVectorStore(None)
    assert isinstance(store, VectorStore)
    keys, vecs = [f"k{i}" for i in range(50)], vectors(50)
    store.upsert(keys, vecs, metas(keys))
    for q in vectors(5, seed=1):
        hits = store.search(q, 7)
        assert [h.key for h in hits] == exact_top(vecs, keys, q, 7)
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        assert hits[0].score == pytest.approx(float(vecs[keys.index(hits[0].key)] @ q), abs=1e-6)
    hit = store.search(vecs[3], 1)[0]
    assert hit.key == "k3" and hit.metadata == {"source": "a.txt", "start": 3, "end": 6, "text": "text of k3",
                                                "lang": "en"}
    assert len(store.search(vecs[0], 100)) == 50


def test_upsert_delete_and_replace_source(tmp_path):
    store = SqliteVectorStore(tmp_path)
    keys, vecs = [f"k{i}" for i in range(10)], vectors(10)
    store.upsert(keys, vecs, metas(keys))
    store.upsert(["k2"], -vecs[2:3], [{"source": "a.txt", "text": "new"}])  # update in place
    assert len(store) == 10 and store.get("k2")["text"] == "new"
    assert store.search(-vecs[2], 1)[0].key == "k2"
    store.delete(["k0", "k1", "nope"])
    assert len(store) == 8 and "k0" not in store and set(store.keys()) == set(keys) - {"k0", "k1"}
    assert "k0" not in [h.key for h in store.search(vecs[0], 10)]
    other = vectors(3, seed=2)
    store.upsert(["b0", "b1", "b2"], other, metas(["b0", "b1", "b2"], source="b.txt"))
    store.replace_source("a.txt", ["a-new"], vectors(1, seed=3), [{"source": "a.txt", "text": "edited"}])
    assert sorted(store.keys()) == ["a-new", "b0", "b1", "b2"]
    assert store.keys_of_source("a.txt") == ["a-new"]
    with pytest.raises(KeyError):
        store.get("k5")


def test_reopened_store_gives_identical_results(tmp_path):
    store = SqliteVectorStore(tmp_path)
    keys = [f"k{i}" for i in range(40)]
    store.upsert(keys, vectors(40), metas(keys))
    store.delete(["k7"])
    queries = vectors(4, seed=5)
    before = [store.search(q, 5) for q in queries]
    store.close()
    again = SqliteVectorStore(tmp_path)
    assert [again.search(q, 5) for q in queries] == before
    assert again.keys() == store.keys() and again.dim == DIM


def test_failure_mid_transaction_leaves_the_previous_state(tmp_path, monkeypatch):
    store = SqliteVectorStore(tmp_path)
    keys = [f"k{i}" for i in range(5)]
    store.upsert(keys, vectors(5), metas(keys))
    q = vectors(1, seed=9)[0]
    before = store.search(q, 5)
    # A metadata value that cannot be stored fails in the middle of the replace (after the DELETE ran).
    bad = [{"source": "a.txt", "text": "ok"}, {"source": "a.txt", "text": object()}]
    with pytest.raises(sqlite3.Error):
        store.replace_source("a.txt", ["n0", "n1"], vectors(2, seed=4), bad)
    assert store.search(q, 5) == before and len(store) == 5
    store.close()
    assert SqliteVectorStore(tmp_path).search(q, 5) == before


def test_a_process_killed_mid_write_leaves_the_committed_state(tmp_path):
    """A writer dies (os._exit, no rollback, no close) after deleting and inserting inside a transaction: the
    hot journal it leaves is rolled back when the store is reopened."""
    store = SqliteVectorStore(tmp_path)
    store.upsert(["k0", "k1"], vectors(2), metas(["k0", "k1"]))
    store.close()
    code = (
        "import os, sqlite3, sys\n"
        "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "db.execute('BEGIN IMMEDIATE')\n"
        "db.execute('DELETE FROM chunks')\n"
        "db.executemany('INSERT INTO chunks VALUES (?, NULL, NULL, NULL, NULL, \\'{}\\', ?)',"
        " [(f'x{i}', bytes(32)) for i in range(2000)])\n"
        "os._exit(1)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "store.sqlite")], capture_output=True)
    assert done.returncode == 1, done.stderr
    assert SqliteVectorStore(tmp_path).keys() == ["k0", "k1"]


def test_bad_input_raises_clear_errors(tmp_path):
    store = SqliteVectorStore(tmp_path)
    store.upsert(["k0"], vectors(1), metas(["k0"]))
    with pytest.raises(LmcycleError, match="dimension 4"):
        store.upsert(["k1"], np.zeros((1, 4), np.float32), metas(["k1"]))
    with pytest.raises(LmcycleError, match="same key twice"):
        store.upsert(["x", "x"], vectors(2), metas(["x", "x"]))
    with pytest.raises(LmcycleError, match="as many keys"):
        store.upsert(["y"], vectors(2), metas(["y"]))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "store.sqlite").write_bytes(b"not a database at all" * 100)
    with pytest.raises(LmcycleError, match="not a vector store"):
        SqliteVectorStore(tmp_path / "junk")
    assert SqliteVectorStore(None).search(vectors(1)[0], 3) == []
