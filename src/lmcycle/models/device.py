"""Which device a model runs on, and which attention implementation it computes with.

``device`` everywhere (a recipe's top-level ``device``, every loader's ``device=``, ``lmcycle serve --device``)
takes one of:

- ``auto`` (the default): CUDA when torch sees a CUDA device, else the CPU. Under ``torchrun`` each process
  takes its own GPU, ``cuda:LOCAL_RANK``;
- ``cpu``;
- ``cuda``: this process's GPU (``cuda:LOCAL_RANK``, so ``cuda:0`` outside torchrun); an error without CUDA;
- ``cuda:N``: GPU number N.

``attn_implementation`` is what transformers computes attention with: ``sdpa`` (the default, torch's
``scaled_dot_product_attention``, which picks a flash or memory-efficient kernel on CUDA by itself; an
architecture without an sdpa path falls back to eager, as transformers does), ``eager``
(the plain matmul-softmax-matmul) or ``flash_attention_2`` (the ``flash_attn`` package's kernels: CUDA only,
and only for half-precision activations, so bf16 training or ``model_dtype: bfloat16``).
"""

from __future__ import annotations

import importlib.util
import os
import re

import torch

from lmcycle.errors import LmcycleError

DEVICES = "auto, cpu, cuda or cuda:N"
ATTENTION = ("sdpa", "eager", "flash_attention_2")
_CUDA = re.compile(r"cuda(?::(\d+))?")


def resolve_device(spec: str | torch.device = "auto", *, field: str = "device", file: str | os.PathLike | None = None,
                   line: int | None = None) -> torch.device:
    """The ``torch.device`` that ``spec`` (see the module docstring) names on this machine.

    Raises :class:`LmcycleError` naming ``field`` (and ``file``/``line`` when given) for a string that is no
    device, for ``cuda`` when torch sees no CUDA device, and for a GPU number this machine does not have.
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    text = spec.strip().lower() if isinstance(spec, str) else spec
    where = {"field": field, "file": file, "line": line}
    if text == "cpu":
        return torch.device("cpu")
    if text == "auto":
        return _local_gpu(where) if torch.cuda.is_available() else torch.device("cpu")
    match = _CUDA.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise LmcycleError(f"unknown device {spec!r} (expected {DEVICES})", **where)
    if not torch.cuda.is_available():
        raise LmcycleError(f"{spec} asked for but torch sees no CUDA device (torch {torch.__version__}, "
                           f"built for CUDA {torch.version.cuda or 'none'}); use auto or cpu", **where)
    if match.group(1) is None:
        return _local_gpu(where)
    index, count = int(match.group(1)), torch.cuda.device_count()
    if index >= count:
        raise LmcycleError(f"{spec} asked for but torch sees {count} CUDA device(s) (cuda:0 to cuda:{count - 1})",
                           **where)
    return torch.device("cuda", index)


def _local_gpu(where: dict) -> torch.device:
    """``cuda:LOCAL_RANK``: torchrun numbers the processes of one machine 0, 1, ...; each takes its own GPU."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise LmcycleError(f"process LOCAL_RANK={local_rank} has no GPU of its own: torch sees {count} CUDA "
                           f"device(s) on this machine; start at most {count} process(es) per machine "
                           "(torchrun --nproc-per-node) or use device: cpu", **where)
    return torch.device("cuda", local_rank)


def check_attn_implementation(name: str, device: str | torch.device | None = None, *, field: str = "attn_implementation",
                              file: str | os.PathLike | None = None, line: int | None = None) -> str:
    """``name`` when it is one of :data:`ATTENTION` that can run here, else :class:`LmcycleError` naming ``field``.

    ``flash_attention_2`` needs the ``flash_attn`` package (transformers would otherwise fetch a kernel from the
    Hub, or fail deep inside the first forward pass) and, when ``device`` is given, a CUDA device.
    """
    where = {"field": field, "file": file, "line": line}
    if name not in ATTENTION:
        raise LmcycleError(f"unknown attention implementation {name!r} (expected one of: {', '.join(ATTENTION)})",
                           **where)
    if name == "flash_attention_2":
        if not flash_attn_installed():
            raise LmcycleError("flash_attention_2 needs the flash_attn package, which is not installed "
                               "(pip install flash-attn --no-build-isolation, on a CUDA machine); or use sdpa",
                               **where)
        if device is not None and torch.device(device).type != "cuda":
            raise LmcycleError(f"flash_attention_2 runs on CUDA only, and the device is {device}; use sdpa",
                               **where)
    return name


def flash_attn_installed() -> bool:
    """Whether the ``flash_attn`` package can be imported (found without importing it: it loads CUDA)."""
    return importlib.util.find_spec("flash_attn") is not None


def hf_attn_implementation(name: str) -> str | None:
    """What to pass transformers as ``attn_implementation`` for ``name``: ``sdpa`` becomes None, transformers'
    own default, which is sdpa wherever the architecture has an sdpa path and eager where it has none (asked for
    by name, sdpa would be an error there, and a recipe that never chose must not fail)."""
    return None if name == "sdpa" else name


def describe_device(device: str | torch.device) -> str:
    """``device`` with the GPU's name, for logs and reports: ``cpu``, ``cuda:0 (NVIDIA H200)``."""
    device = torch.device(device)
    if device.type != "cuda":
        return str(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


def synchronize(device: str | torch.device) -> None:
    """Wait for the device's queued kernels (CUDA runs them asynchronously, so a timer must wait for them)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
