"""LLM backends for the applications: one small interface, two implementations.

- :class:`LocalLLM`: a Hugging Face model in this process, decoded by :func:`lmcycle.models.generate.generate`.
- :class:`OpenAILLM`: any OpenAI-compatible HTTP server (``lmcycle serve``, vLLM, llama.cpp's server, Ollama,
  OpenAI itself) through the official ``openai`` client, on the completions or the chat endpoint.

Both take a :class:`DecodingConfig` and mean the same by it (greedy unless ``do_sample``; ``seed``; ``stop``), and
both count tokens so that prompts and memories can be kept within the context window: a local model with its own
tokenizer; a remote one with a tokenizer given by name or path, else an estimate (``ceil(chars / 3)``, which
over-counts English for every common tokenizer, so budgets it computes stay on the safe side).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, runtime_checkable

import torch

from lmcycle.artifacts import load_model
from lmcycle.data.sft import collate_sft, prompt_completion_item
from lmcycle.errors import LmcycleError
from lmcycle.models.generate import DecodingConfig, cut_at_stop, generate
from lmcycle.models.load import context_window, ensure_pad_token, is_seq2seq
from lmcycle.train.loop import sequence_logps


class NoLogprobs(LmcycleError):
    """The backend gives no log-probs: a caller scoring by likelihood may parse generated answers instead."""


@runtime_checkable
class LLM(Protocol):
    """What every application needs from a language model."""

    name: str
    context_window: int  # tokens, prompt and completion together

    def complete(self, prompts: list[str], cfg: DecodingConfig) -> list[str]:
        """The continuation of each prompt (new text only, cut at the first stop string)."""
        ...

    def count_tokens(self, text: str) -> int:
        """Tokens ``text`` takes in a prompt (exact with a tokenizer, else a safe over-estimate)."""
        ...


class LocalLLM:
    """A model folder or hub id (anything :func:`lmcycle.artifacts.load_model` takes), or a loaded pair."""

    def __init__(self, model_or_path, tokenizer=None, *, device: str = "auto", name: str | None = None,
                 attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32):
        if isinstance(model_or_path, str):  # device "auto": CUDA when present, else CPU
            self.model, self.tokenizer = load_model(model_or_path, device=device, dtype=dtype,
                                                    attn_implementation=attn_implementation)
            self.name = name or model_or_path
        else:
            if tokenizer is None:
                raise LmcycleError("LocalLLM with a loaded model needs its tokenizer too")
            self.model, self.tokenizer = model_or_path, tokenizer
            self.name = name or type(model_or_path).__name__
        self.model.eval()
        self.context_window = context_window(self.model, self.tokenizer)

    def complete(self, prompts: list[str], cfg: DecodingConfig) -> list[str]:
        return generate(self.model, self.tokenizer, prompts, cfg)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text)["input_ids"])

    @torch.no_grad()
    def continuation_logprobs(self, prompt: str, continuations: list[str]) -> list[float]:
        """Summed log-probability of each continuation after ``prompt`` (for likelihood-scored multiple choice;
        :meth:`OpenAILLM.continuation_logprobs` asks a server for the same)."""
        ensure_pad_token(self.tokenizer)
        seq2seq = is_seq2seq(self.model)
        prompt_ids = self.tokenizer(prompt)["input_ids"]
        items = [prompt_completion_item(prompt_ids, self.tokenizer(c, add_special_tokens=False)["input_ids"],
                                        self.context_window, seq2seq, self.tokenizer.bos_token_id)
                 for c in continuations]
        batch = collate_sft(items, self.tokenizer.pad_token_id)
        batch = {k: v.to(self.model.device) for k, v in batch.items()}
        return sequence_logps(self.model, batch).tolist()


class OpenAILLM:
    """An OpenAI-compatible server. ``chat=True`` sends each prompt as one user message to the chat endpoint
    (for servers or models that only chat); otherwise the completions endpoint gets the prompts as one list."""

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, chat: bool = False,
                 context_window: int = 4096, tokenizer: str | None = None, timeout_s: float = 120.0,
                 max_parallel: int = 8):
        try:
            import openai
        except ImportError:
            raise LmcycleError("the OpenAI-compatible backend needs the openai client: pip install openai") \
                from None
        # The key may be anything for a local server without one; the client insists on some value.
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key or "none", timeout=timeout_s,
                                    max_retries=2)
        self.name, self.chat, self.context_window = model, chat, context_window
        self.max_parallel = max_parallel
        self.tokenizer = None
        if tokenizer is not None:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer)

    def _settings(self, cfg: DecodingConfig) -> dict:
        settings: dict = {"model": self.name, "max_tokens": cfg.max_new_tokens, "seed": cfg.seed}
        if cfg.do_sample:
            settings |= {"temperature": cfg.temperature, "top_p": cfg.top_p}
            if cfg.top_k:  # not in OpenAI's API: servers that know it (vLLM, lmcycle serve) read it from the body
                settings["extra_body"] = {"top_k": cfg.top_k}
        else:
            settings["temperature"] = 0.0
        if cfg.stop:
            if len(cfg.stop) > 4:
                raise LmcycleError("OpenAI-compatible servers take at most 4 stop strings", field="stop")
            settings["stop"] = cfg.stop
        return settings

    def complete(self, prompts: list[str], cfg: DecodingConfig) -> list[str]:
        if not prompts:
            return []
        settings = self._settings(cfg)
        if not self.chat:
            response = self.client.completions.create(prompt=prompts, **settings)
            texts = [c.text for c in sorted(response.choices, key=lambda c: c.index)]
        else:
            def one(prompt: str) -> str:
                r = self.client.chat.completions.create(messages=[{"role": "user", "content": prompt}], **settings)
                return r.choices[0].message.content or ""

            with ThreadPoolExecutor(min(self.max_parallel, len(prompts))) as pool:
                texts = list(pool.map(one, prompts))
        # A server may not honour stop strings exactly (some keep the stop string): cut as generate does.
        return [cut_at_stop(t, cfg.stop) for t in texts]

    def continuation_logprobs(self, prompt: str, continuations: list[str]) -> list[float]:
        """Summed log-probability of each continuation after ``prompt``, as :meth:`LocalLLM.continuation_logprobs`
        gives, from one completions request that only scores: ``echo``, ``logprobs=0``, ``max_tokens=0``, the
        prompts ``prompt + c`` (``max_tokens=1`` where a server refuses 0). A continuation's tokens are those whose ``text_offset`` lies in
        ``[len(prompt), len(prompt + c))`` (the server tokenizes the joined text; a token spanning the boundary
        counts with the prompt). Raises :class:`NoLogprobs` (field ``backend``) when the server gives no
        log-probs, so that callers can fall back to parsing an answer; any other refusal is an
        :class:`LmcycleError`.
        """
        if not continuations:
            return []
        import openai

        texts = [prompt + c for c in continuations]
        response = None
        for max_tokens in (0, 1):  # some servers refuse 0; a generated token lies past the text, uncounted
            try:
                response = self.client.completions.create(model=self.name, prompt=texts, max_tokens=max_tokens,
                                                          echo=True, logprobs=0, temperature=0.0)
                break
            except openai.BadRequestError as e:
                message = str(e.message)
                if max_tokens == 0 and "max_tokens" in message:
                    continue
                if any(word in message for word in ("logprobs", "echo")):  # servers without log-probs
                    raise NoLogprobs(f"the endpoint gives no log-probs for scoring continuations: {message}",
                                     field="backend") from None
                raise LmcycleError(f"the endpoint refused to score continuations: {message}",
                                   field="backend") from None
        choices = sorted(response.choices, key=lambda ch: ch.index)
        if len(choices) != len(texts):
            raise LmcycleError(f"the endpoint answered {len(choices)} choices for {len(texts)} prompts",
                               field="backend")
        out = []
        for text, choice in zip(texts, choices, strict=True):
            lp = choice.logprobs
            if lp is None or not lp.token_logprobs or lp.text_offset is None:
                raise NoLogprobs("the endpoint gives no log-probs (echo with logprobs): score by parsing "
                                 "answers instead", field="backend")
            total = 0.0
            for offset, value in zip(lp.text_offset, lp.token_logprobs, strict=True):
                if len(prompt) <= offset < len(text):
                    if value is None:
                        raise LmcycleError("the endpoint gave a continuation token without a log-prob",
                                           field="backend")
                    total += value
            out.append(total)
        return out

    def count_tokens(self, text: str) -> int:
        if self.tokenizer is not None:
            return len(self.tokenizer(text)["input_ids"])
        return math.ceil(len(text) / 3)


def backend_from_spec(spec: str, *, api_key: str | None = None, chat: bool = False,
                      context_window: int = 4096, tokenizer: str | None = None) -> LLM:
    """``local:PATH_OR_HUB_ID`` or ``openai:BASE_URL#MODEL`` (the CLI's ``--backend``)."""
    kind, _, rest = spec.partition(":")
    if kind == "local" and rest:
        return LocalLLM(rest)
    if kind == "openai" and "#" in rest:
        url, _, model = rest.rpartition("#")
        if url and model:
            return OpenAILLM(url, model, api_key=api_key, chat=chat, context_window=context_window,
                             tokenizer=tokenizer)
    raise LmcycleError(f"backend '{spec}': use local:PATH or openai:BASE_URL#MODEL "
                       "(e.g. openai:http://127.0.0.1:8000/v1#mymodel)", field="backend")
