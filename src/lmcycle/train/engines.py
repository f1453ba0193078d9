"""The data-parallel engines the training loop runs on under ``torchrun``: torch's DDP and FSDP2, nothing home-made.

A recipe chooses one with ``distributed: {strategy: ddp | fsdp}`` (copied into every stage's
``train.distributed``). One process (no ``torchrun``) uses neither. What each costs:

- ``ddp``: :class:`~torch.nn.parallel.DistributedDataParallel`. Every rank holds the whole model, its gradients
  and the optimizer state; gradients are all-reduced in buckets while backward still runs (overlap), once per
  optimizer step (``no_sync`` for the micro-batches before the last). Fastest when the model fits.
- ``fsdp``: FSDP2 :func:`~torch.distributed.fsdp.fully_shard` on every transformer block, then on the root.
  Each rank keeps 1/N of the weights, gradients and optimizer state; a block's weights are all-gathered just
  before its forward (and again before its backward when ``reshard_after_forward``), its gradients
  reduce-scattered after. That is ~1.5x DDP's communication for ~1/N of its memory. With ``bf16`` the gathered
  weights are bf16 and gradients are reduced in fp32 (``MixedPrecisionPolicy``). ``replicas: R`` makes it HSDP:
  a 2-D mesh that replicates over R groups (e.g. nodes) and shards within each group of ``world / R`` ranks, so
  the all-gathers stay inside a node.

Both wrap :class:`Apply`, whose forward is the trainer's whole ``loss_fn(model, batch)``: a loss that calls the
model several times, or calls its sub-modules (a value head, a reward head), still runs inside the engine's
forward, which is what DDP and FSDP need to see.

FSDP shards a *shadow* of the trainer's model: a copy of its module tree whose parameters start as views of the
trainer's and are then sharded, while the trainer's own parameters are emptied to free their memory. The
trainer's model is left unwrapped: whenever it is needed whole (evaluation, PPO's rollouts, the end of
training) :meth:`FsdpEngine.full_model` gathers the weights into it (one all-gather per use, not one per layer
per decoding step), and :meth:`FsdpEngine.finish` leaves them there, so the trainer saves and uses its model
as if there had been no FSDP. Buffers (rotary tables, PPO's β) are shared, never copied.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from lmcycle.config import Config
from lmcycle.errors import LmcycleError
from lmcycle.train.distributed import is_distributed, world_size
from lmcycle.train.memory import transformer_blocks


class DistributedConfig(Config):
    """Which engine trains under ``torchrun`` and how (ignored in one process)."""

    strategy: Literal["ddp", "fsdp"] = Field("ddp", description="ddp: replicate the model, all-reduce gradients; "
                                             "fsdp: shard weights, gradients and optimizer state (FSDP2)")
    reshard_after_forward: bool = Field(True, description="fsdp: free each block's gathered weights after its "
                                        "forward and gather them again for backward (less memory, more traffic)")
    cpu_offload: bool = Field(False, description="fsdp: keep the sharded weights, gradients and optimizer state "
                              "in CPU memory (CUDA only)")
    replicas: int = Field(1, ge=1, description="fsdp: HSDP, replicate over this many groups of ranks (e.g. "
                          "nodes) and shard within each group")
    find_unused_parameters: bool = Field(False, description="ddp: allow trainable parameters that get no "
                                         "gradient in a step (costs a graph traversal per step)")


class Apply(nn.Module):
    """A module whose forward is ``fn(model, *args)``: lets DDP and FSDP wrap a trainer's whole loss function."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn: Callable, *args):
        return fn(self.model, *args)


class LocalEngine:
    """One process: the trainer's model as it is."""

    grad_divisor = 1  # what the engine already divided the summed gradients by

    def __init__(self, model: nn.Module, params: list[nn.Parameter]):
        self.model = self.state_model = self.compute_model = model
        self.params = params

    def forward(self, loss_fn: Callable, batch) -> tuple[torch.Tensor, int]:
        return loss_fn(self.model, batch)

    def accumulating(self, last: bool):
        """Context for one micro-batch's forward and backward; ``last``: the step's last micro-batch."""
        return nullcontext()

    def full_model(self):
        """Context in which ``self.model`` holds the current weights whole (always, here)."""
        return nullcontext()

    def finish(self) -> None:
        """Leave the trained weights in the trainer's model."""


class DdpEngine(LocalEngine):
    """:class:`~torch.nn.parallel.DistributedDataParallel` around :class:`Apply`; the model's parameters are
    shared, so the trainer's model is always current."""

    def __init__(self, model: nn.Module, params: list[nn.Parameter], cfg: DistributedConfig):
        super().__init__(model, params)
        self.grad_divisor = world_size()  # DDP averages over ranks
        wrapper = Apply(model)
        trained = {id(p) for p in params}
        # Parameters that require grad but are not the ones trained (a trainer's choice) get no gradient:
        # DDP must not wait for them.
        ignored = [f"model.{n}" for n, p in model.named_parameters() if p.requires_grad and id(p) not in trained]
        if ignored:
            nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(wrapper, ignored)
        device = next(model.parameters()).device
        self.ddp = nn.parallel.DistributedDataParallel(
            wrapper, device_ids=[device] if device.type == "cuda" else None, gradient_as_bucket_view=True,
            find_unused_parameters=cfg.find_unused_parameters,
            # Buffers change only in ways every rank repeats (PPO's β); a broadcast per forward would be waste.
            broadcast_buffers=False)

    def forward(self, loss_fn: Callable, batch) -> tuple[torch.Tensor, int]:
        return self.ddp(loss_fn, batch)

    def accumulating(self, last: bool):
        return nullcontext() if last else self.ddp.no_sync()


class FsdpEngine(LocalEngine):
    """FSDP2 ``fully_shard`` per transformer block and on the root of a shadow of the model (module docstring)."""

    def __init__(self, model: nn.Module, params: list[nn.Parameter], cfg: DistributedConfig, bf16: bool):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        self.model = model
        self.grad_divisor = world_size()  # the reduce-scatter averages over every data-parallel rank
        device = next(model.parameters()).device
        if cfg.cpu_offload and device.type != "cuda":
            raise LmcycleError("distributed.cpu_offload moves FSDP's shards from GPU to CPU memory; this run is "
                               f"on {device.type}: remove it", field="distributed.cpu_offload")
        world = world_size()
        if world % cfg.replicas:
            raise LmcycleError(f"distributed.replicas ({cfg.replicas}) does not divide the {world} ranks",
                               field="distributed.replicas")
        shape = (world,) if cfg.replicas == 1 else (cfg.replicas, world // cfg.replicas)
        names = ("shard",) if cfg.replicas == 1 else ("replicate", "shard")
        mesh = init_device_mesh(device.type, shape, mesh_dim_names=names)

        shadow = _shadow(Apply(model))
        blocks = transformer_blocks(shadow)
        if not blocks:
            raise LmcycleError(f"distributed.strategy fsdp shards a model block by block, and "
                               f"{type(model).__name__} has no repeated blocks (no nn.ModuleList of one "
                               "class): use strategy ddp", field="distributed.strategy")
        options = {"mesh": mesh, "reshard_after_forward": cfg.reshard_after_forward}
        if cfg.cpu_offload:
            options["offload_policy"] = CPUOffloadPolicy()
        if bf16:
            options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in blocks:
            fully_shard(block, **options)
        if bf16:
            # The root's inputs are the trainer's batch: its float tensors (PPO's advantages, old log-probs) must
            # not be rounded to bf16. The blocks still get bf16 hidden states from the bf16 embedding.
            options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                                        cast_forward_inputs=False)
        self.fsdp = fully_shard(shadow, **options)
        self.state_model = self.compute_model = shadow.model
        # named_parameters() lists a tied weight once, under the same name in the model and its shadow.
        trained = {id(p) for p in params}
        sharded = dict(shadow.model.named_parameters())
        self.params = [sharded[n] for n, p in model.named_parameters() if id(p) in trained]
        self._release()

    def forward(self, loss_fn: Callable, batch) -> tuple[torch.Tensor, int]:
        return self.fsdp(loss_fn, batch)

    def accumulating(self, last: bool):
        # Micro-batches before the last keep their unsharded gradients; the last one reduce-scatters their sum.
        self.fsdp.set_requires_gradient_sync(last)
        return nullcontext()

    @contextmanager
    def full_model(self) -> Iterator[None]:
        self._gather()
        try:
            yield
        finally:
            self._release()

    def finish(self) -> None:
        self._gather()

    def _gather(self) -> None:
        """All-gather every sharded weight into the trainer's model (a collective: every rank calls it)."""
        sharded = dict(self.compute_model.named_parameters())
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                p.data = sharded[name].full_tensor().detach().to(p.device)

    def _release(self) -> None:
        """Empty the trainer's copy of the weights: the shards hold them now."""
        for _, p in self.model.named_parameters():
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)


def build_engine(model: nn.Module, params: list[nn.Parameter], cfg: DistributedConfig,
                 bf16: bool) -> LocalEngine:
    """The engine for this launch: :class:`LocalEngine` in one process, else ``cfg.strategy``'s."""
    if not is_distributed():
        return LocalEngine(model, params)
    if cfg.strategy == "fsdp":
        return FsdpEngine(model, params, cfg, bf16)
    return DdpEngine(model, params, cfg)


def _shadow(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters share storage with the original's and whose buffers are the
    original's own tensors (tied weights stay tied: one new parameter per original parameter)."""
    memo: dict[int, object] = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(p.data, requires_grad=p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = b
    return copy.deepcopy(module, memo)
