"""The HTTP layer (FastAPI): OpenAI-compatible routes over an :class:`lmcycle.serve.engine.Engine`.

Routes: ``GET /health`` (open even with an API key: it says only "ok"), ``GET /v1/models``,
``POST /v1/completions``, ``POST /v1/chat/completions`` (``"stream": true`` answers with server-sent events,
``data: {...}`` chunks then ``data: [DONE]``). Every error is OpenAI's object
``{"error": {"message", "type", "param", "code"}}`` with a 4xx/5xx status.

Semantics shared with ``generate``: ``temperature`` 0 is greedy, otherwise sampling with ``top_p``/``top_k``
(a temperature below ``MIN_TEMPERATURE`` decodes greedily too: dividing logits by it overflows to inf/NaN);
``seed`` (default 0) seeds choice ``j`` like prompt ``j`` of ``generate``; ``max_tokens`` defaults to 16 as in
OpenAI's completions API. Chat prompts use the tokenizer's chat template, or when it has none the fallback
``"<role>: <content>\\n"`` per message followed by ``"assistant:"``.

Log-probs (completions' ``logprobs`` 0-5 and ``echo``, OpenAI's legacy ``{"tokens", "token_logprobs",
"top_logprobs", "text_offset"}``; chat's ``logprobs``/``top_logprobs`` 0-20, ``{"content": [{"token", "logprob",
"bytes", "top_logprobs"}]}``) are the log-softmax of the model's raw logits (temperature 1, no top-k/top-p:
vLLM's default "raw logprobs"), whatever the request samples with; see :mod:`lmcycle.serve.engine`. A
completion's ``top_logprobs`` hold the ``logprobs`` best tokens and the chosen one (as vLLM does); its
``text_offset`` index the choice's ``text`` (with ``echo`` the prompt, whose first token's log-prob is None).
``max_tokens: 0`` with ``echo`` only scores the prompt (likelihood evaluation, as lm-eval-harness asks).
Streaming refuses ``logprobs`` and ``echo`` (400).

Streaming sends each token's text as soon as the worker decodes it, holding back a tail that could be the
start of a stop string (or an incomplete UTF-8 character), so the chunks join to exactly the non-streamed
text. A streaming client that disconnects cancels its request: the worker drops its rows at the next step.

Limits, each a 4xx with OpenAI's error object: prompts x ``n`` x ``max_tokens`` of one request at most
``max_request_tokens`` and its choices at most the queue's ``max_queue`` sequences (400); the queue full (429);
the body over ``max_body_bytes`` (413); more than ``max_headers`` headers or ``max_header_bytes`` of them (431).
Run it with :func:`uvicorn_options` so that uvicorn itself stops buffering a request head past the limit.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmcycle.errors import LmcycleError
from lmcycle.models.generate import DecodingConfig, cut_at_stop
from lmcycle.serve.engine import Engine, Job, QueueFull
from lmcycle.serve.protocol import ChatRequest, CompletionRequest, error_body, unsupported

MIN_TEMPERATURE = 1e-5  # colder than this samples like argmax anyway, and logits / T may overflow float32
MAX_HEADERS, MAX_HEADER_BYTES = 64, 16_384


def uvicorn_options(max_header_bytes: int = MAX_HEADER_BYTES) -> dict:
    """``uvicorn.run`` options bounding what the server buffers of a request head: h11 refuses (400) a head
    larger than this, while httptools, uvicorn's default when installed, buffers headers without a limit."""
    return {"http": "h11", "h11_max_incomplete_event_size": max_header_bytes + 8192}  # + the request line


class RequestLimits:
    """ASGI middleware: answer 431 to more than ``max_headers`` headers or ``max_header_bytes`` of them, then
    read the whole request body first and answer 413 once it passes ``limit`` bytes.

    A chunked upload has no Content-Length, so the size is only known by reading; the body is then handed to
    the app in one message (the API's JSON bodies are small, so buffering them costs nothing).
    """

    def __init__(self, app, limit: int, max_headers: int = MAX_HEADERS, max_header_bytes: int = MAX_HEADER_BYTES):
        self.app, self.limit = app, limit
        self.max_headers, self.max_header_bytes = max_headers, max_header_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = scope["headers"]
        count, size = len(headers), sum(len(k) + len(v) for k, v in headers)
        if count > self.max_headers or size > self.max_header_bytes:
            message = (f"{count} headers of {size} bytes; this server takes at most {self.max_headers} headers "
                       f"of {self.max_header_bytes} bytes in all")
            return await JSONResponse(error_body(message, code="headers_too_large"),
                                      status_code=431)(scope, receive, send)
        size = dict(headers).get(b"content-length", b"")
        if size.isdigit() and int(size) > self.limit:  # refused without reading it
            return await _too_large(self.limit)(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                return await _too_large(self.limit)(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # the app waits for a disconnect (streaming responses do)
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type_ = status, message, param, code, type_


def create_app(model_dir: str, adapters: dict[str, str] | None = None, api_key: str | None = None, *,
               device: str = "auto", max_batch: int = 8, batch_wait_s: float = 0.01, max_queue: int = 256,
               request_timeout_s: float = 300.0, max_body_bytes: int = 1_000_000,
               max_request_tokens: int = 65_536, max_headers: int = MAX_HEADERS,
               max_header_bytes: int = MAX_HEADER_BYTES, attn_implementation: str = "sdpa",
               engine: Engine | None = None) -> FastAPI:
    """The ASGI app serving ``model_dir`` with LoRA ``adapters`` (name -> PEFT folder) selectable by ``model``.

    ``max_queue`` counts waiting sequences (a prompt's ``n`` choices count ``n``); ``max_request_tokens`` bounds
    prompts x ``n`` x ``max_tokens`` of one request. ``device``: ``auto`` (CUDA when present, else CPU), ``cpu``,
    ``cuda`` or ``cuda:N``.
    """
    if max_request_tokens < 1:
        raise LmcycleError(f"max_request_tokens must be at least 1, got {max_request_tokens}",
                           field="max_request_tokens")
    engine = engine or Engine(model_dir, adapters, device=device, max_batch=max_batch, batch_wait_s=batch_wait_s,
                              max_queue=max_queue, attn_implementation=attn_implementation)
    app = FastAPI(title="lmcycle", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.router.add_event_handler("shutdown", engine.close)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if api_key is not None and request.url.path != "/health":
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return JSONResponse(error_body("invalid or missing API key", "authentication_error",
                                               code="invalid_api_key"), status_code=401)
        return await call_next(request)

    app.add_middleware(RequestLimits, limit=max_body_bytes, max_headers=max_headers,
                       max_header_bytes=max_header_bytes)

    @app.exception_handler(ApiError)
    async def _api_error(_, e: ApiError):
        return JSONResponse(error_body(e.message, e.type_, e.param, e.code), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, e: RequestValidationError):
        # The longest location is the most precise: for a union (a prompt string or a list of them) the
        # list member's error names the bad item; the union members' names ("str", "list[...]") are dropped.
        first = max(e.errors(), key=lambda err: len(err["loc"]), default={})
        loc = [str(x) for x in first.get("loc", ()) if x != "body" and not (isinstance(x, str) and
                                                                             (x == "str" or "[" in x))]
        param = ".".join(loc) or None
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            message, param = "the request body is not valid JSON", None
        return JSONResponse(error_body(f"{param + ': ' if param else ''}{message}", param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, e: StarletteHTTPException):
        return JSONResponse(error_body(str(e.detail), "invalid_request_error"), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _internal(_, e: Exception):  # the message only: no traceback or path reaches the client
        return JSONResponse(error_body(f"internal error: {type(e).__name__}", "server_error"), status_code=500)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(name) for name in engine.model_names()]}

    @app.get("/v1/models/{name}")
    async def model(name: str):
        _adapter_of(engine, name)  # 404 for an unknown name
        return _model_card(name)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        return await _serve(engine, body, body.prompt, max_tokens, "text_completion", request,
                            request_timeout_s, max_request_tokens)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        prompt = chat_prompt(engine.tokenizer, [m.model_dump(include={"role", "content"}) for m in body.messages])
        limit = body.max_completion_tokens or body.max_tokens
        return await _serve(engine, body, prompt, limit, "chat.completion", request, request_timeout_s,
                            max_request_tokens)

    return app


def _too_large(limit: int) -> JSONResponse:
    return JSONResponse(error_body(f"request body larger than {limit} bytes", code="body_too_large"),
                        status_code=413)


def _model_card(name: str) -> dict:
    return {"id": name, "object": "model", "created": int(time.time()), "owned_by": "lmcycle"}


def chat_prompt(tokenizer, messages: list[dict]) -> str:
    """The prompt text of a conversation: the tokenizer's chat template, else ``role: content`` lines."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def _adapter_of(engine: Engine, model: str) -> str | None:
    if model == engine.base_name:
        return None
    if model in engine.adapters:
        return model
    raise ApiError(404, f"the model '{model}' does not exist", param="model", code="model_not_found")


def _job(engine: Engine, body, prompt: str, max_tokens: int | None, default_cap: int) -> Job:
    adapter = _adapter_of(engine, body.model)
    ids = engine.encode(prompt)
    if not ids:
        start = engine.tokenizer.bos_token_id
        ids = [start if start is not None else engine.tokenizer.eos_token_id]
    room = engine.window - len(ids)
    if room < (0 if max_tokens == 0 else 1):
        raise ApiError(400, f"the prompt has {len(ids)} tokens; the model's context window is {engine.window}",
                       param="messages" if isinstance(body, ChatRequest) else "prompt",
                       code="context_length_exceeded")
    if max_tokens is None:  # the rest of the window, but no more than fits in the request's token budget
        max_tokens = min(room, default_cap)
    if len(ids) + max_tokens > engine.window:
        raise ApiError(400, f"prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceeds the model's "
                       f"context window of {engine.window} tokens", param="max_tokens",
                       code="context_length_exceeded")
    sample = body.temperature >= MIN_TEMPERATURE
    cfg = DecodingConfig(do_sample=sample, temperature=body.temperature if sample else 1.0, top_p=body.top_p,
                         top_k=body.top_k, max_new_tokens=max(max_tokens, 1), stop=body.stop_list(),
                         seed=body.seed or 0)
    top, echo = _logprobs_asked(body)
    return Job(ids=ids, n=body.n, adapter=adapter, cfg=cfg, logprobs=top, echo=echo, generate=max_tokens > 0)


def _logprobs_asked(body) -> tuple[int | None, bool]:
    """(top alternatives per token, or None for no log-probs; whether the prompt's tokens are scored too)."""
    if isinstance(body, ChatRequest):
        return (body.top_logprobs or 0) if body.logprobs else None, False
    return body.logprobs, body.echo and body.logprobs is not None


def _check_logprobs(engine: Engine, body, max_tokens: int | None) -> None:
    """400 for log-prob settings the server cannot serve (streamed, chat's top_logprobs without logprobs ...)."""
    top, _ = _logprobs_asked(body)
    echo = isinstance(body, CompletionRequest) and body.echo
    if body.stream and (top is not None or echo):
        name = "logprobs" if top is not None else "echo"
        raise ApiError(400, f"{name} is not supported with stream: true; ask without streaming", param=name,
                       code="unsupported_parameter")
    if isinstance(body, ChatRequest) and body.top_logprobs and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    if max_tokens == 0 and not echo:
        raise ApiError(400, "max_tokens 0 generates nothing: allowed only with echo (to score the prompt)",
                       param="max_tokens")
    if echo and top is not None and engine.seq2seq:
        raise ApiError(400, "echo with logprobs needs a decoder-only model: an encoder-decoder does not predict "
                       "its prompt", param="echo", code="unsupported_parameter")


def _check_size(engine: Engine, prompts: int, n: int, max_tokens: int | None, max_request_tokens: int) -> None:
    """400 for a request the queue could never take, or whose prompts x n x max_tokens would hold the engine
    too long; checked before encoding the prompts (a 1 MB body holds many)."""
    rows = prompts * n
    if rows > engine.max_queue:
        raise ApiError(400, f"{prompts} prompt(s) x n={n} is {rows} sequences; this server queues at most "
                       f"{engine.max_queue}", param="n", code="request_too_large")
    tokens = rows * (max_tokens or 1)  # without max_tokens a chat gets its share of the budget, at least 1
    if tokens > max_request_tokens:
        raise ApiError(400, f"{prompts} prompt(s) x n={n} x max_tokens={max_tokens or 1} is {tokens} new tokens; "
                       f"this server takes at most {max_request_tokens} per request", param="max_tokens",
                       code="request_too_large")


async def _serve(engine: Engine, body, prompt: str | list[str], max_tokens: int | None, kind: str,
                 request: Request, timeout_s: float, max_request_tokens: int):
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if body.stream and len(prompts) > 1:
        raise ApiError(400, "streaming takes one prompt, not a list", param="prompt")
    name = unsupported(body)
    if name is not None:
        raise ApiError(400, f"{name}: not supported by this server", param=name, code="unsupported_parameter")
    _check_logprobs(engine, body, max_tokens)
    _check_size(engine, len(prompts), body.n, max_tokens, max_request_tokens)
    cap = max_request_tokens // (len(prompts) * body.n)  # what a chat without max_tokens may decode
    jobs = [_job(engine, body, p, max_tokens, cap) for p in prompts]
    for i, job in enumerate(jobs):
        job.first_index = i * body.n  # the choices sample like generate(prompts repeated n times each)
    job = jobs[0]
    rid = f"{'cmpl' if kind == 'text_completion' else 'chatcmpl'}-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    if body.stream:
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue = asyncio.Queue()
        job.on_token = lambda j, token: loop.call_soon_threadsafe(tokens.put_nowait, (j, token))
        _submit(engine, [job])
        usage = bool(body.stream_options and body.stream_options.include_usage)
        stream = _sse(engine, job, tokens, kind, rid, created, body.model, timeout_s, usage)
        return StreamingResponse(stream, media_type="text/event-stream")
    try:
        futures = [asyncio.wrap_future(f) for f in _submit(engine, jobs)]
        results = await asyncio.wait_for(asyncio.gather(*futures), timeout_s)
    except TimeoutError:
        raise _timeout(timeout_s) from None
    finally:  # a no-op for finished jobs; frees the worker from the rest on a timeout, a 429 or a client gone
        for j in jobs:
            j.cancelled.set()
    choices = [(p, j, c) for p, j, r in zip(prompts, jobs, results, strict=True) for c in r]
    usage = _usage(jobs, [c for _, _, c in choices])
    if kind == "text_completion":
        echo = body.echo
        out = [{"index": i, "text": p + c.text if echo else c.text,
                "logprobs": _completion_logprobs(engine, j, c, p if echo else ""), "finish_reason": c.finish_reason}
               for i, (p, j, c) in enumerate(choices)]
    else:
        out = [{"index": i, "message": {"role": "assistant", "content": c.text},
                "logprobs": _chat_logprobs(engine, j, c), "finish_reason": c.finish_reason}
               for i, (_, j, c) in enumerate(choices)]
    return {"id": rid, "object": kind, "created": created, "model": body.model, "choices": out, "usage": usage}


def _scored_texts(engine: Engine, job: Job, choice) -> tuple[list[str], list[list[str]]]:
    """The text of each scored token and of each of its alternatives."""
    s = choice.scores
    before = [] if s.prompt_tokens else job.ids  # without echo the completion follows the prompt's tokens
    return engine.token_texts(s.ids, [[t for t, _ in top] for top in s.top], before=before)


def _completion_logprobs(engine: Engine, job: Job, choice, echoed: str) -> dict | None:
    """OpenAI's legacy completion log-probs; ``text_offset`` index the choice's text, which starts with
    ``echoed`` (the prompt with echo, else "")."""
    s = choice.scores
    if s is None:
        return None
    texts, alternatives = _scored_texts(engine, job, choice)
    offsets, at = [], 0
    for i, text in enumerate(texts):
        if i == s.prompt_tokens:  # the completion starts right after the prompt text as sent
            at = len(echoed)
        offsets.append(min(at, len(echoed)) if i < s.prompt_tokens else at)
        at += len(text)
    tops: list[dict | None] = []
    for i, (text, lp) in enumerate(zip(texts, s.logprobs, strict=True)):
        if lp is None:
            tops.append(None)
            continue
        top: dict[str, float] = {}
        for alt, (_, alt_lp) in zip(alternatives[i], s.top[i], strict=True):
            top.setdefault(alt, alt_lp)  # two ids with one text: the likelier one
        top.setdefault(text, lp)
        tops.append(top)
    return {"tokens": texts, "token_logprobs": s.logprobs, "top_logprobs": tops, "text_offset": offsets}


def _chat_logprobs(engine: Engine, job: Job, choice) -> dict | None:
    """OpenAI's chat log-probs: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}``."""
    s = choice.scores
    if s is None:
        return None
    texts, alternatives = _scored_texts(engine, job, choice)

    def entry(text: str, lp: float) -> dict:
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    content = [entry(text, lp) | {"top_logprobs": [entry(a, alp) for a, (_, alp) in zip(alts, top, strict=True)]}
               for text, lp, alts, top in zip(texts, s.logprobs, alternatives, s.top, strict=True)]
    return {"content": content, "refusal": None}


def _usage(jobs: list[Job], choices: list) -> dict:
    prompt = sum(len(j.ids) for j in jobs)
    completion = sum(len(c.ids) for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _submit(engine: Engine, jobs: list[Job]):
    try:
        return engine.submit_request(jobs)
    except QueueFull:
        raise ApiError(429, "the server is busy (request queue full); retry later", type_="server_error",
                       code="queue_full") from None


def _timeout(timeout_s: float) -> ApiError:
    return ApiError(503, f"the request took longer than {timeout_s:g}s", type_="server_error", code="timeout")


def _safe_prefix(text: str, stop: list[str]) -> str:
    """The part of ``text`` that can be sent now: before any stop string, less a tail that may begin one
    (or an incomplete character, which the byte-level decoder shows as U+FFFD)."""
    text = cut_at_stop(text, stop)
    hold = max((k for s in stop for k in range(1, min(len(s), len(text)) + 1) if text.endswith(s[:k])), default=0)
    text = text[: len(text) - hold]
    return text.rstrip("\ufffd")


async def _sse(engine: Engine, job: Job, tokens: asyncio.Queue, kind: str, rid: str, created: int,
               model: str, timeout_s: float, include_usage: bool = False) -> AsyncIterator[str]:
    """Server-sent events of a streaming request: a chunk per piece of new text, a final chunk per choice
    with its ``finish_reason``, then ``[DONE]``. Leaving early (client gone) cancels the request."""
    chunk_kind = "text_completion" if kind == "text_completion" else "chat.completion.chunk"

    def event(index: int, piece: str | None, finish: str | None = None, first: bool = False) -> str:
        if kind == "text_completion":
            choice = {"index": index, "text": piece or "", "logprobs": None, "finish_reason": finish}
        else:
            delta = ({"role": "assistant", "content": ""} if first else {}) | ({"content": piece} if piece else {})
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        data = {"id": rid, "object": chunk_kind, "created": created, "model": model, "choices": [choice]}
        return f"data: {json.dumps(data)}\n\n"

    done = asyncio.wrap_future(job.future)
    ids: list[list[int]] = [[] for _ in range(job.n)]
    sent = [""] * job.n
    deadline = time.monotonic() + timeout_s
    try:
        if kind != "text_completion":
            for j in range(job.n):
                yield event(j, None, first=True)
        while not (done.done() and tokens.empty()):
            getter = asyncio.ensure_future(tokens.get())
            finished, _ = await asyncio.wait({getter, done}, timeout=max(0.0, deadline - time.monotonic()),
                                             return_when=asyncio.FIRST_COMPLETED)
            if not finished:
                getter.cancel()
                raise _timeout(timeout_s)
            if getter not in finished:
                getter.cancel()
                continue
            j, token = getter.result()
            ids[j].append(token)
            text = _safe_prefix(engine.decode(ids[j]), job.cfg.stop)
            if len(text) > len(sent[j]) and text.startswith(sent[j]):
                yield event(j, text[len(sent[j]):])
                sent[j] = text
        choices = done.result()
        for j, c in enumerate(choices):
            rest = c.text[len(sent[j]):] if c.text.startswith(sent[j]) else ""
            yield event(j, rest or None, c.finish_reason)
        if include_usage:
            data = {"id": rid, "object": chunk_kind, "created": created, "model": model, "choices": [],
                    "usage": _usage([job], choices)}
            yield f"data: {json.dumps(data)}\n\n"
        yield "data: [DONE]\n\n"
    except ApiError as e:  # headers are sent already: report the error in the stream, as OpenAI does
        yield f"data: {json.dumps(error_body(e.message, e.type_, e.param, e.code))}\n\n"
    finally:
        job.cancelled.set()  # no-op when finished; stops the decoding when the client left
