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

import functools
import math
import random
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, ValidationInfo, field_validator
from torch import nn
from tqdm.auto import tqdm

from lmcycle.config import Config
from lmcycle.errors import LmcycleError
from lmcycle.models.load import forward_accepts
from lmcycle.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from lmcycle.train.distributed import (
    all_reduce_grads_,
    all_reduce_sum,
    barrier,
    broadcast_params_,
    is_main,
    rank,
    world_size,
)
from lmcycle.train.schedule import lr_at

Batch = dict[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, int]]


class StopTraining(Exception):
    """Raised by ``batch_at`` to end training early (e.g. an RL guard's alarm): the loop checkpoints the steps
    done so far and returns normally. The message is the reason."""


class TrainConfig(Config):
    """How to optimise: steps, batch, AdamW, warmup+cosine schedule, clipping, eval/save/log cadence."""

    max_steps: int = Field(ge=1)
    batch_size: int = Field(8, ge=1, description="micro-batch size per rank")
    grad_accum: int = Field(1, ge=1)
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

    @field_validator("warmup_steps")
    @classmethod
    def _warmup_within_run(cls, warmup: int, info: ValidationInfo) -> int:
        # A warmup longer than the run never reaches the configured lr: almost surely a max_steps cut short.
        max_steps = info.data.get("max_steps")
        if max_steps is not None and warmup > max_steps:
            raise ValueError(f"warmup_steps ({warmup}) is more than max_steps ({max_steps})")
        return warmup


@dataclass
class TrainResult:
    step: int  # optimizer steps done in total (including those of a resumed-from run)
    losses: list[float]  # the loss of every step 0..step-1
    wall_time: float  # seconds spent in this call
    tokens_per_s: float  # target tokens (the ones the loss covers, all ranks) per second in this call
    peak_rss_mb: float  # peak resident memory of this process during this call (Linux; else process-wide)
    rss_growth_mb: float  # peak_rss_mb minus the resident memory when training started: what training added
    eval: dict[str, float] = field(default_factory=dict)  # the last eval_fn result


def train(model: nn.Module, batch_at: Callable[[int], list[Batch]], loss_fn: LossFn, cfg: TrainConfig,
          out_dir: str | Path, log: Callable[..., None], eval_fn: Callable[[nn.Module], dict] | None = None,
          params: list[nn.Parameter] | None = None, desc: str = "train") -> TrainResult:
    """Train ``model`` in place for ``cfg.max_steps`` optimizer steps; resume from ``out_dir/checkpoints``.

    ``params`` restricts training to those parameters (default: every parameter that requires grad).
    Only rank 0 calls ``log`` and writes checkpoints. A non-finite loss or gradient norm raises
    :class:`LmcycleError` before the optimizer step and without saving, so the last checkpoint stays good.
    """
    params = params if params is not None else [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg)
    if cfg.seed is not None:
        seed_everything(cfg.seed)
    broadcast_params_(model)
    start, losses = resume(out_dir, model, optimizer)
    model.train()
    reset_peak_rss()
    rss_start = peak_rss_mb()

    last_eval: dict[str, float] = {}
    tokens_seen, started, window, end = 0, time.perf_counter(), [], cfg.max_steps
    with tqdm(total=cfg.max_steps, initial=start, desc=desc, disable=None if is_main() else True,
              file=sys.stderr, dynamic_ncols=True) as bar:
        for step in range(start, cfg.max_steps):
            lr = set_lr(optimizer, lr_at(step, lr=cfg.lr, max_steps=cfg.max_steps, warmup_steps=cfg.warmup_steps,
                                         min_lr_ratio=cfg.min_lr_ratio))
            try:
                micro_batches = batch_at(step)
            except StopTraining:
                end = step
                if is_main() and step > start:
                    save_checkpoint(out_dir, step, model, optimizer, {"losses": losses, "lr": lr},
                                    keep=cfg.keep_checkpoints)
                break
            loss, n_tokens = compute_gradients(model, micro_batches, loss_fn, params, bf16=cfg.bf16)
            grad_norm = clip_gradients(params, cfg.max_grad_norm)
            check_finite(step, loss, grad_norm, cfg, out_dir)
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
            if is_main() and eval_fn is not None and due(done, cfg.eval_every, cfg.max_steps):
                last_eval = evaluate(model, eval_fn)
                log(step=done, **last_eval)
            if is_main() and due(done, cfg.save_every, cfg.max_steps):
                save_checkpoint(out_dir, done, model, optimizer, {"losses": losses, "lr": lr},
                                keep=cfg.keep_checkpoints)
    barrier()  # no rank returns before rank 0 has written the final checkpoint

    wall = time.perf_counter() - started
    return TrainResult(step=max(start, end),
                       losses=losses, wall_time=wall, tokens_per_s=tokens_seen / max(wall, 1e-9),
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


def resume(out_dir: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, list[float]]:
    """Load the newest checkpoint under ``out_dir`` if there is one; return ``(steps done, losses so far)``.

    Every rank loads the same checkpoint, so every rank continues from rank 0's random state too.
    """
    path = latest_checkpoint(out_dir)
    if path is None:
        return 0, []
    try:
        state = load_checkpoint(path, model, optimizer)
    except (RuntimeError, ValueError, KeyError, OSError) as e:
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LmcycleError(f"cannot resume from this checkpoint ({first_line}); it was written for another "
                           "model or settings: delete it or train into another run directory", file=path) from None
    return int(state["step"]), [float(x) for x in state.get("losses", [])]


# -- one step ----------------------------------------------------------------------------------------------------


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> float:
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def compute_gradients(model: nn.Module, micro_batches: list[Batch], loss_fn: LossFn, params: list[nn.Parameter],
                      bf16: bool = False) -> tuple[float, int]:
    """Accumulate into ``p.grad`` the gradient of (summed loss / token count) over all micro-batches and ranks.

    Each micro-batch backpropagates its *summed* loss; the sum of gradients is then divided once by the total
    token count, so the result equals the gradient of the token-mean loss of the concatenated batch.
    Returns ``(mean loss per token, total tokens)`` over all ranks.
    """
    device = next(model.parameters()).device
    loss_total = torch.zeros((), dtype=torch.float64)
    tokens = 0
    for batch in micro_batches:
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            loss_sum, n_tokens = loss_fn(model, batch)
        if loss_sum.requires_grad:
            loss_sum.float().backward()
        loss_total += loss_sum.detach().double().cpu()
        tokens += int(n_tokens)
    all_reduce_grads_(params)
    tokens = int(all_reduce_sum(tokens))
    loss_total = all_reduce_sum(loss_total)
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        torch._foreach_mul_(grads, 1.0 / max(tokens, 1))  # one fused kernel instead of one per parameter
    return float(loss_total) / max(tokens, 1), tokens


def clip_gradients(params: list[nn.Parameter], max_norm: float | None) -> float:
    """Clip the global gradient norm to ``max_norm`` (None: no clipping); return the norm before clipping."""
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.nn.utils.clip_grad_norm_(grads, max_norm if max_norm is not None else math.inf))


def check_finite(step: int, loss: float, grad_norm: float, cfg: TrainConfig, out_dir: str | Path) -> None:
    """Stop on a NaN/Inf loss or gradient before it reaches the weights (nothing is saved for this step)."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    last = latest_checkpoint(out_dir)
    raise LmcycleError(
        f"training diverged at step {step + 1}: loss={loss}, gradient norm={grad_norm}; lower the learning "
        f"rate (it is {cfg.lr:g}) or set max_grad_norm; nothing was saved for this step, the last good "
        f"checkpoint is {last if last else 'none (no checkpoint was written yet)'}", field="train.lr")


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
