"""answer_question: retrieve, fit the sources into the window (lowest-ranked out first), check the citations."""

from __future__ import annotations

import numpy as np
import pytest
from scripted import ScriptedLLM

from lmcycle.apps.rag.answer import answer_question
from lmcycle.apps.rag.cite import BEGIN_SOURCES
from lmcycle.apps.rag.retrieve import Retriever
from lmcycle.apps.rag.store import SqliteVectorStore
from lmcycle.errors import LmcycleError
from lmcycle.models.generate import DecodingConfig

TEXTS = {"a#0-1": "Mount Etna is a volcano in Sicily.", "b#0-1": "Etna erupted in 2021 with lava fountains.",
         "c#0-1": "Sicily is an island of Italy.", "d#0-1": "Green tea comes from China."}


@pytest.fixture
def retriever():
    store = SqliteVectorStore(None)
    store.upsert(list(TEXTS), np.eye(4, dtype=np.float32), [{"text": t, "source": k[0]} for k, t in TEXTS.items()])
    return Retriever(store, encoder=None)


def test_answer_with_checked_citations(retriever):
    llm = ScriptedLLM(['Etna is in Sicily [1]; "erupted in 2021" [2].'])
    question = "Where is Etna and when did it erupt?"
    result = answer_question(llm, retriever, question, k=3, mode="bm25")
    assert [s.key for s in result.sources] == [h.key for h in retriever.retrieve(question, 3, "bm25")]
    assert [s.number for s in result.sources] == [1, 2, 3]
    assert BEGIN_SOURCES in llm.prompts[0] and result.prompt == llm.prompts[0]
    assert result.citations.cited == [1, 2]
    assert result.citations.ok == ("erupted in 2021" in result.sources[1].text)


def test_sources_that_do_not_fit_are_dropped_lowest_first(retriever):
    big = ScriptedLLM(["x [1]"])
    full = answer_question(big, retriever, "Etna Sicily volcano", k=3, mode="bm25")
    window = big.count_tokens(full.prompt) + 16 - 5  # a little too small for all three sources
    small = ScriptedLLM(["x [1]"], context_window=window)
    fitted = answer_question(small, retriever, "Etna Sicily volcano", k=3, mode="bm25",
                             cfg=DecodingConfig(max_new_tokens=16))
    assert [s.key for s in fitted.sources] == [s.key for s in full.sources][: len(fitted.sources)]
    assert 1 <= len(fitted.sources) < len(full.sources)
    with pytest.raises(LmcycleError, match="not even the best passage fits the model's context window of 60"):
        answer_question(ScriptedLLM(["x"], context_window=60), retriever, "Etna", k=2, mode="bm25")
    empty = Retriever(SqliteVectorStore(None), encoder=None)
    with pytest.raises(LmcycleError, match="no passages"):
        answer_question(big, empty, "Etna", mode="bm25")
