"""Zero-, one- and few-shot prompts that fit the model's context window, counted in tokens.

Shots are drawn from a pool with a generator seeded by ``(seed, query_index)``, never the query itself (nor a
duplicate of its input). When the prompt is too long, shots are dropped from the end; when even the zero-shot
prompt is too long, the query's input is cut at the end (on a token boundary, keeping only whole characters) and
the prompt is marked truncated.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from typing import Any

from lmcycle.data.examples import Example
from lmcycle.data.templates import PromptTemplate, get_template
from lmcycle.errors import LmcycleError


@dataclass
class FewShotPrompt:
    """A prompt, how many shots it holds, its length in tokens, and whether the query's input was cut."""

    text: str
    shots_used: int
    n_tokens: int
    truncated: bool = False
    shot_ids: list[str] = field(default_factory=list)


def count_tokens(tokenizer: Any, text: str) -> int:
    """Tokens the model sees for ``text`` (special tokens included, as when it is encoded for generation)."""
    return len(tokenizer(text)["input_ids"])


def pick_shots(query: Example, pool: list[Example], shots: int, seed: int, query_index: int = 0) -> list[Example]:
    """``shots`` examples of ``pool`` (fewer if the pool is smaller), never ``query``: not the same object, not the
    same id, and not the same input text (a duplicate of the query would show its answer)."""
    candidates = [ex for ex in pool
                  if ex is not query and not (query.id and ex.id == query.id) and ex.input != query.input]
    rng = random.Random(f"lmcycle-fewshot:{seed}:{query_index}")
    return rng.sample(candidates, min(shots, len(candidates)))


def build_prompt(template: str | PromptTemplate | dict, query: Example, pool: list[Example], shots: int,
                 tokenizer: Any, max_tokens: int, reserve: int, seed: int, query_index: int = 0) -> FewShotPrompt:
    """The prompt for ``query`` with up to ``shots`` examples, at most ``max_tokens - reserve`` tokens long.

    ``reserve`` is what the answer needs (e.g. ``max_new_tokens``). Raises :class:`LmcycleError` when even the
    template with an empty input does not fit.
    """
    template = get_template(template)
    budget = max_tokens - reserve
    if budget <= 0:
        raise LmcycleError(f"max_tokens ({max_tokens}) must be larger than the tokens reserved for the answer "
                           f"({reserve})", field="max_tokens")
    chosen = pick_shots(query, pool, shots, seed, query_index)
    for k in range(len(chosen), -1, -1):
        text = template.render(query, chosen[:k])
        n = count_tokens(tokenizer, text)
        if n <= budget:
            return FewShotPrompt(text, k, n, False, [ex.id for ex in chosen[:k]])
    return _truncated_prompt(template, query, tokenizer, budget)


def build_prompts(template: str | PromptTemplate | dict, queries: list[Example], pool: list[Example], shots: int,
                  tokenizer: Any, max_tokens: int, reserve: int, seed: int) -> list[FewShotPrompt]:
    """:func:`build_prompt` for each query; query ``i`` uses ``query_index=i``."""
    return [build_prompt(template, q, pool, shots, tokenizer, max_tokens, reserve, seed, query_index=i)
            for i, q in enumerate(queries)]


def _truncated_prompt(template: PromptTemplate, query: Example, tokenizer: Any, budget: int) -> FewShotPrompt:
    """The zero-shot prompt with the longest prefix of the query's input (in tokens) that fits ``budget``."""
    ids = tokenizer(query.input, add_special_tokens=False)["input_ids"]

    def attempt(k: int) -> tuple[str, int]:
        text = template.render(replace(query, input=_decode_prefix(tokenizer, ids, k)), [])
        return text, count_tokens(tokenizer, text)

    # Binary search for the longest fitting prefix. Re-tokenising decoded text is not exactly additive, so the
    # result is checked and walked back if needed.
    lo, hi = 0, len(ids)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if attempt(mid)[1] <= budget:
            lo = mid
        else:
            hi = mid - 1
    for k in range(lo, -1, -1):
        text, n = attempt(k)
        if n <= budget:
            return FewShotPrompt(text, 0, n, True, [])
    raise LmcycleError(f"the prompt template alone needs {attempt(0)[1]} tokens, more than the {budget} left "
                       f"after reserving tokens for the answer", field="max_tokens")


def _decode_prefix(tokenizer: Any, ids: list[int], k: int) -> str:
    # A byte-level token boundary can fall inside a multi-byte character; drop the half character.
    return tokenizer.decode(ids[:k], skip_special_tokens=True).rstrip("\ufffd")
