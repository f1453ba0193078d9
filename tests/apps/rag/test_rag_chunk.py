import pytest

from lmcycle.apps.rag.chunk import chunk_budget, chunk_key, chunk_text
from lmcycle.errors import LmcycleError

PARAGRAPHS = [
    "The river flows through the old town. Boats carry apples and bread to the market every morning.",
    "In winter the lake freezes over! Children skate on the ice while the adults drink hot tea.",
    "Why do the birds leave? They fly south to warmer hills, where the sun shines for longer days.",
    "The library keeps ten thousand books. Scholars travel from far away to read the rare maps.",
]
TEXT = "\n\n".join(PARAGRAPHS)


def n_tokens(tokenizer, text):
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize(("max_tokens", "overlap"), [(8, 0), (12, 4), (30, 6), (40, 10), (1000, 0)])
def test_chunks_are_exact_spans_that_fit_and_cover_the_text_with_overlap(minilm_tokenizer, max_tokens, overlap):
    chunks = chunk_text(TEXT, minilm_tokenizer, max_tokens, overlap, source="doc.md")
    for c in chunks:
        assert c.text == TEXT[c.start:c.end]
        assert c.key == chunk_key("doc.md", c.start, c.end) == f"doc.md#{c.start}-{c.end}"
        assert 0 < n_tokens(minilm_tokenizer, c.text) <= max_tokens
    assert chunks[0].start == 0 and chunks[-1].end == len(TEXT)
    for a, b in zip(chunks, chunks[1:], strict=False):
        assert a.start < b.start  # progress
        if overlap:  # the next chunk starts inside this one: shared tokens
            assert b.start < a.end and n_tokens(minilm_tokenizer, TEXT[b.start:a.end]) >= 1
        else:  # nothing but whitespace between them: no text is lost
            assert a.end <= b.start and TEXT[a.end:b.start].strip() == ""
    if max_tokens == 1000:
        assert len(chunks) == 1
    assert chunk_text(TEXT, minilm_tokenizer, max_tokens, overlap, "doc.md") == chunks  # deterministic


def test_cuts_prefer_paragraphs_then_sentences(minilm_tokenizer):
    per_paragraph = max(n_tokens(minilm_tokenizer, p) for p in PARAGRAPHS)
    # A window a little larger than one paragraph but smaller than two: every cut lands on a paragraph break.
    chunks = chunk_text(TEXT, minilm_tokenizer, per_paragraph + 5, 0)
    assert [c.text for c in chunks] == PARAGRAPHS
    # Sentences of 4-7 tokens and a 16-token window: a sentence end always lies in the window's second half.
    sentences = ["The cat sat down.", "Rain fell on the hills!", "Why is the sky so blue?", "Ships sail at dawn."]
    assert all(4 <= n_tokens(minilm_tokenizer, s) <= 7 for s in sentences)
    chunks = chunk_text(" ".join(sentences * 3), minilm_tokenizer, 16, 0)
    assert len(chunks) > 2 and all(c.text[-1] in ".!?" for c in chunks)
    assert all(c.text.split()[0] in {s.split()[0] for s in sentences} for c in chunks)


def test_budget_leaves_room_for_special_tokens_and_bad_settings_raise(minilm_tokenizer):
    assert chunk_budget(minilm_tokenizer, 256) == 254  # [CLS] and [SEP]
    for c in chunk_text(TEXT * 5, minilm_tokenizer, chunk_budget(minilm_tokenizer, 64), 8):
        assert len(minilm_tokenizer(c.text)["input_ids"]) <= 64
    assert chunk_text("   \n ", minilm_tokenizer, 10) == []
    with pytest.raises(LmcycleError, match="overlap_tokens"):
        chunk_text(TEXT, minilm_tokenizer, 10, 10)
    with pytest.raises(LmcycleError, match="max_tokens"):
        chunk_text(TEXT, minilm_tokenizer, 0)


def test_works_with_a_byte_level_bpe_tokenizer(tok):
    text = "the cat sees the dog . the sun and the moon .\n\nthe tree sees the river ."
    chunks = chunk_text(text, tok, 6, 2, source="s")
    assert chunks and all(c.text == text[c.start:c.end] for c in chunks)
    assert all(len(tok(c.text, add_special_tokens=False)["input_ids"]) <= 6 for c in chunks)
    assert chunks[-1].end == len(text)
