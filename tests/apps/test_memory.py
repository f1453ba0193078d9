"""Conversation memory within a token budget: buffer truncation and summary memory."""

from __future__ import annotations

import pytest
from tiny_lm import make_tokenizer

from lmcycle.apps.memory import BufferMemory, Message, SummaryMemory
from lmcycle.errors import LmcycleError


@pytest.fixture(scope="module")
def count():
    tok = make_tokenizer()
    return lambda text: len(tok(text)["input_ids"])


def test_buffer_keeps_the_newest_messages_that_fit(count):
    mem = BufferMemory(max_tokens=40, count_tokens=count)
    for i in range(12):
        mem.add("user" if i % 2 == 0 else "assistant", f"message number {i} about the red dog")
    shown = mem.messages()
    assert shown == mem.history[-len(shown):] and 1 <= len(shown) < 12  # a suffix of the history
    assert count(mem.render()) <= 40
    one_more = [mem.history[-len(shown) - 1], *shown]
    assert sum(count(m.render()) for m in one_more) > 40  # and the longest such suffix


def test_a_message_longer_than_the_budget_keeps_its_end(count):
    mem = BufferMemory(max_tokens=30, count_tokens=count)
    long = "the cat sees the dog " * 20 + "and the final words"
    mem.add("user", long)
    (only,) = mem.messages()
    assert long.endswith(only.content) and "the final words" in only.content
    assert count(only.render()) <= 30 < count(Message("user", long[-len(only.content) - 1:]).render())
    with pytest.raises(LmcycleError, match="max_tokens"):
        BufferMemory(max_tokens=0, count_tokens=count)


def test_summary_memory_folds_dropped_messages_into_a_summary(count, scripted):
    llm = scripted(lambda prompt: f"summary#{prompt.count(chr(10))}")
    mem = SummaryMemory(max_tokens=130, count_tokens=count, llm=llm, summary_tokens=16)
    for i in range(10):
        mem.add("user", f"fact {i}: the blue cat has {i} toys")
    shown = mem.messages()
    assert llm.prompts, "old messages were summarised"
    assert "fact 0: the blue cat has 0 toys" in llm.prompts[0]  # the oldest message went into the summary
    assert shown[0].role == "system" and shown[0].content.endswith(mem.summary)
    assert shown[-1] == Message("user", "fact 9: the blue cat has 9 toys")
    assert sum(count(m.render()) for m in shown) <= 130 and len(shown) >= 3
    assert mem.summarised + len(shown) - 1 == 10  # every message is either summarised or shown
    assert llm.configs[0].max_new_tokens == 16
