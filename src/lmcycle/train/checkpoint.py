"""Training checkpoints that make resume exact, and the atomic save of a finished model.

A checkpoint is the directory ``<out_dir>/checkpoints/step-<N>`` (``N`` = optimizer steps done) holding

- ``.metadata``, ``*.distcp``  the model's weights and the optimizer's state (AdamW moments, step counts) in
  PyTorch's distributed checkpoint format (DCP): each rank writes its own shards, and the files hold every
  tensor under its parameter name, whatever the world size and engine that wrote them (one process, DDP, FSDP),
  so a run saved by 2 ranks resumes on 1 or on 8,
- ``rng.pt``             torch / Python / NumPy random states (rank 0's: every rank resumes from them),
- ``state.json``         the step, the per-step losses so far and anything else the loop records. The step is
  also the data position: a step's batches depend on the step only.

Pruning keeps the newest ``keep`` checkpoints and also the newest *steady* one (``state.json`` ``"steady"``:
the loop saw no rising loss when it wrote it), so that a spike noticed several saves later still finds a
checkpoint from before it.

The learning-rate schedule is a function of the step (:mod:`lmcycle.train.schedule`), so the step *is* its
state. Each checkpoint is written with :func:`lmcycle.atomic.atomic_dir`, so a ``step-N`` directory that exists
is complete; a run killed while saving leaves the previous checkpoint untouched. Under ``torchrun`` rank 0 makes
the temporary directory, every rank writes its shards into it, and rank 0 renames it (the directory must be on a
file system all ranks share).

A finished model is not a checkpoint: it is saved whole with ``save_pretrained`` (:func:`save_model_dir`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from lmcycle.atomic import atomic_dir
from lmcycle.train.distributed import barrier, broadcast_object, is_main

CHECKPOINTS = "checkpoints"


def list_checkpoints(out_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of every complete checkpoint under ``out_dir/checkpoints``, oldest first."""
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        # Temporary directories of an unfinished save start with "." and are never picked up.
        if d.is_dir() and d.name.startswith("step-") and d.name[5:].isdigit():
            found.append((int(d.name[5:]), d))
    return sorted(found)


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


def save_checkpoint(out_dir: str | os.PathLike, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any] | None = None, keep: int = 2) -> Path:
    """Write ``out_dir/checkpoints/step-<step>`` atomically, then delete all but the newest ``keep``.

    A collective under ``torchrun``: every rank calls it with its part of the model (its FSDP shards, or its
    replica) and ``optimizer``; ``state`` is taken from rank 0.
    """
    path = Path(out_dir) / CHECKPOINTS / f"step-{step}"
    model_state, optim_state = get_state_dict(model, optimizer)
    with atomic_dir(path) if is_main() else contextlib.nullcontext() as tmp:
        tmp = broadcast_object(tmp)
        with _one_process_is_meant():
            dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp)
        if is_main():
            torch.save(rng_state(), tmp / "rng.pt")
            (tmp / "state.json").write_text(json.dumps({**(state or {}), "step": step}), encoding="utf-8")
    if is_main():
        prune_checkpoints(out_dir, keep)
    barrier()  # no rank goes on (and may read the checkpoint) before rank 0 has renamed it into place
    return path


def prune_checkpoints(out_dir: str | os.PathLike, keep: int) -> None:
    """Delete every checkpoint but the newest ``keep`` and the newest steady one."""
    found = [p for _, p in list_checkpoints(out_dir)]
    steady = [p for p in found if is_steady(p)]
    for old in set(found[:-max(1, keep)]) - set(steady[-1:]):
        shutil.rmtree(old, ignore_errors=True)


def is_steady(path: Path) -> bool:
    """Whether a checkpoint was written while the loss was not rising (older checkpoints count as steady)."""
    try:
        return bool(json.loads((path / "state.json").read_text(encoding="utf-8")).get("steady", True))
    except (OSError, ValueError):
        return True


def set_aside_checkpoints_after(out_dir: str | os.PathLike, step: int) -> list[Path]:
    """Rename the checkpoints of more than ``step`` steps to ``diverged-step-<N>``, so that resuming does not
    pick them up while they stay there to inspect; return their new paths."""
    moved = []
    for n, path in list_checkpoints(out_dir):
        if n > step:
            target = path.with_name(f"diverged-{path.name}")
            shutil.rmtree(target, ignore_errors=True)
            os.replace(path, target)
            moved.append(target)
    return moved


def remove_unfinished_saves(out_dir: str | os.PathLike) -> None:
    """Delete the ``.step-N.*.tmp`` directories of saves that a kill interrupted (never complete, never read)."""
    root = Path(out_dir) / CHECKPOINTS
    if root.is_dir():
        for d in root.iterdir():
            if d.is_dir() and d.name.startswith(".step-") and d.name.endswith(".tmp"):
                shutil.rmtree(d, ignore_errors=True)


def load_checkpoint(path: str | os.PathLike, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Restore weights, optimizer state and RNG states from ``path``; return its ``state.json``.

    A collective under ``torchrun`` (every rank reads its own part). Raises what DCP raises for a checkpoint of
    another model (``CheckpointException``, ``RuntimeError``) and :class:`FileNotFoundError` for one that is no
    DCP checkpoint.
    """
    path = Path(path)
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"{path} holds no distributed checkpoint (.metadata); checkpoints written before "
                                "lmcycle used DCP cannot be resumed")
    if optimizer is None:
        loaded = {"model": get_model_state_dict(model)}
        with _one_process_is_meant():
            dcp.load(loaded, checkpoint_id=path)
        set_model_state_dict(model, loaded["model"])
    else:
        model_state, optim_state = get_state_dict(model, optimizer)
        loaded = {"model": model_state, "optim": optim_state}
        with _one_process_is_meant():
            dcp.load(loaded, checkpoint_id=path)
        set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    return json.loads((path / "state.json").read_text(encoding="utf-8"))


@contextlib.contextmanager
def _one_process_is_meant() -> Iterator[None]:
    """Silence DCP's warning that, without a process group, it saves or loads in one process: that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def rng_state() -> dict[str, Any]:
    """Every random state the training may draw from, in types ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (kind, keys.tolist(), pos, has_gauss, cached),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_model_dir(model: nn.Module, tokenizer, path: str | os.PathLike) -> Path:
    """``save_pretrained`` the model (safetensors) and its tokenizer into ``path``, atomically."""
    path = Path(path)
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return path


def saved_param_count(file: str | os.PathLike) -> int:
    """Numbers stored in a safetensors file, read from its header (no tensor is loaded)."""
    from safetensors import safe_open

    total = 0
    with safe_open(str(file), framework="pt") as f:
        for key in f.keys():
            total += math.prod(f.get_slice(key).get_shape())
    return total
