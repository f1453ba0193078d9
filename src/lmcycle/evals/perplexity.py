"""Perplexity: exp of the token-weighted mean negative log-likelihood over every predicted token.

Three entry points share one computation:

- :func:`perplexity` — causal LM on plain texts: every token after the first is predicted from the ones before.
- :func:`conditional_perplexity` — causal LM on ``prompt + target`` with the prompt masked: only the target's
  tokens count (the perplexity of a reference given the prompt).
- :func:`seq2seq_perplexity` — encoder-decoder on ``(input, target)`` pairs: the target's tokens as the
  tokenizer encodes them (T5 appends ``</s>``), predicted by the decoder (teacher forcing).

The aggregate is token-weighted (total NLL / total tokens), not a mean of per-text perplexities, so long texts
count for what they contain. NLL is in nats, computed from float32 log-softmax of the logits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from lmcycle import __version__
from lmcycle.data.batching import pad_id_of, pad_rows
from lmcycle.errors import LmcycleError
from lmcycle.evals.score import Score, Signature

_CONTEXT_ATTRS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length")


def default_max_len(model) -> int | None:
    """The longest sequence the model's positions allow (from its config), or None when unbounded/unknown."""
    config = getattr(model, "config", None)
    for attr in _CONTEXT_ATTRS:
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def perplexity(model, tokenizer, texts: Sequence[str], *, batch_size: int = 8, max_len: int | None = None) -> Score:
    """Perplexity of a causal LM on ``texts``.

    Each text is encoded as the tokenizer does by default (with BOS if the tokenizer adds one) and cut to
    ``max_len`` tokens (default: the model's context window); tokens 2..L are predicted. ``per_example[i]`` has
    ``nll`` (mean, nats), ``perplexity`` and ``n_tokens`` of text ``i`` (None values when it has < 2 tokens).
    """
    limit = max_len or default_max_len(model)
    sequences, truncated = [], 0
    for text in texts:
        ids = list(tokenizer(text)["input_ids"])
        if limit is not None and len(ids) > limit:
            ids, truncated = ids[:limit], truncated + 1
        sequences.append((ids, 1))
    sums = _causal_nll(model, sequences, pad_id_of(tokenizer), batch_size)
    return _score(sums, {"kind": "causal LM on texts", "max_len": limit, "truncated": truncated},
                  {"kind": "causal", "tokens": "after-first", "window": limit, "trunc": "end"})


def conditional_perplexity(model, tokenizer, prompts: Sequence[str], targets: Sequence[str], *,
                           batch_size: int = 8, max_len: int | None = None) -> Score:
    """Perplexity of a causal LM on ``targets[i]`` given ``prompts[i]`` (prompt tokens masked out of the loss).

    The prompt is encoded with the tokenizer's special tokens, the target without, and the two id lists are
    concatenated (so the prompt is tokenized exactly as it is for generation). No EOS is appended to the target.
    When ``prompt + target`` exceeds ``max_len`` the prompt loses tokens from its start; a target longer than
    ``max_len - 1`` is cut at its end.
    """
    if len(prompts) != len(targets):
        raise LmcycleError(f"{len(prompts)} prompts but {len(targets)} targets")
    limit = max_len or default_max_len(model)
    sequences, truncated = [], 0
    for prompt, target in zip(prompts, targets, strict=True):
        p_ids = list(tokenizer(prompt)["input_ids"])
        t_ids = list(tokenizer(target, add_special_tokens=False)["input_ids"])
        if limit is not None and len(p_ids) + len(t_ids) > limit:
            truncated += 1
            t_ids = t_ids[: limit - 1]
            p_ids = p_ids[len(p_ids) - (limit - len(t_ids)):]
        sequences.append((p_ids + t_ids, max(len(p_ids), 1)))
    sums = _causal_nll(model, sequences, pad_id_of(tokenizer), batch_size)
    return _score(sums, {"kind": "causal LM, target given prompt (prompt masked)", "max_len": limit,
                         "truncated": truncated},
                  {"kind": "causal", "tokens": "target", "window": limit, "trunc": "prompt-start"})


def seq2seq_perplexity(model, tokenizer, inputs: Sequence[str], targets: Sequence[str], *,
                       batch_size: int = 8, max_len: int | None = None) -> Score:
    """Perplexity of an encoder-decoder model on ``targets[i]`` given ``inputs[i]``.

    Inputs are cut to ``max_len`` tokens (default: the model's position limit, if any), targets likewise.
    The decoder is fed the labels shifted right by the model itself (``labels=``), as in training.
    """
    if len(inputs) != len(targets):
        raise LmcycleError(f"{len(inputs)} inputs but {len(targets)} targets")
    limit = max_len or default_max_len(model)
    pad = pad_id_of(tokenizer)
    device = next(model.parameters()).device
    pairs, truncated = [], 0
    for source, target in zip(inputs, targets, strict=True):
        s_ids, t_ids = list(tokenizer(source)["input_ids"]), list(tokenizer(target)["input_ids"])
        if limit is not None and (len(s_ids) > limit or len(t_ids) > limit):
            s_ids, t_ids, truncated = s_ids[:limit], t_ids[:limit], truncated + 1
        pairs.append((s_ids, t_ids))
    sums: list[tuple[float, int]] = []
    model.eval()
    with torch.inference_mode():
        for start in tqdm(range(0, len(pairs), batch_size), desc="perplexity", leave=False):
            chunk = pairs[start:start + batch_size]
            input_ids, attention = pad_rows([s for s, _ in chunk], pad)
            labels, label_mask = pad_rows([t for _, t in chunk], pad)
            labels = labels.masked_fill(label_mask == 0, -100)
            out = model(input_ids=input_ids.to(device), attention_mask=attention.to(device), labels=labels.to(device))
            sums += _gather_nll(out.logits, labels.to(device))
    return _score(sums, {"kind": "seq2seq, target given input (teacher forcing)", "max_len": limit,
                         "truncated": truncated},
                  {"kind": "seq2seq", "tokens": "target", "window": limit, "trunc": "end"})


def _causal_nll(model, sequences: list[tuple[list[int], int]], pad: int, batch_size: int) -> list[tuple[float, int]]:
    """Per sequence (ids, first predicted position): (sum of NLL over predicted tokens, their number)."""
    device = next(model.parameters()).device
    sums: list[tuple[float, int]] = []
    model.eval()
    with torch.inference_mode():
        for start in tqdm(range(0, len(sequences), batch_size), desc="perplexity", leave=False):
            chunk = sequences[start:start + batch_size]
            input_ids, attention = pad_rows([ids for ids, _ in chunk], pad)
            # labels[b, t] = token t+1 when it is predicted (past the prompt, not padding), else -100.
            labels = torch.full_like(input_ids, -100)
            for b, (ids, first) in enumerate(chunk):
                if len(ids) > first:
                    labels[b, first - 1:len(ids) - 1] = torch.tensor(ids[first:])
            logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
            sums += _gather_nll(logits, labels.to(device))
    return sums


def _gather_nll(logits: torch.Tensor, labels: torch.Tensor) -> list[tuple[float, int]]:
    """logits [B, T, V], labels [B, T] (-100 = ignored) -> per row (sum of -log p(label), number of labels)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    keep = labels != -100
    picked = logprobs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    nll = -(picked * keep).sum(dim=-1)
    return [(float(s), int(n)) for s, n in zip(nll.tolist(), keep.sum(dim=-1).tolist(), strict=True)]



def _score(sums: list[tuple[float, int]], settings: dict, keys: dict) -> Score:
    """The Score of per-sequence NLL sums; ``keys`` are the signature's short keys for how they were taken."""
    total_nll = sum(s for s, _ in sums)
    total_tokens = sum(n for _, n in sums)
    if total_tokens == 0:
        raise LmcycleError("perplexity: no token to predict (every text is shorter than two tokens)")
    mean = total_nll / total_tokens
    per_example = [{"nll": s / n, "perplexity": math.exp(s / n), "n_tokens": n} if n else
                   {"nll": None, "perplexity": None, "n_tokens": 0} for s, n in sums]
    settings = {**settings, "aggregation": "exp(total NLL / total predicted tokens), NLL in nats",
                "n": len(sums)}
    return Score(values={"perplexity": math.exp(mean), "nll": mean, "n_tokens": total_tokens},
                 settings=settings, per_example=per_example,
                 signature=Signature.of("perplexity", __version__, **keys, agg="tokens"))
