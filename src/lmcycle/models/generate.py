"""Text generation with our own decoding loop: greedy or sampling with temperature, top-k and top-p, stop strings.

One step of decoding turns the model's next-token logits into a token::

    logits (batch, vocab) -> apply_temperature -> top_k_filter -> top_p_filter -> softmax -> sample
                                                                       (greedy: argmax of the raw logits)

The model runs with its key/value cache, so each step feeds only the newest token. Decoder-only prompts are
padded on the left (every row's last prompt token is then the last column and new tokens line up); position ids
are counted over real tokens only, so a padded row sees the same positions as it would alone. Encoder-decoder
models encode the prompt once and decode from the decoder start token.

Reproducibility: prompt number ``i`` samples with its own ``torch.Generator`` seeded from ``(cfg.seed, i)``, so
its output does not depend on which other prompts share its batch or on ``batch_size``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Generator, Iterator
from typing import Literal

import numpy as np
import torch
from pydantic import Field, field_validator
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmcycle.config import Config
from lmcycle.data.batching import pad_id_of, pad_rows
from lmcycle.errors import LmcycleError
from lmcycle.models.kv_cache import cache_kwargs, cache_of
from lmcycle.models.load import context_window, eval_mode, is_seq2seq


class DecodingConfig(Config):
    """How to turn next-token distributions into text."""

    do_sample: bool = False
    temperature: float = Field(default=1.0, gt=0)
    top_k: int = Field(default=0, ge=0)  # 0 = off
    top_p: float = Field(default=1.0, gt=0, le=1)  # 1 = off
    max_new_tokens: int = Field(default=64, ge=1)
    stop: list[str] = []
    seed: int = Field(default=0, ge=0)
    batch_size: int = Field(default=8, ge=1)

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, stop: list[str]) -> list[str]:
        if any(s == "" for s in stop):
            raise ValueError("stop strings must not be empty")
        return stop


def describe(cfg: DecodingConfig) -> str:
    """A short label such as ``greedy`` or ``sample T=0.5 top-k=5``."""
    if not cfg.do_sample:
        return "greedy"
    parts = ["sample", f"T={cfg.temperature:g}"]
    if cfg.top_k:
        parts.append(f"top-k={cfg.top_k}")
    if cfg.top_p < 1:
        parts.append(f"top-p={cfg.top_p:g}")
    return " ".join(parts)


# -- logits transforms (what the decoding explorer shows) -------------------------------------------------
def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide logits ``(..., vocab)`` by ``temperature``: below 1 sharpens the distribution, above 1 flattens it."""
    return logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits of each row ``(..., vocab)``, set the rest to ``-inf``; ``k=0`` = keep all.

    Tokens tied with the k-th largest logit are kept too.
    """
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability mass is at least ``p``.

    ``logits``: ``(..., vocab)``; removed tokens get ``-inf``. The most likely token always survives; ``p=1``
    keeps everything.
    """
    if p >= 1:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens
    remove_sorted = mass_before >= p
    remove_sorted[..., 0] = False
    remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def next_token_probs(logits: torch.Tensor, cfg: DecodingConfig) -> torch.Tensor:
    """The distribution ``(batch, vocab)`` a setting draws the next token from (greedy: all mass on the argmax)."""
    logits = logits.float()
    if not cfg.do_sample:
        return torch.nn.functional.one_hot(logits.argmax(dim=-1), logits.shape[-1]).float()
    logits = apply_temperature(logits, cfg.temperature)
    logits = top_k_filter(logits, cfg.top_k)
    logits = top_p_filter(logits, cfg.top_p)
    return logits.softmax(dim=-1)


def choose_next_tokens(logits: torch.Tensor, cfg: DecodingConfig, generators: list[torch.Generator]) -> torch.Tensor:
    """Pick one token per row of ``logits`` ``(batch, vocab)`` -> ``(batch,)``; row i draws from ``generators[i]``."""
    if not cfg.do_sample:
        return logits.argmax(dim=-1)
    probs = next_token_probs(logits, cfg).cpu()
    picks = [torch.multinomial(probs[i], 1, generator=generators[i]) for i in range(probs.shape[0])]
    return torch.cat(picks).to(logits.device)


def prompt_generator(seed: int, index: int) -> torch.Generator:
    """The random stream of prompt number ``index``: depends on nothing but ``(seed, index)``."""
    state = np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint32)[0]
    return torch.Generator().manual_seed(int(state))


# -- model steps --------------------------------------------------------------------------------------------
LogitStream = Generator[torch.Tensor, torch.Tensor, None]


def _decoder_only_stream(model: PreTrainedModel, rows: list[list[int]], pad_id: int) -> LogitStream:
    """Yield next-token logits ``(batch, vocab)``; ``send`` it the chosen tokens ``(batch,)`` to get the next ones."""
    input_ids, mask = (t.to(model.device) for t in pad_rows(rows, pad_id, left=True))
    positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)
    # Only the last position's logits are needed; (batch, prompt, vocab) logits can take gigabytes.
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, **last_only)
    position = positions[:, -1:]
    while True:
        tokens = yield out.logits[:, -1, :].float()
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=-1)
        position = position + 1
        out = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=position,
                    **cache_kwargs(cache_of(out)), use_cache=True)


def _seq2seq_stream(model: PreTrainedModel, rows: list[list[int]], pad_id: int) -> LogitStream:
    """Like :func:`_decoder_only_stream` for encoder-decoder models: encode once, then step the decoder."""
    input_ids, mask = (t.to(model.device) for t in pad_rows(rows, pad_id))
    encoded = model.get_encoder()(input_ids=input_ids, attention_mask=mask)
    start = decoder_start_id(model, pad_id)
    tokens = torch.full((len(rows), 1), start, device=model.device)
    out = model(encoder_outputs=encoded, attention_mask=mask, decoder_input_ids=tokens, use_cache=True)
    while True:
        tokens = yield out.logits[:, -1, :].float()
        out = model(encoder_outputs=encoded, attention_mask=mask, decoder_input_ids=tokens[:, None],
                    **cache_kwargs(cache_of(out)), use_cache=True)


def logit_stream(model: PreTrainedModel, rows: list[list[int]], pad_id: int) -> LogitStream:
    """Next-token logits ``(batch, vocab)`` of a batch of prompts; ``send`` the chosen tokens ``(batch,)`` to step."""
    return (_seq2seq_stream if is_seq2seq(model) else _decoder_only_stream)(model, rows, pad_id)


def decoder_start_id(model: PreTrainedModel, pad_id: int) -> int:
    """The token an encoder-decoder's decoder starts from (its config's, else ``pad_id`` as T5 uses)."""
    for source in (model.generation_config, model.config):
        value = getattr(source, "decoder_start_token_id", None)
        if value is not None:
            return int(value)
    return pad_id


def eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Every id that ends generation: the tokenizer's EOS and those of the model's configs."""
    ids = {tokenizer.eos_token_id}
    for value in (model.generation_config.eos_token_id, model.config.eos_token_id):
        ids.update(value if isinstance(value, list) else [value])
    return {int(i) for i in ids if i is not None}


# -- the loop -----------------------------------------------------------------------------------------------
def encode_prompts(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                   cfg: DecodingConfig, max_input_tokens: int | None = None) -> list[list[int]]:
    """Token ids of each prompt, truncated to fit (see :func:`generate`); an empty decoder prompt becomes BOS."""
    seq2seq = is_seq2seq(model)
    window = context_window(model, tokenizer)
    rows = [list(ids) for ids in tokenizer(prompts)["input_ids"]] if prompts else []
    if seq2seq:
        # The encoder reads the prompt; keep its beginning (where the instruction is), as T5 truncation does.
        limit = max_input_tokens or window
        return [r[:limit] for r in rows]
    # A decoder continues the prompt's end, and prompt plus new tokens must fit the position table.
    if cfg.max_new_tokens >= window:
        raise LmcycleError(f"max_new_tokens ({cfg.max_new_tokens}) leaves no room for the prompt in the "
                           f"model's context window of {window} tokens", field="max_new_tokens")
    limit = max_input_tokens or window - cfg.max_new_tokens
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return [r[-limit:] if r else [start] for r in rows]


def _batches(rows: list[list[int]], batch_size: int) -> Iterator[list[int]]:
    """Prompt indices, longest first, in batches: similar lengths together waste little on padding."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    for b in range(0, len(order), batch_size):
        yield order[b : b + batch_size]


def _stop_hit(decode: Callable[[list[int]], str], new_ids: list[int], stop: list[str], window: int) -> bool:
    """Whether the end of the new text contains a stop string; decodes only the last ``window`` tokens."""
    tail = decode(new_ids[-window:])
    return any(s in tail for s in stop)


def stop_window(stop: list[str]) -> int:
    """Tokens to decode when looking for a stop string at the end of the new text: a stop string is at most
    len(bytes) tokens long; a little margin covers tokenizers that drop a leading space in a fragment."""
    return max((len(s.encode("utf-8")) for s in stop), default=0) + 4


@torch.no_grad()
def generate_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                 cfg: DecodingConfig, *, max_input_tokens: int | None = None,
                 progress: bool = False) -> list[list[int]]:
    """The new token ids of every prompt (EOS excluded; generation of a row ends at EOS or a stop string)."""
    rows = encode_prompts(model, tokenizer, prompts, cfg, max_input_tokens)
    return decode_rows(model, tokenizer, rows, cfg, progress=progress)[0]


Ending = Literal["eos", "stop", "length"]


@torch.no_grad()
def decode_rows(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: list[list[int]],
                cfg: DecodingConfig, *, progress: bool = False, keep_eos: bool = False
                ) -> tuple[list[list[int]], list[Ending]]:
    """Continue already-encoded prompts (see :func:`encode_prompts`): the new ids of each row and why it ended:
    ``"eos"``, ``"stop"`` (a stop string) or ``"length"`` (``max_new_tokens`` ran out). The EOS token that
    ended a row is left out, or kept as its last id with ``keep_eos`` (RL scores that choice too)."""
    pad_id = pad_id_of(tokenizer)
    eos = eos_ids(model, tokenizer)
    window = stop_window(cfg.stop)
    results: list[list[int]] = [[] for _ in rows]
    endings: list[Ending] = ["length"] * len(rows)
    with eval_mode(model), tqdm(total=len(rows), desc="generate", unit="prompt", disable=not progress) as bar:
        for batch in _batches(rows, cfg.batch_size):
            new, ends = decode_batch(model, [rows[i] for i in batch], [prompt_generator(cfg.seed, i) for i in batch],
                                     cfg, pad_id, eos, lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
                                     window, keep_eos)
            for i, ids, end in zip(batch, new, ends, strict=True):
                results[i], endings[i] = ids, end
            bar.update(len(batch))
    return results, endings


def decode_batch(model, rows, generators, cfg: DecodingConfig, pad_id: int, eos: set[int],
                 decode: Callable[[list[int]], str], window: int, keep_eos: bool = False,
                 on_token: Callable[[int, int], None] | None = None,
                 cancelled: Callable[[int], bool] | None = None) -> tuple[list[list[int]], list[Ending]]:
    """Decode one rectangular batch of prompts ``rows`` step by step: the new ids of each row and its ending.

    ``generators[i]`` samples row i; ``decode(ids) -> text`` looks for stop strings in the last ``window`` new
    tokens. A server streams with ``on_token(i, token)`` (called for every kept token) and drops rows whose
    client left with ``cancelled(i)`` (checked before each of the row's tokens; the row ends as ``length``).
    """
    stream = logit_stream(model, rows, pad_id)
    logits = next(stream)
    new: list[list[int]] = [[] for _ in rows]
    ends: list[Ending] = ["length"] * len(rows)
    done = [False] * len(rows)
    for step in range(cfg.max_new_tokens):
        tokens = choose_next_tokens(logits, cfg, generators)
        for i, token in enumerate(tokens.tolist()):
            if done[i]:
                continue
            if cancelled is not None and cancelled(i):
                done[i] = True
                continue
            if token in eos:
                done[i], ends[i] = True, "eos"
                if keep_eos:
                    new[i].append(token)
                continue
            new[i].append(token)
            if on_token is not None:
                on_token(i, token)
            if cfg.stop and _stop_hit(decode, new[i], cfg.stop, window):
                done[i], ends[i] = True, "stop"
        if all(done) or step == cfg.max_new_tokens - 1:
            break
        # Finished rows keep being fed (their outputs are ignored) so the batch stays rectangular.
        finished = torch.tensor(done, device=tokens.device)
        logits = stream.send(tokens.masked_fill(finished, pad_id))
    stream.close()
    return new, ends


def cut_at_stop(text: str, stop: list[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]


def generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], cfg: DecodingConfig,
             *, max_input_tokens: int | None = None, progress: bool = False) -> list[str]:
    """Continue every prompt; returns only the new text of each, cut at EOS and at the first stop string.

    Prompts longer than ``max_input_tokens`` (default: the context window, less ``max_new_tokens`` for
    decoders) keep their last tokens (decoders) or their first tokens (encoder-decoders).
    """
    ids = generate_ids(model, tokenizer, prompts, cfg, max_input_tokens=max_input_tokens, progress=progress)
    return [cut_at_stop(tokenizer.decode(row, skip_special_tokens=True), cfg.stop) for row in ids]

