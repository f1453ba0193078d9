"""The one training loop every trainer in lmcycle uses (pre-training, SFT, and the later LoRA/DPO/PPO stages).

:func:`train` is a plain ``for step in range(...)`` loop; each thing it does per step is one small function
below it. What a trainer supplies:

- ``batch_at(step) -> list[dict[str, Tensor]]``: the micro-batches of optimizer step ``step`` for this rank. It
  must depend on ``step`` only (see :func:`micro_batch_indices`), which is what makes a resumed run exact.
- ``loss_fn(model, batch) -> (loss_sum, n_tokens)``: the loss *summed* over the batch's tokens and how many
  tokens that is. The loop divides the gradient by the token count of all micro-batches on all ranks, so
  gradient accumulation and data parallelism give the gradient of one big batch (a mean of per-batch means
  would weigh a token in a short batch more than one in a long batch).
- ``eval_fn(model) -> dict[str, float]`` (optional), called in eval mode every ``eval_every`` steps and after the
  last step.
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, ValidationInfo, field_validator, model_validator
from torch import nn
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm

from lmcycle.config import Config
from lmcycle.errors import LmcycleError
from lmcycle.models.load import forward_accepts
from lmcycle.train.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    remove_unfinished_saves,
    save_checkpoint,
    set_aside_checkpoints_after,
)
from lmcycle.train.distributed import (
    all_reduce_sum,
    barrier,
    broadcast_params_,
    is_main,
    launch_world_size,
    rank,
    world_size,
)
from lmcycle.train.engines import DistributedConfig, LocalEngine, build_engine
from lmcycle.train.memory import activation_checkpointing
from lmcycle.train.schedule import lr_at

Batch = dict[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, int]]


class StopTraining(Exception):
    """Raised by ``batch_at`` to end training early (e.g. an RL guard's alarm): the loop checkpoints the steps
    done so far and returns normally. The message is the reason."""


class TrainConfig(Config):
    """How to optimise: steps, batch, AdamW, warmup+cosine schedule, clipping, eval/save/log cadence, and the
    guards: the loss-spike check and the refusal to resume with other settings."""

    max_steps: int = Field(ge=1)
    batch_size: int = Field(8, ge=1, description="micro-batch size per rank")
    grad_accum: int = Field(1, ge=1)
    global_batch_size: int | None = Field(None, ge=1, description="examples per optimizer step over all ranks: "
                                          "grad_accum becomes this / (batch_size x ranks), so the same recipe "
                                          "trains the same way on any number of ranks")
    lr: float = Field(3e-4, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    max_grad_norm: float | None = Field(1.0, gt=0)
    bf16: bool = False
    eval_every: int = Field(0, ge=0, description="0: evaluate after the last step only")
    save_every: int = Field(0, ge=0, description="0: checkpoint after the last step only")
    log_every: int = Field(10, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    seed: int | None = None
    spike_factor: float | None = Field(4.0, gt=1, description="stop when a loss exceeds this many times the "
                                       "median of the last spike_window steps (null: no spike check)")
    spike_window: int = Field(20, ge=2)
    spike_patience: int = Field(3, ge=1, description="consecutive spiking steps before the run stops: one bad "
                                "batch of a noisy loss (a classifier's, a reward model's) is no divergence")
    force_resume: bool = Field(False, description="resume even from a checkpoint written with other settings")
    activation_checkpointing: bool = Field(False, description="keep only each transformer block's inputs and "
                                           "recompute its activations in backward (train/memory.py): less "
                                           "memory for about one more forward pass per step")
    distributed: DistributedConfig = Field(default_factory=DistributedConfig,
                                           description="the engine under torchrun (set by the recipe's "
                                           "distributed: section)")

    @field_validator("warmup_steps")
    @classmethod
    def _warmup_within_run(cls, warmup: int, info: ValidationInfo) -> int:
        # A warmup longer than the run never reaches the configured lr: almost surely a max_steps cut short.
        max_steps = info.data.get("max_steps")
        if max_steps is not None and warmup > max_steps:
            raise ValueError(f"warmup_steps ({warmup}) is more than max_steps ({max_steps})")
        return warmup

    @field_validator("global_batch_size")
    @classmethod
    def _divisible_over_the_ranks(cls, global_batch: int | None, info: ValidationInfo) -> int | None:
        batch_size, world = info.data.get("batch_size"), launch_world_size()
        if global_batch is not None and batch_size is not None and global_batch % (batch_size * world):
            raise ValueError(f"global_batch_size {global_batch} is not a multiple of batch_size {batch_size} x "
                             f"{world} rank(s) = {batch_size * world}")
        return global_batch

    @model_validator(mode="after")
    def _accumulate_to_global_batch(self) -> TrainConfig:
        if self.global_batch_size is None:
            return self
        world = launch_world_size()
        accum = self.global_batch_size // (self.batch_size * world)
        if "grad_accum" in self.model_fields_set and self.grad_accum != accum:
            raise ValueError(f"grad_accum {self.grad_accum} contradicts global_batch_size {self.global_batch_size}"
                             f" (= batch_size {self.batch_size} x {world} rank(s) x {accum}): set only one")
        self.__dict__["grad_accum"] = accum  # not setattr: validate_assignment would run this validator again
        return self


# Settings that change no number the training computes: a resumed run may change them freely.
CADENCE_FIELDS = frozenset({"eval_every", "save_every", "log_every", "keep_checkpoints", "spike_factor",
                            "spike_window", "spike_patience", "force_resume"})
# Settings that change how much memory a step takes, not what it computes: a run that ran out of memory may resume
# with them changed (and checkpoints written before they existed still resume).
MEMORY_FIELDS = frozenset({"activation_checkpointing", "distributed"})
# How the global batch is split (per rank, per micro-batch) changes no number but the rounding: a run saved on 2
# ranks resumes on 1 or 8 when the global batch (batch_size x grad_accum x ranks) stays the same.
SPLIT_FIELDS = frozenset({"batch_size", "grad_accum", "global_batch_size"})
# A loss near zero that quadruples is noise of a nearly learned task, not divergence: a spike must also rise
# by this many nats over the median.
SPIKE_MIN_RISE = 1.0


@dataclass
class TrainResult:
    step: int  # optimizer steps done in total (including those of a resumed-from run)
    losses: list[float]  # the loss of every step 0..step-1
    wall_time: float  # seconds the steps 0..step-1 took, summed over the attempts of a resumed run
    tokens_per_s: float  # target tokens (the ones the loss covers, all ranks) of those steps per second
    peak_rss_mb: float  # peak resident memory of this process during this call (Linux; else process-wide)
    rss_growth_mb: float  # peak_rss_mb minus the resident memory when training started: what training added
    eval: dict[str, float] = field(default_factory=dict)  # the last eval_fn result


@dataclass
class Progress:
    """What a checkpoint carries to the next attempt besides weights, optimizer and random states."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    elapsed: float = 0.0  # seconds the checkpoint's steps took, over all attempts
    tokens: int = 0  # target tokens of those steps


def train(model: nn.Module, batch_at: Callable[[int], list[Batch]], loss_fn: LossFn, cfg: TrainConfig,
          out_dir: str | Path, log: Callable[..., None], eval_fn: Callable[[nn.Module], dict] | None = None,
          params: list[nn.Parameter] | None = None, desc: str = "train",
          batch_needs_model: Callable[[int], bool] | None = None) -> TrainResult:
    """Train ``model`` in place for ``cfg.max_steps`` optimizer steps; resume from ``out_dir/checkpoints``.

    ``params`` restricts training to those parameters (default: every parameter that requires grad).
    Under ``torchrun`` the engine of ``cfg.distributed`` computes the gradients (:mod:`lmcycle.train.engines`);
    ``batch_needs_model(step)`` says whether ``batch_at(step)`` runs ``model`` itself (PPO's rollouts), so that
    a sharding engine gathers the weights for it; ``eval_fn`` always gets the whole model. Every rank writes its
    part of each checkpoint; only rank 0 calls ``log``. A non-finite loss or gradient norm, or a loss spike
    (see :func:`check_spike`), raises :class:`LmcycleError` before the optimizer step and without saving; the
    checkpoints written after the loss began to rise are set aside, so the newest one left is good.
    The first row logged is ``event="train_start"`` with the steps already done (see :meth:`RunContext.log`).
    When it returns, ``model`` holds the trained weights on every rank, whatever the engine.
    """
    params = params if params is not None else [p for p in model.parameters() if p.requires_grad]
    if cfg.seed is not None:
        seed_everything(cfg.seed)
    broadcast_params_(model)
    engine = build_engine(model, params, cfg.distributed, cfg.bf16)
    optimizer = make_optimizer(engine.params, cfg)
    if is_main():
        remove_unfinished_saves(out_dir)
    done_before = resume(out_dir, engine.state_model, optimizer, cfg)
    start, losses = done_before.step, done_before.losses
    if is_main():
        log(event="train_start", step=start)
    engine.compute_model.train()
    reset_peak_rss()
    rss_start = peak_rss_mb()

    last_eval: dict[str, float] = {}
    tokens_seen, started, window, end = 0, time.perf_counter(), [], cfg.max_steps

    def progress(steps: int) -> Progress:
        return Progress(steps, losses, done_before.elapsed + time.perf_counter() - started,
                        done_before.tokens + tokens_seen)

    # Checkpointing is undone when the loop ends, so the trainer gets its model back as it gave it.
    with (activation_checkpointing(engine.compute_model, cfg.activation_checkpointing),
          tqdm(total=cfg.max_steps, initial=start, desc=desc, disable=None if is_main() else True,
               file=sys.stderr, dynamic_ncols=True) as bar):
        for step in range(start, cfg.max_steps):
            lr = set_lr(optimizer, lr_at(step, lr=cfg.lr, max_steps=cfg.max_steps, warmup_steps=cfg.warmup_steps,
                                         min_lr_ratio=cfg.min_lr_ratio))
            try:
                uses_model = batch_needs_model is not None and (step == start or batch_needs_model(step))
                with engine.full_model() if uses_model else contextlib.nullcontext():
                    micro_batches = batch_at(step)
            except StopTraining:
                end = step
                if step > start:
                    checkpoint(out_dir, progress(step), engine.state_model, optimizer, cfg, lr)
                break
            loss, n_tokens = compute_gradients(engine, micro_batches, loss_fn, bf16=cfg.bf16)
            grad_norm = clip_gradients(engine.params, cfg.max_grad_norm)
            check_finite(step, loss, grad_norm, losses, cfg, out_dir)
            check_spike(step, loss, losses, cfg, out_dir)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            done = step + 1
            losses.append(loss)
            window.append(loss)
            tokens_seen += n_tokens
            tokens_per_s = tokens_seen / max(time.perf_counter() - started, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
            if is_main() and due(done, cfg.log_every, cfg.max_steps):
                # The logged loss is the mean over the steps since the previous log line.
                log(step=done, loss=sum(window) / len(window), lr=lr, grad_norm=grad_norm,
                    tokens_per_s=round(tokens_per_s, 1))
                window = []
            if eval_fn is not None and due(done, cfg.eval_every, cfg.max_steps):
                with engine.full_model():  # a collective under FSDP: every rank gathers, rank 0 evaluates
                    if is_main():
                        last_eval = evaluate(model, eval_fn)
                        log(step=done, **last_eval)
            if due(done, cfg.save_every, cfg.max_steps):
                checkpoint(out_dir, progress(done), engine.state_model, optimizer, cfg, lr)
    engine.finish()
    barrier()  # no rank returns before every rank has its trained weights and the last checkpoint is written

    total = progress(max(start, end))
    return TrainResult(step=total.step, losses=losses, wall_time=total.elapsed,
                       tokens_per_s=total.tokens / max(total.elapsed, 1e-9),
                       peak_rss_mb=peak_rss_mb(), rss_growth_mb=peak_rss_mb() - rss_start, eval=last_eval)


# -- setup -------------------------------------------------------------------------------------------------------


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: biases and norm gains (1-D tensors) are not decayed."""
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel (one pass over all tensors, CPU and CUDA) is what HF Trainer's default optimizer uses too;
    # it saves ~14 ms of a ~705 ms step against the default per-tensor loop on the ~10M model (BENCHMARKS.md).
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas, fused=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resume(out_dir: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
           cfg: TrainConfig) -> Progress:
    """Load the newest checkpoint under ``out_dir`` if there is one and return its :class:`Progress`.

    Every rank loads the same checkpoint, so every rank continues from rank 0's random state too. A checkpoint
    written with other settings (see :func:`resume_settings`) is refused unless ``cfg.force_resume``; only
    ``max_steps`` may grow when the checkpoint is of a finished run.
    """
    path = latest_checkpoint(out_dir)
    if path is None:
        return Progress()
    try:
        state = load_checkpoint(path, model, optimizer)
    except (CheckpointException, RuntimeError, ValueError, KeyError, OSError) as e:
        if isinstance(e, CheckpointException) and e.failures:  # its own message only lists the ranks
            e = next(iter(e.failures.values()))[0]
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LmcycleError(f"cannot resume from this checkpoint ({first_line}); it was written for another "
                           "model or settings: delete it or train into another run directory", file=path) from None
    if "settings" in state and not cfg.force_resume:  # checkpoints of older versions carry no settings
        saved = state["settings"]
        if int(state["step"]) >= saved["max_steps"]:  # a finished run may be extended: max_steps may grow
            saved = {**saved, "max_steps": max(saved["max_steps"], cfg.max_steps)}
        check_same_settings(saved, resume_settings(cfg), path)
    return Progress(int(state["step"]), [float(x) for x in state.get("losses", [])],
                    float(state.get("elapsed", 0.0)), int(state.get("tokens", 0)))


def resume_settings(cfg: TrainConfig) -> dict:
    """The settings a resumed run must share with its checkpoint: every one that changes what is computed, with
    the global batch in place of how it is split over ranks and micro-batches."""
    settings = cfg.model_dump(mode="json", exclude=set(CADENCE_FIELDS | MEMORY_FIELDS | SPLIT_FIELDS))
    return {**settings, "global_batch_size": cfg.batch_size * cfg.grad_accum * world_size()}


def check_same_settings(saved: dict, now: dict, path: Path) -> None:
    """Refuse to continue a run with other settings than its checkpoint's, naming each change."""
    changed = [k for k in sorted(saved.keys() | now.keys()) if saved.get(k) != now.get(k)]
    if changed:
        diffs = ", ".join(f"train.{k} {_setting(saved.get(k))} → {_setting(now.get(k))}" for k in changed)
        raise LmcycleError(f"this checkpoint was written with other settings ({diffs}): restore them, train "
                           "into another run directory, or set train.force_resume: true to continue with the "
                           "new ones", file=path, field=f"train.{changed[0]}")


def _setting(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return "unset" if value is None else str(value)


def checkpoint(out_dir: str | Path, progress: Progress, model: nn.Module, optimizer: torch.optim.Optimizer,
               cfg: TrainConfig, lr: float) -> None:
    """Save a checkpoint of ``progress.step`` steps with what :func:`resume` needs to continue from it."""
    last = len(progress.losses) - 1
    state = {"losses": progress.losses, "lr": lr, "elapsed": progress.elapsed, "tokens": progress.tokens,
             "settings": resume_settings(cfg), "steady": last < 0 or not rising(progress.losses, last, cfg)}
    save_checkpoint(out_dir, progress.step, model, optimizer, state, keep=cfg.keep_checkpoints)


# -- one step ----------------------------------------------------------------------------------------------------


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> float:
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def compute_gradients(engine: LocalEngine, micro_batches: list[Batch], loss_fn: LossFn,
                      bf16: bool = False) -> tuple[float, int]:
    """Accumulate into ``engine.params``' ``.grad`` the gradient of (summed loss / token count) over all
    micro-batches and ranks.

    Each micro-batch backpropagates its *summed* loss through ``engine`` (which syncs gradients across ranks
    after the last one); the sum of gradients is then divided once by the total token count, so the result
    equals the gradient of the token-mean loss of the concatenated batch. Returns ``(mean loss per token, total
    tokens)`` over all ranks.
    """
    device = engine.device
    # Summed on the model's device: a .cpu() per micro-batch would wait for every CUDA step to finish.
    loss_total = torch.zeros((), dtype=torch.float64, device=device)
    tokens = 0
    for i, batch in enumerate(micro_batches):
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        with engine.accumulating(last=i == len(micro_batches) - 1):
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
                loss_sum, n_tokens = engine.forward(loss_fn, batch)
            if loss_sum.requires_grad:
                loss_sum.float().backward()
        loss_total += loss_sum.detach().double().to(device)
        tokens += int(n_tokens)
    tokens = int(all_reduce_sum(tokens))
    loss_total = all_reduce_sum(loss_total)
    grads = [p.grad for p in engine.params if p.grad is not None]
    if grads:
        # The engine averaged over ranks (grad_divisor); undo that and divide the sum by the tokens, in one fused
        # kernel instead of one per parameter.
        torch._foreach_mul_(grads, engine.grad_divisor / max(tokens, 1))
    return float(loss_total) / max(tokens, 1), tokens


def clip_gradients(params: list[nn.Parameter], max_norm: float | None) -> float:
    """Clip the global gradient norm to ``max_norm`` (None: no clipping); return the norm before clipping."""
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(grads, max_norm if max_norm is not None else math.inf)
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)  # FSDP: a norm over all shards


def check_finite(step: int, loss: float, grad_norm: float, losses: list[float], cfg: TrainConfig,
                 out_dir: str | Path) -> None:
    """Stop on a NaN/Inf loss or gradient before it reaches the weights (nothing is saved for this step)."""
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        diverged(step, f"loss={loss}, gradient norm={grad_norm}", losses, cfg, out_dir)


def check_spike(step: int, loss: float, losses: list[float], cfg: TrainConfig, out_dir: str | Path) -> None:
    """Stop when the last ``spike_patience`` losses (``loss`` the last of them) all exceed ``spike_factor`` times
    the median of the ``spike_window`` losses before them, and by :data:`SPIKE_MIN_RISE` nats: a loss that
    climbs stays finite for many steps before it overflows, while one bad batch is soon forgotten."""
    first = step - cfg.spike_patience + 1  # the spike must last spike_patience steps, this one included
    median = running_median(losses, first, cfg.spike_window) if first >= 0 else None
    # A median <= 0 means the loss is no cross-entropy (a PPO objective, say): ratios of it mean nothing.
    if cfg.spike_factor is None or median is None or median <= 0:
        return
    low = min([*losses[first:step], loss])
    if low > cfg.spike_factor * median and low > median + SPIKE_MIN_RISE:
        diverged(step, f"loss {loss:.4g} is {loss / median:.0f}× the median {median:.4g} of the "
                       f"{cfg.spike_window} steps before it began (above {cfg.spike_factor:g}× for "
                       f"{cfg.spike_patience} steps: raise train.spike_factor, or set it to null, if such a loss "
                       "is expected)", losses, cfg, out_dir)


def running_median(losses: list[float], step: int, window: int) -> float | None:
    """Median of the ``window`` losses before step ``step`` (None until there are that many)."""
    return statistics.median(losses[step - window:step]) if step >= window else None


def rising(losses: list[float], step: int, cfg: TrainConfig) -> bool:
    """Whether step ``step``'s loss was above its running median: the steps a spike climbs through."""
    median = running_median(losses, step, cfg.spike_window)
    return cfg.spike_factor is not None and median is not None and losses[step] > median


def diverged(step: int, what: str, losses: list[float], cfg: TrainConfig, out_dir: str | Path) -> None:
    """Raise the divergence error: set aside the checkpoints written after the loss began to rise and name the
    newest one left, with advice worded from the run's own settings."""
    began = step
    while began > 0 and rising(losses, began - 1, cfg):
        began -= 1
    moved = set_aside_checkpoints_after(out_dir, began) if is_main() else []
    last = latest_checkpoint(out_dir)
    where = (f"the loss began to rise at step {began + 1}; " if began < step else "") + (
        f"{len(moved)} checkpoint(s) written since were renamed diverged-step-*; " if moved else "")
    raise LmcycleError(
        f"training diverged at step {step + 1}: {what}; {divergence_advice(cfg)}; nothing was saved for this "
        f"step, {where}the last good checkpoint is "
        f"{last if last else 'none (no checkpoint was written before it)'}", field="train.lr")


def divergence_advice(cfg: TrainConfig) -> str:
    """What to change, from the settings the run had: clipping is only suggested when it is off."""
    settings = f"lr {cfg.lr:g} with {cfg.warmup_steps} warmup steps and " + (
        f"max_grad_norm {cfg.max_grad_norm:g}" if cfg.max_grad_norm is not None else "no gradient clipping")
    tips = "try a lower learning rate or a longer warmup" + (
        " or set max_grad_norm (e.g. 1.0)" if cfg.max_grad_norm is None else "")
    return f"{settings}: {tips}, with train.force_resume: true to resume the checkpoint with the new settings"


def due(done: int, every: int, max_steps: int) -> bool:
    """Whether a periodic action (log, eval, save) runs after ``done`` steps: every ``every`` steps (0: never)
    and always after the last step."""
    return (every > 0 and done % every == 0) or done == max_steps


def evaluate(model: nn.Module, eval_fn: Callable[[nn.Module], dict]) -> dict[str, float]:
    """Run ``eval_fn`` in eval mode without gradients, then put the model back in training mode."""
    model.eval()
    try:
        with torch.no_grad():
            return {k: float(v) for k, v in eval_fn(model).items()}
    finally:
        model.train()


def reset_peak_rss() -> None:
    """Start a new peak-memory window, so that a stage reports its own peak and not an earlier stage's of the
    same process (Linux: writing 5 to /proc/self/clear_refs resets VmHWM; elsewhere nothing happens)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    """Peak resident memory since :func:`reset_peak_rss` (Linux VmHWM), else of the whole process."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    # ru_maxrss is in KiB on Linux and bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


# -- building blocks for trainers ----------------------------------------------------------------------------------


def micro_batch_indices(n_items: int, step: int, batch_size: int, grad_accum: int, seed: int) -> list[list[int]]:
    """Dataset indices of the micro-batches of optimizer step ``step`` for this rank.

    The data is an endless sequence of epochs, each a fresh permutation seeded by ``(seed, epoch)``; step ``s``
    takes the next ``batch_size * grad_accum * world_size`` items of it. Micro-batch ``m`` of rank ``r`` is
    slice ``m * world_size + r`` of that global batch, so however it is split across ranks and micro-batches
    the step sees the same items.
    """
    if n_items <= 0:
        raise LmcycleError("there is no training data (0 examples after encoding)")
    world, me = world_size(), rank()
    global_batch = batch_size * grad_accum * world
    first = step * global_batch
    order = [_epoch_order(n_items, p // n_items, seed)[p % n_items] for p in range(first, first + global_batch)]
    return [order[(m * world + me) * batch_size:(m * world + me + 1) * batch_size] for m in range(grad_accum)]


@functools.lru_cache(maxsize=4)
def _epoch_order(n_items: int, epoch: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n_items, generator=gen).tolist()


def grouped_batch_indices(lengths: list[int], step: int, batch_size: int, grad_accum: int, seed: int,
                          group: int = 50) -> list[list[int]]:
    """Like :func:`micro_batch_indices`, but each global batch holds items of similar length (less padding).

    ``lengths[i]`` is item ``i``'s length (what its batch is padded to). Each epoch starts from the same seeded
    permutation as :func:`micro_batch_indices`, cut into mega-batches of ``group`` global batches; each
    mega-batch is sorted by length (longest first) and cut into global batches, which then come in a seeded
    shuffled order within their mega-batch (the idea of Hugging Face's ``group_by_length``). Every item still
    comes once per epoch, the batches stay random in which lengths they get, and the result depends on
    ``step`` only, so a resumed run is exact. Ranks and micro-batches split a global batch as in
    :func:`micro_batch_indices`. ``group=1`` gives the same global batches as :func:`micro_batch_indices`.
    The one step that straddles two epochs (when ``len(lengths)`` is not a multiple of the global batch) is not
    grouped; the grouping keeps its alignment with the steps in every epoch.
    """
    if group < 1:
        raise LmcycleError(f"group must be at least 1, got {group}", field="group")
    n_items = len(lengths)
    if n_items <= 0:
        raise LmcycleError("there is no training data (0 examples after encoding)")
    world, me = world_size(), rank()
    global_batch = batch_size * grad_accum * world
    first = step * global_batch
    key = tuple(int(x) for x in lengths)
    order = [_grouped_epoch_order(key, p // n_items, seed, global_batch, group)[p % n_items]
             for p in range(first, first + global_batch)]
    return [order[(m * world + me) * batch_size:(m * world + me + 1) * batch_size] for m in range(grad_accum)]


@functools.lru_cache(maxsize=4)
def _grouped_epoch_order(lengths: tuple[int, ...], epoch: int, seed: int, global_batch: int,
                         group: int) -> list[int]:
    n = len(lengths)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=gen).tolist()  # = _epoch_order(n, epoch, seed)
    # When n is not a multiple of the global batch, a step straddles two epochs. The first `head` items of this
    # epoch complete that step and the last `tail` items start the next one; everything between is whole
    # steps, so the grouped batches stay aligned with the steps in every epoch.
    head = min(-epoch * n % global_batch, n)
    tail = (n - head) % global_batch
    order = perm[:head]
    body = perm[head:n - tail]
    mega = global_batch * group
    for start in range(0, len(body), mega):
        chunk = sorted(body[start:start + mega], key=lambda i: -lengths[i])  # stable: ties keep perm order
        batches = [chunk[b:b + global_batch] for b in range(0, len(chunk), global_batch)]
        for b in torch.randperm(len(batches), generator=gen).tolist():
            order.extend(batches[b])
    return order + perm[n - tail:]


def scored_logits(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits [B, K, V], labels [B, K])``: the model's logits at the positions its labels score, each next to
    the token it must predict (ignored positions hold -100).

    ``batch``: ``input_ids`` [B, T], optional ``attention_mask`` [B, T], ``labels``: for a decoder [B, T]
    aligned with ``input_ids`` (position t is predicted from tokens < t; the shift happens here), for an
    encoder-decoder [B, L], the decoder's targets (the decoder input is the labels shifted right).
    """
    labels = batch["labels"]
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}
    # use_cache=False: training never reuses the key/value cache, so building it is wasted work.
    if model.config.is_encoder_decoder:
        decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels=labels)
        return model(**inputs, decoder_input_ids=decoder_input_ids, use_cache=False).logits, labels
    # Shift the labels rather than slicing the logits: slicing [B, T-1, V] would copy all of them.
    labels = F.pad(labels, (0, 1), value=-100)[:, 1:]
    # Only positions that some row is scored at need logits. In SFT the prompt (often most of a sequence)
    # then never goes through the LM head: its FLOPs and its share of the [B, T, V] logits are saved.
    # Pre-training scores every position but the last: there gathering would cost more than it saves.
    keep = (labels != -100).any(0).nonzero().squeeze(1)
    if 0 < keep.numel() < labels.size(1) - 1 and forward_accepts(type(model), "logits_to_keep"):
        return model(**inputs, use_cache=False, logits_to_keep=keep).logits, labels[:, keep]
    return model(**inputs, use_cache=False).logits, labels


def sequence_logps(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Summed log-probability [N] (float32) of each row's label tokens (``labels != -100``) under ``model``.

    ``batch``: ``input_ids`` [N, T], ``attention_mask`` [N, T], ``labels`` ([N, T] aligned with ``input_ids`` for
    a decoder, which predicts position t from tokens < t; [N, L] decoder targets for an encoder-decoder).
    """
    logits, labels = scored_logits(model, batch)
    token_nll = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none")
    return -token_nll.sum(dim=1)  # ignored positions contribute exactly 0


def lm_loss_sum(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over label positions that are not -100, and how many there are
    (``batch`` as for :func:`scored_logits`)."""
    logits, labels = scored_logits(model, batch)
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1),
                           ignore_index=-100, reduction="sum")
    return loss, int((labels != -100).sum())


def mean_token_loss(model: nn.Module, batches: list[Batch], loss_fn: LossFn = lm_loss_sum) -> float:
    """Token-weighted mean loss of ``model`` over ``batches`` (no gradients)."""
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            loss_sum, n = loss_fn(model, {k: v.to(device) for k, v in batch.items()})
            total += float(loss_sum)
            tokens += int(n)
    return total / max(tokens, 1)


def held_out_metrics(model: nn.Module, batches: list[Batch], loss_fn: LossFn = lm_loss_sum) -> dict[str, float]:
    """``eval_loss`` (token-weighted mean) and ``eval_ppl`` = exp(loss) of ``model`` on ``batches``."""
    loss = mean_token_loss(model, batches, loss_fn)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}  # capped: exp overflows past ~709
