"""Token-aware chunking with overlap, cutting at paragraph or sentence boundaries when it can.

A chunk is a character span ``[start, end)`` of the source text (``chunk.text == text[start:end]``) whose
tokens -- counted with the encoder's own tokenizer, special tokens excluded -- number at most ``max_tokens``;
consecutive chunks share about ``overlap_tokens`` tokens. To fit a model's context window of ``n`` positions,
pass ``max_tokens=chunk_budget(tokenizer, n)`` (the window less the special tokens the tokenizer adds).

Where to cut: a window holds the next ``max_tokens`` tokens; the cut goes at the last paragraph break (a blank
line) that leaves the chunk at least half the window, else the last sentence end (``.``, ``!`` or ``?`` then whitespace), else the
last line break, else after the window's last token. Keys are ``f"{source}#{start}-{end}"``: deterministic, and
all keys of a source share the prefix, so re-ingesting a changed file deletes its old keys and adds the new ones
(:func:`lmcycle.apps.rag.retrieve.index_documents`).
"""

from __future__ import annotations

from dataclasses import dataclass

from lmcycle.errors import LmcycleError

SENTENCE_ENDS = ".!?"
# Cut quality of the gap before a token: higher is a better place to end a chunk.
PARAGRAPH, SENTENCE, LINE, TOKEN = 3, 2, 1, 0


@dataclass(frozen=True)
class Chunk:
    """A span ``[start, end)`` of ``source``'s text; ``key`` identifies it (``source#start-end``)."""

    key: str
    source: str
    start: int
    end: int
    text: str


def chunk_key(source: str, start: int, end: int) -> str:
    return f"{source}#{start}-{end}"


def chunk_budget(tokenizer, context_tokens: int) -> int:
    """Content tokens that fit in a window of ``context_tokens`` once the tokenizer's special tokens are added."""
    return context_tokens - tokenizer.num_special_tokens_to_add(pair=False)


def chunk_text(text: str, tokenizer, max_tokens: int, overlap_tokens: int = 0, source: str = "") -> list[Chunk]:
    """Cut ``text`` into chunks of at most ``max_tokens`` tokens that overlap by about ``overlap_tokens``.

    ``tokenizer`` is a fast Hugging Face tokenizer (offsets are needed). Chunks are in text order; a text with no
    tokens gives no chunks. Every chunk's text, tokenized again, has at most ``max_tokens`` tokens.
    """
    if max_tokens < 1:
        raise LmcycleError(f"max_tokens must be at least 1, got {max_tokens}", field="max_tokens")
    if not 0 <= overlap_tokens < max_tokens:
        raise LmcycleError(f"overlap_tokens must be in [0, max_tokens), got {overlap_tokens}",
                           field="overlap_tokens")
    if not getattr(tokenizer, "is_fast", False):
        raise LmcycleError("chunking needs a fast (Rust) tokenizer for character offsets", field="tokenizer")
    offsets = _token_offsets(text, tokenizer)
    chunks: list[Chunk] = []
    first = 0
    while first < len(offsets):
        stop = _cut(text, offsets, first, min(first + max_tokens, len(offsets)))
        stop = _shrink_to_fit(text, tokenizer, offsets, first, stop, max_tokens)
        start, end = offsets[first][0], offsets[stop - 1][1]
        chunks.append(Chunk(chunk_key(source, start, end), source, start, end, text[start:end]))
        if stop == len(offsets):
            break
        first = max(stop - overlap_tokens, first + 1)
    return chunks


def _token_offsets(text: str, tokenizer) -> list[tuple[int, int]]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    # Tokens that cover no characters (some tokenizers emit them) cannot start or end a span.
    return [(s, e) for s, e in enc["offset_mapping"] if e > s]


def _cut(text: str, offsets: list[tuple[int, int]], first: int, limit: int) -> int:
    """Token index to stop before: the best boundary in the second half of ``offsets[first:limit]``."""
    if limit == len(offsets):
        return limit
    best, best_quality = limit, TOKEN
    for k in range(limit, first + max(1, (limit - first) // 2) - 1, -1):
        quality = _gap_quality(text, offsets[k - 1][1], offsets[k][0])
        if quality > best_quality:
            best, best_quality = k, quality
            if quality == PARAGRAPH:
                break
    return best


def _gap_quality(text: str, prev_end: int, next_start: int) -> int:
    gap = text[prev_end:next_start]
    # Tokenizers that fold the leading space into the token (SentencePiece) leave the gap empty: look past it.
    while next_start < len(text) and text[next_start].isspace():
        gap += text[next_start]
        next_start += 1
    if gap.count("\n") >= 2:
        return PARAGRAPH
    if gap and gap[0].isspace() and prev_end > 0 and text[prev_end - 1] in SENTENCE_ENDS:
        return SENTENCE
    return LINE if "\n" in gap else TOKEN


def _shrink_to_fit(text, tokenizer, offsets, first: int, stop: int, max_tokens: int) -> int:
    # Re-tokenizing a span can merge differently at its edges than inside the whole text; make sure it fits.
    while stop - first > 1:
        span = text[offsets[first][0]:offsets[stop - 1][1]]
        if len(tokenizer(span, add_special_tokens=False)["input_ids"]) <= max_tokens:
            break
        stop -= 1
    return stop
