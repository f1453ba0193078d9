"""The model side of the server: one base model with its LoRA adapters, driven by one worker thread.

A request (one or more :class:`Job`) waits in a queue bounded in sequences (``max_queue`` choices in all). The
worker waits ``batch_wait_s`` after the first arrival, then fills a batch of up to ``max_batch`` sequences
round-robin over the waiting requests, one choice from each in turn, so a small request that arrives behind
a huge one gets into the next batch instead of waiting for all of it. The batch's rows are grouped by decoding
setting, one batched decode per group (``generate.decode_batch``), so that each new token can be streamed
(``Job.on_token``) and a cancelled request stops taking part in the batch at the next step.
The LoRA layers hold every adapter at once. A batch may mix adapters (and the base): with
``lora.per_row_adapters`` each row gets its own adapter's update inside one forward pass, the base weights
running once for the whole batch.

Choice ``j`` of a request samples from ``prompt_generator(seed, j)``, exactly like prompt ``j`` of
``generate([prompt] * n, cfg)``: the output does not depend on which other requests share the batch.

Log-probs (``Job.logprobs``) come from one more forward pass over each finished row (prompt + completion,
under the row's adapter), after its decode: the log-softmax of the model's raw logits (temperature 1, no
top-k/top-p), as vLLM's default "raw logprobs", not of the distribution the token was sampled from.
"""

from __future__ import annotations

import threading
from collections import defaultdict, deque
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmcycle.adapt.lora import load_lora, per_row_adapters, set_active_adapter
from lmcycle.artifacts import load_model
from lmcycle.data.batching import pad_id_of, pad_rows
from lmcycle.errors import LmcycleError
from lmcycle.models.generate import (
    DecodingConfig,
    Ending,
    cut_at_stop,
    decode_batch,
    decoder_start_id,
    eos_ids,
    prompt_generator,
    stop_window,
)
from lmcycle.models.load import context_window, is_seq2seq


class QueueFull(Exception):
    """The request queue is at its bound: the server answers 429."""


@dataclass
class Job:
    """One request: its prompt's token ids, decoded ``n`` times with ``cfg`` and the adapter (None = base).

    ``on_token(choice_index, token_id)`` is called from the worker thread for every new token (EOS excluded).
    Setting ``cancelled`` stops the request's decoding; its future then holds the choices so far (those that
    never reached a batch are empty, ``length``).

    ``logprobs`` (None: none) asks each choice for its tokens' log-probs with that many top alternatives each,
    ``echo`` for the prompt's tokens' too (decoder-only models); ``generate=False`` decodes nothing (only
    scores the prompt: OpenAI's ``max_tokens: 0`` with ``echo``).
    """

    ids: list[int]
    n: int
    adapter: str | None
    cfg: DecodingConfig
    on_token: Callable[[int, int], None] | None = None
    first_index: int = 0  # choice j samples like prompt first_index + j of generate (a list of prompts)
    logprobs: int | None = None
    echo: bool = False
    generate: bool = True
    future: Future = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    # The worker's progress: choices handed to a batch so far, and the finished ones by index.
    scheduled: int = field(default=0, init=False)
    done: dict[int, Choice] = field(default_factory=dict, init=False)

    def dropped(self) -> bool:
        """Whether nobody waits for the job's remaining choices (cancelled, or its future cancelled or failed)."""
        return self.cancelled.is_set() or self.future.done()


@dataclass
class Piece:
    """Choices ``start`` to ``stop`` (exclusive) of ``job``: its share of one batch."""

    job: Job
    start: int
    stop: int


@dataclass
class TokenScores:
    """Log-probs of a choice's tokens: the prompt's (with ``echo``; the first one has None, nothing predicts it)
    then the completion's. ``top[i]``: the ``logprobs`` best (token id, log-prob) at token i's position, best
    first (empty for the first prompt token)."""

    ids: list[int]
    logprobs: list[float | None]
    top: list[list[tuple[int, float]]]
    prompt_tokens: int  # how many of ``ids`` are the prompt's (0 without echo)


@dataclass
class Choice:
    text: str
    ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) | "length"
    scores: TokenScores | None = None


class Engine:
    """Loads the base and adapters once; ``submit`` a :class:`Job`, wait on its future for its choices."""

    def __init__(self, model_dir: str, adapters: dict[str, str] | None = None, *, device: str = "auto",
                 max_batch: int = 8, batch_wait_s: float = 0.01, max_queue: int = 256,
                 attn_implementation: str = "sdpa"):
        for value, name in ((max_batch, "max_batch"), (max_queue, "max_queue")):
            if value < 1:
                raise LmcycleError(f"{name} must be at least 1, got {value}", field=name)

        # device "auto": CUDA when present, else CPU (lmcycle.models.device.resolve_device)
        self.model, self.tokenizer = load_model(model_dir, device=device, attn_implementation=attn_implementation)
        self.base_name = Path(model_dir).name or str(model_dir)
        self.adapters = dict(adapters or {})
        for name, path in self.adapters.items():
            if name == self.base_name:
                raise LmcycleError(f"adapter name '{name}' is the base model's name", field="adapter")
            load_lora(self.model, path, name=name)
        if self.adapters:
            set_active_adapter(self.model, None)
        self._row_adapters = per_row_adapters
        self.model.eval()
        self.window = context_window(self.model, self.tokenizer)
        self.seq2seq = is_seq2seq(self.model)
        self.eos = eos_ids(self.model, self.tokenizer)
        self.pad_id = pad_id_of(self.tokenizer)
        self.max_batch, self.batch_wait_s, self.max_queue = max_batch, batch_wait_s, max_queue
        self._requests: deque[deque[Job]] = deque()  # waiting requests, the next to serve first
        self._changed = threading.Condition()
        self._stop = threading.Event()
        # The worker and the event loop both use the tokenizer; a Rust tokenizer used from two threads at once
        # can fail ("Already borrowed"), so every use goes through encode/decode under this lock.
        self._tokenizer_lock = threading.Lock()
        self.batches_run = 0  # forward groups decoded (tests check batching with it)
        self.cancelled_jobs = 0  # requests whose decoding stopped because they were cancelled
        self._worker = threading.Thread(target=self._loop, name="lmcycle-serve-engine", daemon=True)
        self._worker.start()

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` as ``generate`` encodes a prompt (special tokens the tokenizer adds included)."""
        with self._tokenizer_lock:
            return list(self.tokenizer(text)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def model_names(self) -> list[str]:
        return [self.base_name, *self.adapters]

    def submit(self, job: Job) -> Future:
        """Queue one job as a request of its own; raises :class:`QueueFull` when its choices do not fit."""
        return self.submit_request([job])[0]

    def submit_request(self, jobs: list[Job]) -> list[Future]:
        """Queue the jobs of one request together (all or none); raises :class:`QueueFull` when their choices
        do not fit in the ``max_queue`` sequences still free."""
        with self._changed:
            if self.waiting() + sum(job.n for job in jobs) > self.max_queue:
                raise QueueFull
            self._requests.append(deque(jobs))
            self._changed.notify()
        return [job.future for job in jobs]

    def waiting(self) -> int:
        """Choices queued and not yet handed to a batch (a cancelled request's no longer count)."""
        with self._changed:
            return sum(job.n - job.scheduled for request in self._requests for job in request if not job.dropped())

    def close(self) -> None:
        """Stop the worker after its current batch (waiting requests are not answered)."""
        self._stop.set()
        self._worker.join(timeout=10)

    # -- worker ---------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            with self._changed:
                if not self._changed.wait_for(lambda: self._requests, timeout=0.1):
                    continue
                # Requests arriving within batch_wait_s of each other share the batch.
                self._changed.wait_for(lambda: self.waiting() >= self.max_batch, timeout=self.batch_wait_s)
                pieces = self._next_batch()
            if pieces:
                self._run(pieces)

    def _next_batch(self) -> list[Piece]:
        """Up to ``max_batch`` choices, one at a time round-robin: one from the first waiting request, which then
        goes to the back of the line, then one from the next, and so on."""
        pieces: dict[int, Piece] = {}  # by id(job): a job's choices in one batch are consecutive
        room = self.max_batch
        while room and self._requests:
            request = self._requests.popleft()
            job = self._take_one(request)
            if request:
                self._requests.append(request)
            if job is None:
                continue
            room -= 1
            piece = pieces.setdefault(id(job), Piece(job, job.scheduled - 1, job.scheduled))
            piece.stop = job.scheduled
        return list(pieces.values())

    def _take_one(self, request: deque[Job]) -> Job | None:
        """Hand the next choice of the request's first live job to the batch; dropped jobs are finished."""
        while request:
            job = request[0]
            if job.dropped() or (job.scheduled == 0 and not job.future.set_running_or_notify_cancel()):
                request.popleft()
                self._finish_dropped(job)
                continue
            job.scheduled += 1
            if job.scheduled == job.n:
                request.popleft()
            return job
        return None

    def _finish_dropped(self, job: Job) -> None:
        """A started job that was cancelled ends with the choices so far (the rest empty); others are cancelled."""
        if job.future.done():
            return
        if job.scheduled == 0:
            job.future.cancel()
            return
        for j in range(job.scheduled, job.n):
            job.done[j] = Choice(text="", ids=[], finish_reason="length")
        job.scheduled = job.n
        self._settle(job)

    def _settle(self, job: Job) -> None:
        if len(job.done) == job.n and not job.future.done():
            job.future.set_result([job.done[j] for j in range(job.n)])

    def _run(self, pieces: list[Piece]) -> None:
        groups: dict[str, list[Piece]] = defaultdict(list)
        for piece in pieces:
            settings = piece.job.cfg.model_dump(exclude={"seed", "batch_size"}) | {"generate": piece.job.generate}
            groups[repr(sorted(settings.items()))].append(piece)
        for group in groups.values():
            try:
                results = self._decode(group)
            except Exception as e:  # a failure answers this group's requests; the worker keeps serving
                for piece in group:
                    if not piece.job.future.done():
                        piece.job.future.set_exception(e)
                continue
            for (job, j), choice in results:
                job.done[j] = choice
            for piece in group:
                if piece.job.cancelled.is_set():
                    with self._changed:  # its choices not yet scheduled are not decoded
                        self._finish_dropped(piece.job)
                self._settle(piece.job)

    @torch.no_grad()
    def _decode(self, group: list[Piece]) -> list[tuple[tuple[Job, int], Choice]]:
        """Decode the choices of ``group`` (same settings, any adapters) as one batch: ((job, index), choice)."""
        cfg = group[0].job.cfg
        # Rows sorted by adapter: each adapter's LoRA update then runs on a contiguous slice of the batch.
        order = sorted(group, key=lambda piece: piece.job.adapter or "")
        owners = [(piece.job, j) for piece in order for j in range(piece.start, piece.stop)]
        rows = [job.ids for job, _ in owners]
        generators = [prompt_generator(job.cfg.seed, job.first_index + j) for job, j in owners]
        cancelled_jobs = set()

        def cancelled(i: int) -> bool:
            job = owners[i][0]
            if job.cancelled.is_set():
                if id(job) not in cancelled_jobs:
                    cancelled_jobs.add(id(job))
                    self.cancelled_jobs += 1
                return True
            return False

        def on_token(i: int, token: int) -> None:
            job, j = owners[i]
            if job.on_token is not None:
                job.on_token(j, token)

        adapters = [job.adapter for job, _ in owners]
        if group[0].job.generate:
            with self._row_adapters(self.model, adapters) if self.adapters else nullcontext():
                new, ends = decode_batch(self.model, rows, generators, cfg, self.pad_id, self.eos, self.decode,
                                         stop_window(cfg.stop), on_token=on_token, cancelled=cancelled)
        else:
            new, ends = [[] for _ in rows], ["length"] * len(rows)
        self.batches_run += 1
        choices = [self._choice(ids, end, cfg.stop) for ids, end in zip(new, ends, strict=True)]
        scored = [i for i, (job, _) in enumerate(owners) if job.logprobs is not None and not job.cancelled.is_set()]
        if scored:
            with self._row_adapters(self.model, [adapters[i] for i in scored]) if self.adapters else nullcontext():
                scores = self._score([rows[i] for i in scored], [new[i] for i in scored],
                                     [owners[i][0].logprobs for i in scored], [owners[i][0].echo for i in scored])
            for i, score in zip(scored, scores, strict=True):
                choices[i].scores = score
        return list(zip(owners, choices, strict=True))

    def _choice(self, ids: list[int], end: Ending, stop: list[str]) -> Choice:
        text = cut_at_stop(self.decode(ids), stop)
        return Choice(text=text, ids=ids, finish_reason="length" if end == "length" else "stop")

    def _score(self, prompts: list[list[int]], completions: list[list[int]], tops: list[int],
               echoes: list[bool]) -> list[TokenScores]:
        """Teacher-forced log-probs of each row's completion (and prompt, where ``echoes``), one forward pass for
        the batch: ``logits`` [B, T, V] -> log-softmax over V at each scored position (raw logits, temperature 1).
        """
        if self.seq2seq:  # the decoder predicts completion token t from [start] + completion[:t]
            enc, enc_mask = (t.to(self.model.device) for t in pad_rows(prompts, self.pad_id))
            start = decoder_start_id(self.model, self.pad_id)
            dec, _ = pad_rows([[start, *c[:-1]] for c in completions], self.pad_id)
            logits = self.model(input_ids=enc, attention_mask=enc_mask,
                                decoder_input_ids=dec.to(self.model.device)).logits
            spans = [(c, 0, 0) for c in completions]  # (scored ids, first logit row, prompt tokens)
        else:  # position p's logits predict token p + 1 of prompt + completion
            seqs = [p + c for p, c in zip(prompts, completions, strict=True)]
            ids, mask = (t.to(self.model.device) for t in pad_rows(seqs, self.pad_id))
            logits = self.model(input_ids=ids, attention_mask=mask).logits
            spans = [(s if echo else c, 0 if echo else len(p) - 1, len(p) if echo else 0)
                     for s, p, c, echo in zip(seqs, prompts, completions, echoes, strict=True)]
        out = []
        for row, ((targets, first, prompt_tokens), top, echo) in enumerate(zip(spans, tops, echoes, strict=True)):
            lead = 1 if echo and not self.seq2seq else 0  # the first prompt token: nothing predicts it
            n = len(targets) - lead
            logprobs: list[float | None] = [None] * lead
            alternatives: list[list[tuple[int, float]]] = [[] for _ in range(lead)]
            if n > 0:
                logp = logits[row, first:first + n].float().log_softmax(dim=-1)  # [n, V]
                target = torch.tensor(targets[lead:], device=logp.device)
                logprobs += logp.gather(1, target[:, None])[:, 0].tolist()
                if top:
                    values, indices = logp.topk(min(top, logp.size(-1)), dim=-1)
                    alternatives += [list(zip(i, v, strict=True)) for i, v in zip(indices.tolist(), values.tolist(),
                                                                                   strict=True)]
                else:
                    alternatives += [[] for _ in range(n)]
            out.append(TokenScores(ids=list(targets), logprobs=logprobs, top=alternatives,
                                   prompt_tokens=prompt_tokens))
        return out

    def token_texts(self, ids: list[int], alternatives: list[list[int]] | None = None, before: list[int] = (),
                    context: int = 6) -> tuple[list[str], list[list[str]]]:
        """The text each of ``ids`` adds after the tokens before it (its piece of ``decode(before + ids)``), and
        the text each alternative ``alternatives[i][k]`` would add in its place.

        Decoded with up to ``context`` tokens before it (from ``before`` too), since a token's text may depend on
        its neighbours (a SentencePiece word start is a space except at the start of the text); a special token
        adds "". A token that ends inside a UTF-8 character shows U+FFFD.
        """
        def piece(head_ids: list[int], token: int) -> str:
            head = self.tokenizer.decode(head_ids, skip_special_tokens=True)
            full = self.tokenizer.decode([*head_ids, token], skip_special_tokens=True)
            if full.startswith(head):
                return full[len(head):]
            return self.tokenizer.decode([token], skip_special_tokens=True)

        every = [*before, *ids]
        with self._tokenizer_lock:
            texts, alts = [], []
            for i, token in enumerate(ids):
                at = len(before) + i
                head_ids = every[max(0, at - context):at]
                texts.append(piece(head_ids, token))
                alts.append([piece(head_ids, a) for a in (alternatives[i] if alternatives else [])])
        return texts, alts
