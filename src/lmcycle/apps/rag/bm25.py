"""Okapi BM25 over keyed texts, with add / delete (the index is rebuilt lazily on the next search).

    score(q, d) = sum over distinct query terms t in d of
                  idf(t) * tf(t, d) * (k1 + 1) / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl))
    idf(t)      = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))        (Lucene's form: never negative)

with ``k1 = 1.5``, ``b = 0.75`` by default, ``N`` documents, ``df(t)`` documents containing ``t``, ``|d|`` the
document's token count and ``avgdl`` the mean of those. Tokens: ``TOKEN_PATTERN`` (runs of Unicode letters and
digits, i.e. ``\\w+`` without the underscore) over the lowercased text; optional stop words are dropped from
both documents and queries (they then count towards no length either). No stemming.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

TOKEN_PATTERN = re.compile(r"[^\W_]+")
# A short English function-word list (articles, pronouns, auxiliaries, prepositions, conjunctions, wh-words).
ENGLISH_STOPWORDS = frozenset("""
a an the and or but if then else of at by for with about against between into through during before after above
below to from up down in out on off over under again further once here there when where why how all any both each
few more most other some such no nor not only own same so than too very s t can will just don should now is am are
was were be been being have has had having do does did doing i me my myself we our ours ourselves you your yours
yourself yourselves he him his himself she her hers herself it its itself they them their theirs themselves what
which who whom this that these those as until while would could also
""".split())


def tokenize(text: str, stopwords: frozenset[str] = frozenset()) -> list[str]:
    """Lowercased ``TOKEN_PATTERN`` matches of ``text``, without ``stopwords``."""
    return [t for t in TOKEN_PATTERN.findall(text.lower()) if t not in stopwords]


class BM25:
    """BM25 index of ``key -> text``; :meth:`search` returns ``(key, score)`` best first (ties by key order)."""

    def __init__(self, k1: float = 1.5, b: float = 0.75, stopwords: frozenset[str] = frozenset()):
        self.k1, self.b, self.stopwords = k1, b, frozenset(stopwords)
        self._docs: dict[str, Counter] = {}
        self._built = False

    def __len__(self) -> int:
        return len(self._docs)

    @property
    def keys(self) -> list[str]:
        """Indexed keys, in the order of :meth:`scores`."""
        self._build()
        return self._keys

    def add(self, keys: Sequence[str], texts: Sequence[str]) -> None:
        """Index these texts (a key already present is replaced)."""
        for key, text in zip(keys, texts, strict=True):
            self._docs[key] = Counter(tokenize(text, self.stopwords))
        self._built = False

    def delete(self, keys: Iterable[str]) -> None:
        for key in keys:
            self._docs.pop(key, None)
        self._built = False

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of ``query`` against every document, ``(len(self),)`` float64 in :attr:`keys` order."""
        self._build()
        out = np.zeros(len(self._keys))
        for term in set(tokenize(query, self.stopwords)):
            if term not in self._postings:
                continue
            rows, tf = self._postings[term]
            idf = np.log(1.0 + (len(self._keys) - len(rows) + 0.5) / (len(rows) + 0.5))
            out[rows] += idf * tf * (self.k1 + 1) / (tf + self._norm[rows])
        return out

    def search(self, query: str, k: int = 10) -> list[tuple[str, float]]:
        """The ``k`` best keys with a positive score, best first."""
        scores = self.scores(query)
        order = np.lexsort((np.arange(len(scores)), -scores))[:k]
        return [(self._keys[i], float(scores[i])) for i in order if scores[i] > 0]

    def _build(self) -> None:
        if self._built:
            return
        self._keys = list(self._docs)
        lengths = np.array([sum(c.values()) for c in self._docs.values()], dtype=np.float64)
        avgdl = lengths.mean() if len(lengths) and lengths.mean() > 0 else 1.0
        # The per-document part of the denominator: k1 * (1 - b + b * |d| / avgdl).
        self._norm = self.k1 * (1 - self.b + self.b * lengths / avgdl)
        postings: dict[str, tuple[list[int], list[int]]] = {}
        for row, counts in enumerate(self._docs.values()):
            for term, tf in counts.items():
                rows, tfs = postings.setdefault(term, ([], []))
                rows.append(row)
                tfs.append(tf)
        self._postings = {t: (np.array(r), np.array(f, dtype=np.float64)) for t, (r, f) in postings.items()}
        self._built = True
