"""Adapters on disk, whatever the method: read and write them, find and describe them, export them.

An adapter directory is PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``): LoRA and QLoRA
adapters (:mod:`lmcycle.adapt.lora`) and soft prompts (:mod:`lmcycle.adapt.prompt_tuning`). These functions
back ``lmcycle adapters list|export``; loading an adapter onto its base and merging it, which need the
methods' modules, are :func:`lmcycle.artifacts.load_adapted` and :func:`lmcycle.artifacts.merge_adapter`.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmcycle.atomic import atomic_dir
from lmcycle.errors import LmcycleError
from lmcycle.train.checkpoint import saved_param_count

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
METHODS = {"LORA": "lora", "PROMPT_TUNING": "prompt_tuning"}


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """True for a folder holding ``adapter_config.json`` (and no ``config.json`` of a full model)."""
    p = Path(path)
    return (p / CONFIG_FILE).is_file() and not (p / "config.json").is_file()


def read_adapter_config(path: str | os.PathLike, peft_type: str | None = None) -> dict[str, Any]:
    """The adapter's config, checked for what every method needs: both files present, valid JSON, a supported
    ``peft_type`` (or exactly ``peft_type`` when given)."""
    p = Path(path)
    if not p.is_dir():
        raise LmcycleError("the adapter folder is missing", file=p)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (p / name).is_file():
            raise LmcycleError(f"not an adapter folder: {name} is missing", file=p)
    try:
        config = json.loads((p / CONFIG_FILE).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LmcycleError(f"not valid JSON: {e}", file=p / CONFIG_FILE) from None
    if not isinstance(config, dict):
        raise LmcycleError("adapter config must be a JSON object", file=p / CONFIG_FILE)
    found = config.get("peft_type")
    if peft_type is not None and found != peft_type:
        raise LmcycleError(f"peft_type is {found!r}, expected {peft_type!r}", file=p / CONFIG_FILE,
                           field="peft_type")
    if found not in METHODS:
        raise LmcycleError(f"peft_type {found!r} is not supported (supported: {', '.join(METHODS)})",
                           file=p / CONFIG_FILE, field="peft_type")
    return config


# Config keys that describe an adapter's origin or runtime, whatever PEFT method wrote it.
METADATA_KEYS = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
                 "peft_version"}


def reject_unknown_settings(config: dict[str, Any], understood: set[str], cfg_file: Path) -> None:
    """A key we do not know (e.g. from a newer PEFT) is fine while unset; a set one could change what the
    adapter computes, so loading it as if it were absent would silently give other outputs."""
    for key, value in config.items():
        if key not in understood | METADATA_KEYS and value not in (None, False, [], {}, ""):
            raise LmcycleError(f"unsupported setting {value!r} (this version of lmcycle does not implement it)",
                               file=cfg_file, field=key)


def read_adapter(path: str | os.PathLike, peft_type: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(config, tensors)`` of an adapter folder of the given ``peft_type`` (``LORA`` / ``PROMPT_TUNING``)."""
    from safetensors.torch import load_file

    config = read_adapter_config(path, peft_type)
    try:
        tensors = load_file(str(Path(path) / WEIGHTS_FILE))
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise LmcycleError(f"cannot read adapter weights: {e}", file=Path(path) / WEIGHTS_FILE) from None
    return config, tensors


def write_adapter(out_dir: str | os.PathLike, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` atomically (all or nothing)."""
    from safetensors.torch import save_file

    with atomic_dir(out_dir) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp / WEIGHTS_FILE),
                  metadata={"format": "pt"})
    return Path(out_dir)


@dataclass
class AdapterInfo:
    """What ``lmcycle adapters list`` shows for one adapter."""

    path: Path
    method: str  # lora | prompt_tuning
    task_type: str | None
    base_model: str | None
    params: int  # numbers stored in the weights file
    size_bytes: int  # the folder's files on disk
    settings: dict[str, Any] = field(default_factory=dict)  # r, alpha, targets / virtual tokens, init


def describe_adapter(path: str | os.PathLike) -> AdapterInfo:
    """Read an adapter's config and the shapes in its weights file (no tensor is loaded)."""
    p = Path(path)
    config = read_adapter_config(p)
    try:
        params = saved_param_count(p / WEIGHTS_FILE)
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise LmcycleError(f"cannot read adapter weights: {e}", file=p / WEIGHTS_FILE) from None
    method = METHODS[config["peft_type"]]
    if method == "lora":
        keys = ("r", "lora_alpha", "target_modules", "use_rslora", "fan_in_fan_out")
    else:
        keys = ("num_virtual_tokens", "num_transformer_submodules", "token_dim", "prompt_tuning_init")
    return AdapterInfo(path=p, method=method, task_type=config.get("task_type"),
                       base_model=config.get("base_model_name_or_path"), params=params,
                       size_bytes=sum(f.stat().st_size for f in p.iterdir() if f.is_file()),
                       settings={k: config[k] for k in keys if k in config})


def find_adapters(root: str | os.PathLike) -> list[Path]:
    """Every adapter folder at or under ``root`` (a run directory, a stage folder or an adapter), sorted."""
    p = Path(root)
    if not p.exists():
        raise LmcycleError("no such file or folder", file=p)
    if is_adapter_dir(p):
        return [p]
    return sorted(c.parent for c in p.rglob(CONFIG_FILE) if is_adapter_dir(c.parent))


def find_base(adapter_dir: str | os.PathLike, base: str | None = None) -> str:
    """The base model for an adapter: ``base`` if given, else the config's ``base_model_name_or_path``.

    A recorded local path that no longer exists (a run directory moved elsewhere) is looked for by its
    trailing components under the adapter's parent folders; a Hub id is returned as it is.
    """
    if base:
        return base
    p = Path(adapter_dir)
    recorded = read_adapter_config(p).get("base_model_name_or_path")
    if not recorded:
        raise LmcycleError("the adapter does not name its base model (base_model_name_or_path); pass the base",
                           file=p / CONFIG_FILE, field="base_model_name_or_path")
    where = Path(recorded)
    if where.exists() or not (where.is_absolute() or len(where.parts) > 2):
        return recorded
    for ancestor in p.resolve().parents:
        for i in range(1, len(where.parts)):
            candidate = ancestor.joinpath(*where.parts[i:])
            if (candidate / "config.json").is_file():
                return str(candidate)
    raise LmcycleError(f"the adapter's base model '{recorded}' does not exist; pass the base explicitly",
                       file=p / CONFIG_FILE, field="base_model_name_or_path")


def export_adapter(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike,
                   base_model_name: str | None = None) -> Path:
    """Copy an adapter to a standalone folder to share or serve (PEFT, vLLM): its two files, with
    ``base_model_name_or_path`` set to ``base_model_name`` (e.g. the Hub id of the base instead of a local
    path), plus a README model card saying how it was made and how to load it."""
    src = Path(adapter_dir)
    info = describe_adapter(src)
    config = read_adapter_config(src)
    if base_model_name:
        config["base_model_name_or_path"] = base_model_name
    with atomic_dir(out_dir) as tmp:
        shutil.copyfile(src / WEIGHTS_FILE, tmp / WEIGHTS_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(_model_card(info, config), encoding="utf-8")
    return Path(out_dir)


def _model_card(info: AdapterInfo, config: dict) -> str:
    base = config.get("base_model_name_or_path") or "<base model>"
    settings = "\n".join(f"- `{k}`: `{v}`" for k, v in info.settings.items())
    return f"""---
library_name: peft
base_model: {base}
---
# {info.method} adapter

Trained with lmcycle; {info.params:,} parameters, {config.get('task_type') or 'task type not recorded'}.

{settings}

Load with PEFT:

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM  # AutoModelForSeq2SeqLM for SEQ_2_SEQ_LM adapters
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{base}"), "<this folder>")
```

or with lmcycle: `lmcycle eval model=<this folder> ...` (any stage's `model` accepts an adapter folder).
"""


def format_adapter_table(infos: list[AdapterInfo]) -> str:
    """A markdown table of adapters, for ``lmcycle adapters list``."""
    lines = ["| Adapter | Method | Params | Size | Base model | Settings |", "|---|---|---:|---:|---|---|"]
    for a in infos:
        settings = ", ".join(f"{k}={v}" for k, v in a.settings.items())
        lines.append(f"| {a.path} | {a.method} | {a.params:,} | {a.size_bytes / 1e6:.3f} MB | "
                     f"{a.base_model or '—'} | {settings} |")
    return "\n".join(lines)
