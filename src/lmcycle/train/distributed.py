"""Data-parallel training across processes started by ``torchrun`` (gloo on CPU, nccl on GPU).

Outside ``torchrun`` every helper is a no-op for a world of one process, so the same training code runs in both.
The engines that compute gradients across ranks (DDP, FSDP2) are in :mod:`lmcycle.train.engines`.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def init_distributed() -> tuple[int, int]:
    """Join the process group described by torchrun's environment; return ``(rank, world_size)``.

    Without ``WORLD_SIZE`` > 1 in the environment this does nothing and returns ``(0, 1)``.
    """
    world = launch_world_size()
    if world > 1 and not is_distributed():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return rank(), world_size()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Only the main process (rank 0) writes models, reports and logs (every rank writes its own part of a
    checkpoint: :mod:`lmcycle.train.checkpoint`)."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(value: float | int | torch.Tensor) -> float | int | torch.Tensor:
    """Sum a number or a tensor over all ranks (returns the same kind it got; a tensor is not modified)."""
    if not is_distributed():
        return value
    if isinstance(value, torch.Tensor):
        out = value.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out
    t = torch.tensor(float(value), dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return int(t.item()) if isinstance(value, int) else t.item()


def _collective_device() -> torch.device:
    """Where a tensor built for a collective must live: NCCL reduces CUDA tensors only, gloo CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def launch_world_size() -> int:
    """The number of processes torchrun started (its ``WORLD_SIZE``), known before any process group exists:
    what a config checks its batch sizes against when it loads."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def all_gather_object(obj) -> list:
    """Every rank's ``obj``, in rank order (``[obj]`` outside torchrun)."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank (any picklable object; ``obj`` itself outside torchrun)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_params_(model: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank, so all replicas start identical."""
    if not is_distributed():
        return
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if not t.is_meta:  # an empty weight is read from its checkpoint by every rank alike
                dist.broadcast(t.data, src=0)
