"""Load any model folder a stage writes: a plain checkpoint, a PEFT adapter folder or a quantized folder.

Every stage's ``model`` (and every other place that takes what an earlier stage produced) goes through
:func:`load_model`, which looks at the folder and picks the loader:

- an adapter folder (``adapter_config.json``, :mod:`lmcycle.adapt.adapters`): its base model with the adapter on it
  (:func:`load_adapted`);
- a quantized folder (``quantization.json``): :func:`lmcycle.optimize.quantize.load_quantized`;
- anything else, a saved model or a Hub id: :func:`lmcycle.models.load.load_pretrained`.

This module sits above the technique libraries it dispatches to and below the stages.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from lmcycle.adapt.adapters import CONFIG_FILE, METHODS, find_base, is_adapter_dir, read_adapter_config
from lmcycle.adapt.lora import load_lora, merge_and_unload
from lmcycle.adapt.prompt_tuning import load_prompt_tuning
from lmcycle.errors import LmcycleError
from lmcycle.models.device import check_attn_implementation, hf_attn_implementation, resolve_device
from lmcycle.models.load import ensure_pad_token, load_empty, load_pretrained
from lmcycle.optimize.quantize import is_quantized_dir, load_quantized, model_class
from lmcycle.train.checkpoint import save_model_dir


def load_model(
    name_or_path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "auto",
    attn_implementation: str = "sdpa", empty: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` from any folder a stage writes, or a Hub id; the model is in eval mode on
    ``device`` (``auto``: CUDA when present, else CPU; :func:`lmcycle.models.device.resolve_device`), computes
    attention with ``attn_implementation`` (``sdpa``, ``eager``, ``flash_attention_2``) and the tokenizer has a
    pad token.

    A PEFT-format adapter folder (LoRA, QLoRA or a soft prompt) loads its base model with the adapter on it
    (:func:`load_adapted`); a quantized folder loads quantized, in the quantization's dtype rather than
    ``dtype``; anything else through :func:`lmcycle.models.load.load_pretrained`, or with ``empty`` through
    :func:`lmcycle.models.load.load_empty` where it can (parameters left on the meta device for FSDP to fill).
    Raises :class:`LmcycleError` for a missing local path, or a Hub id while the Hub is unreachable.
    """
    path = Path(name_or_path).expanduser()
    if is_adapter_dir(path):
        return load_adapted(path, device=device, dtype=dtype, attn_implementation=attn_implementation)
    if is_quantized_dir(path):
        model, tokenizer = load_quantized(path, device=device, attn_implementation=attn_implementation)
        ensure_pad_token(tokenizer)
        return model, tokenizer
    if empty and (loaded := load_empty(name_or_path, dtype=dtype, device=device,
                                       attn_implementation=attn_implementation)) is not None:
        return loaded
    return load_pretrained(name_or_path, dtype=dtype, device=device, attn_implementation=attn_implementation)


def load_adapted(adapter_dir: str | os.PathLike, base: str | None = None, *, device: str | torch.device = "auto",
                 dtype=None, merge: bool = True, attn_implementation: str = "sdpa"):
    """Load the base model with the adapter on it; returns ``(model, tokenizer)`` in eval mode.

    The base (``base``, else the one the adapter names) may itself be any folder :func:`load_model` takes.
    LoRA is merged into the base weights by default (same outputs, no adapter overhead at inference); with
    ``merge=False`` it stays a separate, active adapter named ``default``. A soft prompt wraps the base
    (:class:`lmcycle.adapt.prompt_tuning.PromptTunedModel`).
    """
    config = read_adapter_config(adapter_dir)
    device = resolve_device(device)
    model, tokenizer = load_model(find_base(adapter_dir, base), device=device, attn_implementation=attn_implementation,
                                  **({"dtype": dtype} if dtype is not None else {}))
    if METHODS[config["peft_type"]] == "lora":
        load_lora(model, adapter_dir)
        if merge:
            merge_and_unload(model)
    else:
        model = load_prompt_tuning(model, adapter_dir)
    model.to(device)
    model.eval()
    return model, tokenizer


def merge_adapter(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, base: str | None = None) -> Path:
    """Merge a LoRA adapter into a full-precision copy of its base and ``save_pretrained`` the plain model.

    A QLoRA adapter merges the same way: into the 32-bit base, never into quantized weights. Soft prompts live
    in the input, not in any weight, so they cannot be merged.
    """
    if METHODS[read_adapter_config(adapter_dir)["peft_type"]] != "lora":
        raise LmcycleError("a prompt-tuning adapter cannot be merged into weights (its virtual tokens are "
                           "inputs); serve it with its base instead", file=Path(adapter_dir) / CONFIG_FILE,
                           field="peft_type")
    model, tokenizer = load_adapted(adapter_dir, base, merge=True)
    return save_model_dir(model, tokenizer, out_dir)


def load_for_quantize(path: str, device: str | torch.device = "auto", attn_implementation: str = "sdpa"
                      ) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` to quantize, in eval mode on ``device`` (``auto``: CUDA when present): a model folder
    as its own architecture (config.json's) in float32, whatever dtype it was saved in; an adapter folder or a
    Hub id through :func:`load_model`."""
    device = resolve_device(device)
    check_attn_implementation(attn_implementation, device)
    if is_adapter_dir(Path(path)) or not (Path(path) / "config.json").is_file():
        return load_model(path, device=device, attn_implementation=attn_implementation)
    try:
        model = model_class(Path(path)).from_pretrained(path, dtype=torch.float32,
                                                        attn_implementation=hf_attn_implementation(attn_implementation))
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise LmcycleError(f"cannot load model: {(str(e).strip().splitlines() or [''])[0]}", file=path) from None
    ensure_pad_token(tokenizer, model)
    return model.to(device).eval(), tokenizer
