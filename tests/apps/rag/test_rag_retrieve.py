import numpy as np
import pytest

from lmcycle.apps.rag.bm25 import BM25
from lmcycle.apps.rag.ingest import Document
from lmcycle.apps.rag.retrieve import Retriever, index_documents, rrf_fuse
from lmcycle.apps.rag.store import SqliteVectorStore
from lmcycle.errors import LmcycleError


def test_rrf_matches_the_formula_and_rewards_agreement():
    fused = dict(rrf_fuse([["a", "b", "c"], ["c", "a", "d"]], rrf_k=60))
    assert fused["a"] == pytest.approx(1 / 61 + 1 / 62)
    assert fused["c"] == pytest.approx(1 / 63 + 1 / 61)
    assert fused["b"] == pytest.approx(1 / 62) and fused["d"] == pytest.approx(1 / 63)
    assert [k for k, _ in rrf_fuse([["a", "b", "c"], ["c", "a", "d"]])] == ["a", "c", "b", "d"]
    # weights scale each ranking's contribution
    assert [k for k, _ in rrf_fuse([["x", "y"], ["y", "x"]], weights=[2.0, 1.0])] == ["x", "y"]
    with pytest.raises(LmcycleError, match="weights"):
        rrf_fuse([["x"]], weights=[1.0, 2.0])


class BagOfLetters:
    """A stand-in encoder (fast, deterministic): normalised letter counts."""

    name, tokenizer = "letters", None

    def encode(self, texts, progress=None):
        out = np.zeros((len(texts), 26), dtype=np.float32)
        for i, t in enumerate(texts):
            for ch in t.lower():
                if "a" <= ch <= "z":
                    out[i, ord(ch) - 97] += 1
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)

    encode_queries = encode_passages = encode


def test_index_retrieve_and_reingest_a_changed_document(tmp_path, minilm_tokenizer):
    store, enc = SqliteVectorStore(tmp_path), BagOfLetters()
    retriever = Retriever(store, enc)
    docs = [Document("a.md", "Zebras zigzag in the zoo.\n\nQuiet quails queue quickly."),
            Document("b.md", "Xylophones and saxophones.")]
    # 12 tokens: room for either paragraph of a.md (10 and 7 tokens), not both.
    n = index_documents(docs, store, enc, retriever.bm25, minilm_tokenizer, 12, 0)
    assert n == len(store) == 3
    for mode in ("dense", "bm25", "hybrid"):
        hits = retriever.retrieve("zebras zoo", k=2, mode=mode)
        assert hits[0].metadata["text"] == "Zebras zigzag in the zoo."
        assert hits[0].key == f"a.md#{hits[0].metadata['start']}-{hits[0].metadata['end']}"
    # The file changes: its old chunks disappear from both indexes.
    index_documents([Document("a.md", "Only owls now.")], store, enc, retriever.bm25, minilm_tokenizer, 12, 0)
    assert sorted(store.keys()) == ["a.md#0-14", "b.md#0-26"]
    assert retriever.retrieve("quails", 3, "bm25") == []
    # A reopened store rebuilds the same BM25 index from its texts.
    again = Retriever(SqliteVectorStore(tmp_path), enc)
    assert again.retrieve("owls", 1, "bm25")[0].key == "a.md#0-14"
    with pytest.raises(LmcycleError, match="unknown retrieval mode"):
        again.retrieve("owls", 1, "fuzzy")


def test_hybrid_finds_what_either_ranking_ranks_first():
    store = SqliteVectorStore(None)
    texts = {"lexical": "rare token qwerty here", "semantic": "aaaa bbbb", "noise": "zzzz yyyy"}
    enc = BagOfLetters()
    store.upsert(list(texts), enc.encode(list(texts.values())), [{"text": t} for t in texts.values()])
    retriever = Retriever(store, enc, BM25())
    query = "qwerty abab"
    assert retriever.dense(query, 1)[0].key != "lexical" or retriever.sparse(query, 1)[0].key == "lexical"
    top2 = {h.key for h in retriever.hybrid(query, 2)}
    assert {retriever.dense(query, 1)[0].key, retriever.sparse(query, 1)[0].key} <= top2
