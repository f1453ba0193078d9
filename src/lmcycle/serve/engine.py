"""The model side of the server: one base model with its LoRA adapters, driven by one worker thread.

Requests go into a bounded queue. The worker takes the first waiting request, then whatever else arrives
within ``batch_wait_s`` (up to ``max_batch`` sequences), groups them by decoding setting and runs one batched
decode per group (``generate.decode_batch``), so that each new token can be streamed (``Job.on_token``) and a
cancelled request stops taking part in the batch at the next step.
The LoRA layers hold every adapter at once. A batch may mix adapters (and the base): with
``lora.per_row_adapters`` each row gets its own adapter's update inside one forward pass, the base weights
running once for the whole batch.

Choice ``j`` of a request samples from ``prompt_generator(seed, j)``, exactly like prompt ``j`` of
``generate([prompt] * n, cfg)``: the output does not depend on which other requests share the batch.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmcycle.errors import LmcycleError
from lmcycle.models.generate import (
    DecodingConfig,
    Ending,
    cut_at_stop,
    decode_batch,
    eos_ids,
    pad_id_of,
    prompt_generator,
    stop_window,
)
from lmcycle.models.load import context_window, load_model


class QueueFull(Exception):
    """The request queue is at its bound: the server answers 429."""


@dataclass
class Job:
    """One request: its prompt's token ids, decoded ``n`` times with ``cfg`` and the adapter (None = base).

    ``on_token(choice_index, token_id)`` is called from the worker thread for every new token (EOS excluded).
    Setting ``cancelled`` stops the request's decoding; its future then holds the choices so far.
    """

    ids: list[int]
    n: int
    adapter: str | None
    cfg: DecodingConfig
    on_token: Callable[[int, int], None] | None = None
    first_index: int = 0  # choice j samples like prompt first_index + j of generate (a list of prompts)
    future: Future = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class Choice:
    text: str
    ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) | "length"


class Engine:
    """Loads the base and adapters once; ``submit`` a :class:`Job`, wait on its future for its choices."""

    def __init__(self, model_dir: str, adapters: dict[str, str] | None = None, *, device: str = "cpu",
                 max_batch: int = 8, batch_wait_s: float = 0.01, max_queue: int = 64):
        from lmcycle.adapt.lora import load_lora, per_row_adapters, set_active_adapter

        for value, name in ((max_batch, "max_batch"), (max_queue, "max_queue")):
            if value < 1:
                raise LmcycleError(f"{name} must be at least 1, got {value}", field=name)

        self.model, self.tokenizer = load_model(model_dir, device=device)
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
        self.eos = eos_ids(self.model, self.tokenizer)
        self.pad_id = pad_id_of(self.tokenizer)
        self.max_batch, self.batch_wait_s = max_batch, batch_wait_s
        self.queue: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
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
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise QueueFull from None
        return job.future

    def close(self) -> None:
        """Stop the worker after its current batch (waiting requests are not answered)."""
        self._stop.set()
        self._worker.join(timeout=10)

    # -- worker ---------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                first = self.queue.get(timeout=0.1)
            except queue.Empty:
                continue
            jobs, rows = [first], first.n
            deadline = time.monotonic() + self.batch_wait_s
            while rows < self.max_batch:
                try:
                    job = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                jobs.append(job)
                rows += job.n
            self._run(jobs)

    def _run(self, jobs: list[Job]) -> None:
        groups: dict[tuple, list[Job]] = defaultdict(list)
        for job in jobs:
            if job.cancelled.is_set():
                job.future.cancel()
                continue
            if not job.future.set_running_or_notify_cancel():
                continue
            settings = job.cfg.model_dump(exclude={"seed", "batch_size"})
            groups[repr(sorted(settings.items()))].append(job)
        for group in groups.values():
            try:
                results = self._decode(group)
            except Exception as e:  # a failure answers this group's requests; the worker keeps serving
                for job in group:
                    job.future.set_exception(e)
                continue
            for job, choices in zip(group, results, strict=True):
                job.future.set_result(choices)

    @torch.no_grad()
    def _decode(self, group: list[Job]) -> list[list[Choice]]:
        """Decode every choice of ``group`` (same settings, any adapters) as one batch: ``rows`` (batch, prompt)."""
        cfg = group[0].cfg
        # Rows sorted by adapter: each adapter's LoRA update then runs on a contiguous slice of the batch.
        order = sorted(group, key=lambda job: job.adapter or "")
        owners = [(job, j) for job in order for j in range(job.n)]
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
        with self._row_adapters(self.model, adapters) if self.adapters else nullcontext():
            new, ends = decode_batch(self.model, rows, generators, cfg, self.pad_id, self.eos, self.decode,
                                     stop_window(cfg.stop), on_token=on_token, cancelled=cancelled)
        self.batches_run += 1
        choices: dict[int, list[Choice]] = {}
        k = 0
        for job in order:
            choices[id(job)] = [self._choice(new[k + j], ends[k + j], cfg.stop) for j in range(job.n)]
            k += job.n
        return [choices[id(job)] for job in group]

    def _choice(self, ids: list[int], end: Ending, stop: list[str]) -> Choice:
        text = cut_at_stop(self.decode(ids), stop)
        return Choice(text=text, ids=ids, finish_reason="length" if end == "length" else "stop")
