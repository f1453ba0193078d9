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
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Literal

import torch
import torch.distributed.checkpoint as dcp
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
    frozen_models: Literal["replicate", "shard"] = Field("replicate", description="models that only run forward "
                                                         "(PPO's full fine-tuning reference, its reward model): "
                                                         "a whole copy per rank, or FSDP2-sharded over the "
                                                         "ranks (1/N of the memory, an all-gather per block "
                                                         "per forward), with either strategy")


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
        self.device = next(model.parameters()).device  # where batches go

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
            forward_sync_buffers=False)

    def forward(self, loss_fn: Callable, batch) -> tuple[torch.Tensor, int]:
        return self.ddp(loss_fn, batch)

    def accumulating(self, last: bool):
        return nullcontext() if last else self.ddp.no_sync()


class FsdpEngine(LocalEngine):
    """FSDP2 ``fully_shard`` per transformer block and on the root of a shadow of the model (module docstring)."""

    def __init__(self, model: nn.Module, params: list[nn.Parameter], cfg: DistributedConfig, bf16: bool):
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        self.model = model
        self.grad_divisor = world_size()  # the reduce-scatter averages over every data-parallel rank
        empty = getattr(model, "empty_weights", None)  # a model built on the meta device (load_empty)
        self.device = device = empty.device if empty is not None else next(model.parameters()).device
        check_launch(cfg, device, world_size())
        fsdp_blocks(model)
        mesh = fsdp_mesh(device, cfg.replicas)

        shadow = _shadow(Apply(model))
        blocks = fsdp_blocks(shadow)
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
        if empty is not None:
            fill_shards(shadow, device, empty.source, prefix="model.")
            del model.empty_weights  # filled: a later engine on this model must not read the checkpoint again
        self.state_model = self.compute_model = shadow.model
        # named_parameters() lists a tied weight once, under the same name in the model and its shadow.
        trained = {id(p) for p in params}
        sharded = dict(shadow.model.named_parameters())
        self.params = [sharded[n] for n, p in model.named_parameters() if id(p) in trained]
        _off_meta(model, device)
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
                p.data = sharded[name].full_tensor().detach().to(self.device)

    def _release(self) -> None:
        """Empty the trainer's copy of the weights: the shards hold them now."""
        for _, p in self.model.named_parameters():
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)


def check_launch(cfg: DistributedConfig, device: torch.device, world: int) -> None:
    """Raise :class:`LmcycleError` naming the field for settings a launch of ``world`` ranks on ``device`` cannot
    run (checked when the recipe loads, and again when the engine starts)."""
    if cfg.strategy != "fsdp" or world < 2:
        return
    if cfg.cpu_offload and device.type != "cuda":
        raise LmcycleError("distributed.cpu_offload moves FSDP's shards from GPU to CPU memory; this run is "
                           f"on {device.type}: remove it", field="distributed.cpu_offload")
    if world % cfg.replicas:
        raise LmcycleError(f"distributed.replicas ({cfg.replicas}) does not divide the {world} ranks of this "
                           "launch", field="distributed.replicas")


def fsdp_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks FSDP shards one by one; :class:`LmcycleError` for a model that has none."""
    blocks = transformer_blocks(model)
    if not blocks:
        raise LmcycleError(f"distributed.strategy fsdp shards a model block by block, and "
                           f"{type(model).__name__} has no repeated blocks (no nn.ModuleList of one "
                           "class): use strategy ddp", field="distributed.strategy")
    return blocks


def build_engine(model: nn.Module, params: list[nn.Parameter], cfg: DistributedConfig,
                 bf16: bool) -> LocalEngine:
    """The engine for this launch: :class:`LocalEngine` in one process, else ``cfg.strategy``'s."""
    if not is_distributed():
        return LocalEngine(model, params)
    if cfg.strategy == "fsdp":
        return FsdpEngine(model, params, cfg, bf16)
    return DdpEngine(model, params, cfg)


def fsdp_mesh(device: torch.device, replicas: int = 1):
    """The device mesh of every rank: 1-D (shard over all), or 2-D for HSDP (``replicas`` groups that each shard)."""
    from torch.distributed.device_mesh import init_device_mesh

    world = world_size()
    if replicas == 1:
        return init_device_mesh(device.type, (world,), mesh_dim_names=("shard",))
    return init_device_mesh(device.type, (replicas, world // replicas), mesh_dim_names=("replicate", "shard"))


def shard_frozen(model: nn.Module, cfg: DistributedConfig, device: torch.device) -> nn.Module:
    """``model`` (one that only runs forward: a PPO reference, a reward model), FSDP2-sharded over the ranks when
    ``cfg.frozen_models`` is ``shard`` and this is a torchrun launch; else as it is.

    Sharded, each rank keeps 1/N of its weights and each forward all-gathers one block at a time, so every rank
    must run each forward together (PPO scores every rollout on every rank). A model built on the meta device
    (:func:`lmcycle.models.load.load_empty`) is then filled shard by shard: no rank ever holds it whole.
    """
    from torch.distributed.fsdp import fully_shard

    if cfg.frozen_models != "shard" or not is_distributed():
        return model
    mesh = fsdp_mesh(device, cfg.replicas)
    model.requires_grad_(False)
    for block in fsdp_blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    empty = getattr(model, "empty_weights", None)
    if empty is not None:
        fill_shards(model, device, empty.source)
        del model.empty_weights
    return model


def held_params(model: nn.Module) -> int:
    """How many of ``model``'s parameters this rank holds: all of them, or its shards' share (FSDP)."""
    from torch.distributed.tensor import DTensor

    return sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in model.parameters())


def fill_shards(root: nn.Module, device: torch.device, source: Path, prefix: str = "") -> None:
    """Give the sharded parameters of ``root`` (an FSDP2 root) still on the meta device their values: each rank
    reads only its own slices of the safetensors files in ``source`` (DCP's ``HuggingFaceStorageReader``), so
    no rank ever holds a whole weight it does not keep. Parameters made for training (LoRA's) and buffers keep
    their values. A parameter named ``prefix + key`` is read from the checkpoint's ``key``.

    A wrapper's ``base_layer`` holds the wrapped module's weights (the LoRA convention of PEFT and lmcycle), so
    ``q_proj.base_layer.weight`` is read from the checkpoint's ``q_proj.weight``.
    """
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    params = dict(root.named_parameters())
    empty = {n for n, p in params.items() if p.is_meta}
    kept = {n: p.detach().clone() for n, p in params.items() if n not in empty}
    buffers = [(m, n, b) for m in root.modules() for n, b in m._buffers.items() if b is not None]
    root.to_empty(device=device)  # FSDP re-registers every shard on its new storage
    for module, name, buffer in buffers:
        module._buffers[name] = buffer  # the model's own buffers again, not empty copies
    params = dict(root.named_parameters())
    with torch.no_grad():
        for name, value in kept.items():
            params[name].copy_(value)
    wanted = {re.sub(r"\.base_layer(?=\.)", "", n.removeprefix(prefix)): params[n] for n in empty}
    dcp.load(wanted, storage_reader=HuggingFaceStorageReader(str(source)))


def _off_meta(model: nn.Module, device: torch.device) -> None:
    """Replace the model's meta-device parameters by empty ones on ``device`` (same names, tied ones still tied),
    which gathered weights can then fill (a meta tensor's data cannot be swapped for a real one)."""
    real: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None and p.is_meta:
                if id(p) not in real:
                    real[id(p)] = nn.Parameter(torch.empty(0, dtype=p.dtype, device=device),
                                               requires_grad=p.requires_grad)
                module._parameters[name] = real[id(p)]


def _shadow(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters share storage with the original's and whose buffers are the
    original's own tensors (tied weights stay tied: one new parameter per original parameter)."""
    memo: dict[int, object] = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(p.data, requires_grad=p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = b
    return copy.deepcopy(module, memo)
