"""OpenAI wire format: the request bodies the server accepts and the error object it answers with.

Requests allow extra fields (clients send ``user``, ``metadata`` ...) and ignore them, except OpenAI's fields
for features the server lacks (``best_of``, ``logit_bias``, chat's ``echo`` ...): those are refused
(:func:`unsupported`) unless they carry the value that asks for nothing. Log-probs are served: completions'
``logprobs`` (0-5 alternatives) and ``echo``, chat's ``logprobs`` and ``top_logprobs`` (0-20). Fields we honour are type-checked so a wrong type is a 400
with an OpenAI-style error.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


def _encodable(text: str) -> str:
    # JSON may escape a lone surrogate ("\ud800"): Python decodes it to a str that no tokenizer can encode.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"contains a lone surrogate (U+{ord(text[e.start]):04X}) at position {e.start}: "
                         "not valid Unicode text") from None
    return text


Text = Annotated[str, AfterValidator(_encodable)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False  # a last chunk with empty choices and the usage counts


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: Text
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)  # not in OpenAI's spec; clients pass it via extra_body
    stop: Text | list[Text] | None = None
    seed: int | None = Field(default=None, ge=0)
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None

    def stop_list(self) -> list[str]:
        """``stop`` as a list without empty strings (OpenAI accepts a string or up to 4 strings)."""
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return [s for s in stops if s]


class CompletionRequest(_Request):
    """``POST /v1/completions``: a prompt string or a list of them (token-id prompts are not supported).

    ``logprobs``: the log-probs of the choice's tokens with that many top alternatives each (0 to 5; None: none);
    ``echo``: the prompt comes first in the choice's text (and its tokens in the log-probs); ``max_tokens`` 0
    only scores the prompt (allowed with ``echo``).
    """

    max_tokens: int | None = Field(default=None, ge=0)
    prompt: Text | list[Text] = Field(min_length=1)
    logprobs: int | None = Field(default=None, ge=0, le=5, strict=True)
    echo: bool = Field(default=False, strict=True)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Text


class ChatRequest(_Request):
    """``POST /v1/chat/completions``; ``max_completion_tokens`` is the newer name of ``max_tokens``.

    ``logprobs``: each completion token's log-prob, with the ``top_logprobs`` (0 to 20) best alternatives.
    """

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = Field(default=None, strict=True)
    top_logprobs: int | None = Field(default=None, ge=0, le=20, strict=True)


# OpenAI's fields for features this server does not have, with the values that ask for nothing (some clients
# always send them). Only undeclared fields are looked at: ``top_logprobs`` is refused on completions (it is
# chat's), ``echo`` on chat (it is completions').
_NOT_IMPLEMENTED: dict[str, tuple] = {
    "top_logprobs": (0,), "echo": (False,), "suffix": ("",), "logit_bias": ({},),
    "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "tools": ([],), "functions": ([],),
    "response_format": ({"type": "text"},),
}


def unsupported(body: _Request) -> str | None:
    """The first field of ``body`` asking for a feature the server does not implement, or None.

    ``best_of`` is allowed only equal to ``n`` (the best of n among n is all of them).
    """
    extra = body.model_extra or {}
    for name, harmless in (*_NOT_IMPLEMENTED.items(), ("best_of", (body.n,))):
        value = extra.get(name)
        if value is not None and not any(type(value) is type(ok) and value == ok for ok in harmless):
            return name
    return None


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
