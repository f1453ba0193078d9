import math

import pytest

from lmcycle.apps.rag.bm25 import BM25, ENGLISH_STOPWORDS, tokenize

DOCS = {
    "d1": "The cat sat on the mat.",
    "d2": "A dog chased the cat, and the cat ran.",
    "d3": "Dogs are loyal; a dog is a friend.",
}


def expected_score(query_terms, doc_terms, all_docs, k1=1.5, b=0.75):
    """Okapi BM25 written out from the formula, on hand-tokenized documents."""
    n = len(all_docs)
    avgdl = sum(len(d) for d in all_docs) / n
    total = 0.0
    for term in set(query_terms):
        df = sum(term in d for d in all_docs)
        tf = doc_terms.count(term)
        if tf == 0:
            continue
        idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
        total += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(doc_terms) / avgdl))
    return total


def test_scores_match_the_formula_on_a_hand_tokenized_example():
    hand = {  # lowercase words, punctuation dropped
        "d1": ["the", "cat", "sat", "on", "the", "mat"],
        "d2": ["a", "dog", "chased", "the", "cat", "and", "the", "cat", "ran"],
        "d3": ["dogs", "are", "loyal", "a", "dog", "is", "a", "friend"],
    }
    assert {k: tokenize(v) for k, v in DOCS.items()} == hand
    index = BM25()
    index.add(list(DOCS), list(DOCS.values()))
    for query in (["cat"], ["dog", "cat"], ["the", "mat"], ["friend", "friend"]):
        got = dict(zip(index.keys, index.scores(" ".join(query)), strict=True))
        for key, terms in hand.items():
            assert got[key] == pytest.approx(expected_score(query, terms, list(hand.values())), rel=1e-12)
    # d2 has "cat" twice but is longer; with these numbers it still wins on "cat".
    assert [k for k, _ in index.search("cat", 3)] == ["d2", "d1"]  # d3 has no "cat": not returned


def test_add_replace_delete_change_the_statistics():
    index = BM25()
    index.add(list(DOCS), list(DOCS.values()))
    index.delete(["d3"])
    assert index.search("loyal", 5) == []
    index.add(["d1"], ["loyal friend"])  # replaces d1
    assert [k for k, _ in index.search("loyal", 5)] == ["d1"]
    assert index.search("mat", 5) == []
    other = BM25()
    other.add(["d1", "d2"], ["loyal friend", DOCS["d2"]])
    assert index.scores("cat loyal").tolist() == pytest.approx(other.scores("cat loyal").tolist())


def test_stopwords_and_parameters():
    assert tokenize("The dog_house AND the Cat's café", ENGLISH_STOPWORDS) == ["dog", "house", "cat", "café"]
    flat = BM25(b=0.0)
    flat.add(["short", "long"], ["apple", "apple pear plum fig kiwi lime"])
    scores = flat.scores("apple")
    assert scores[0] == pytest.approx(scores[1])  # b = 0: no length normalisation
