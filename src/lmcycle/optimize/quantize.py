"""Post-training quantization: fp16/bf16 casts, int8 weight-only, int8 dynamic and static activations, int4 weights.

Methods (:data:`QUANT_METHODS`), all through torchao 0.18's ``quantize_`` (``torch.ao.quantization`` is deprecated):

- ``fp16`` / ``bf16``      the whole model cast; saved with plain ``save_pretrained`` in that dtype.
- ``int8_weight_only``     ``Int8WeightOnlyConfig``: int8 weights, one scale per output row.
- ``int8_dynamic``         ``Int8DynamicActivationInt8WeightConfig``: int8 weights, activations quantized per token
                           at run time.
- ``int8_static``          ``Int8StaticActivationInt8WeightConfig``: int8 weights, activations quantized with one
                           fixed (asymmetric, per-tensor) scale and zero point per layer, from the ranges that
                           :func:`calibrate` recorded over sample texts.
- ``int4_weight_only``     int4 weights in groups of ``group_size`` along the input: on CUDA ``Int4WeightOnlyConfig``
                           (tinygemm's packed layout, bf16 activations); on CPU ``IntxWeightOnlyConfig(int4)``, the
                           only int4 layout torchao runs on CPU here. That layout keeps each int4 code in one byte,
                           so on CPU an int4 folder is about as large as an int8 one (the numerics are int4).

What is quantized: every ``nn.Linear`` except the output embeddings (the LM head: it is often tied to the input
embeddings; ``quantize_head=True`` includes it), plus with ``embeddings=True`` the input embeddings as int8
weight-only when they are not tied to the head (in MiniLM they are half the weights). Classifier heads are
quantized. Quantization works on a deep copy: the caller's model is never modified, also when it fails.

Saved format. transformers 5.23 serializes torchao tensors to safetensors (``TorchAoConfig`` in config.json,
the tensors flattened with their metadata) and ``from_pretrained`` reloads them exactly, so a quantized folder is a
standard one: ``AutoModel*.from_pretrained(dir)`` works without lmcycle. One exception: its loader does not know
the static activation scale tensors (``act_quant_scale``/``act_quant_zero_point``) and fails on them, so for
``int8_static`` those are left out of the safetensors and kept in ``quantization.json``; :func:`load_quantized`
puts them back (a plain ``from_pretrained`` of such a folder quantizes activations per tensor at run time
instead). ``quantization.json`` also records the method, its settings, the quantized modules, the calibration
ranges and ``compile`` (whether consumers should ``torch.compile`` the model: torchao's int8 kernels are slow in
eager mode at batch 1, fast once compiled; see :func:`maybe_compile`).

The ``quantize`` stage (:mod:`lmcycle.stages.quantize`) applies one method to a model of the run.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lmcycle.atomic import atomic_dir, atomic_write_json
from lmcycle.errors import LmcycleError
from lmcycle.models.device import check_attn_implementation, hf_attn_implementation, resolve_device

QUANT_METHODS = ("fp16", "bf16", "int8_weight_only", "int8_dynamic", "int8_static", "int4_weight_only")
RECORD_FILE = "quantization.json"
_CASTS = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class ActivationRange:
    """What one linear layer's input held over the calibration texts (real tokens only, padding left out)."""

    min: float
    max: float
    absmax: float
    ndim: int  # the input's number of dimensions (3 for (batch, seq, hidden); 2 for BERT's pooler)
    n_values: int = 0

    def static_qparams(self) -> tuple[float, int]:
        """Asymmetric int8 ``(scale, zero_point)`` covering [min(min, 0), max(max, 0)]: q = round(x/scale) + zp."""
        lo, hi = min(self.min, 0.0), max(self.max, 0.0)
        scale = max((hi - lo) / 255.0, torch.finfo(torch.float32).eps)
        zero_point = int(max(-128, min(127, round(-128 - lo / scale))))
        return float(torch.tensor(scale, dtype=torch.float32)), zero_point


def _torchao():
    import torchao.quantization as tq  # imported late: it is heavy (its import warnings: lmcycle/__init__.py)

    return tq


# -- which modules -----------------------------------------------------------------------------------------------


def _head_name(model: nn.Module) -> str | None:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return next((n for n, m in model.named_modules() if head is not None and m is head), None)


def _embedding_tied(model: nn.Module) -> bool:
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    emb = get_in() if callable(get_in) else None
    head = get_out() if callable(get_out) else None
    return emb is not None and head is not None and emb.weight.data_ptr() == head.weight.data_ptr()


def linear_targets(model: nn.Module, quantize_head: bool = False) -> list[str]:
    """Module paths of the ``nn.Linear`` layers to quantize: all of them but the LM head unless ``quantize_head``."""
    head = None if quantize_head else _head_name(model)
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != head]


def embedding_targets(model: nn.Module) -> list[str]:
    """The input embeddings' path when they can be quantized (not tied to an output layer), else nothing."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if not isinstance(emb, nn.Embedding) or _embedding_tied(model):
        return []
    return [n for n, m in model.named_modules() if m is emb]


def _check_quantizable(model: nn.Module, method: str) -> None:
    for name, module in model.named_modules():
        kind = type(module).__name__
        if "lora" in kind.lower() or kind == "QuantLinear" or "prompt" in kind.lower():
            raise LmcycleError(f"the model already holds {kind} layers ({name}); {method} needs plain nn.Linear "
                               "layers: merge the adapter into a full-precision model first", field="model")
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and type(weight) not in (torch.Tensor, nn.Parameter):
            raise LmcycleError(f"the model is already quantized ({name} holds a {type(weight).__name__}); "
                               "quantize the full-precision model", field="model")


# -- calibration -------------------------------------------------------------------------------------------------


def check_calibration_texts(texts: Any) -> list[str]:
    """The texts, or an error naming field ``calibration`` when they are empty or not text."""
    if isinstance(texts, str | bytes) or not isinstance(texts, list | tuple):
        raise LmcycleError(f"calibration data must be a list of texts, got {type(texts).__name__}",
                           field="calibration")
    if not texts:
        raise LmcycleError("calibration data is empty; give at least one sample text", field="calibration")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise LmcycleError(f"calibration item {i} is a {type(t).__name__}, not text: the model reads text "
                               "(pass example texts, not tensors, arrays or records)", field="calibration")
    if not any(t.strip() for t in texts):
        raise LmcycleError("calibration texts are all blank", field="calibration")
    return list(texts)


@torch.no_grad()
def calibrate(model: nn.Module, tokenizer, texts: list[str], *, max_len: int = 128, batch_size: int = 16,
              layers: list[str] | None = None) -> dict[str, ActivationRange]:
    """Run ``texts`` through the model and record each linear layer's input range: ``{path: ActivationRange}``.

    Forward pre-hooks on the layers (default: :func:`linear_targets`) see inputs (batch, seq, in) — padded positions
    are left out via the attention mask — or (batch, in). Encoder-decoders (T5) read each text on both sides (the
    decoder gets it shifted right, as in teacher forcing). The model is left as it was (hooks removed, mode back).
    """
    texts = check_calibration_texts(texts)
    names = linear_targets(model) if layers is None else layers
    modules = dict(model.named_modules())
    stats: dict[str, ActivationRange] = {}
    mask_holder: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(_module, args):
            x = args[0].detach().float()
            mask = mask_holder["mask"]
            if x.ndim == 3 and x.shape[:2] == mask.shape:
                values = x[mask.bool()]
            else:
                values = x.reshape(-1, x.shape[-1])
            if values.numel() == 0:
                return
            lo, hi = values.min().item(), values.max().item()
            old = stats.get(name)
            if old is None:
                stats[name] = ActivationRange(lo, hi, max(-lo, hi), x.ndim, values.numel())
            else:
                old.min, old.max = min(old.min, lo), max(old.max, hi)
                old.absmax, old.n_values = max(-old.min, old.max), old.n_values + values.numel()
        return hook

    device = next(model.parameters()).device
    hooks = [modules[n].register_forward_pre_hook(record(n)) for n in names]
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(texts), batch_size), desc="calibrate", leave=False):
            enc = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True, truncation=True,
                            max_length=max_len, padding_side="right").to(device)
            mask_holder["mask"] = enc["attention_mask"]
            inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
            if getattr(model.config, "is_encoder_decoder", False):
                labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
                inputs["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=labels)
            model(**inputs)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return stats


# -- quantization ------------------------------------------------------------------------------------------------


def _configs(method: str, calibration: dict[str, ActivationRange] | None, targets: list[str], group_size: int,
             device: torch.device) -> tuple[dict[str, Any], Any]:
    """Per-module torchao configs ``{path: config}`` and the config recorded in config.json's TorchAoConfig."""
    tq = _torchao()
    if method == "int8_weight_only":
        cfg = tq.Int8WeightOnlyConfig()
        return dict.fromkeys(targets, cfg), cfg
    if method == "int8_dynamic":
        cfg = tq.Int8DynamicActivationInt8WeightConfig()
        return dict.fromkeys(targets, cfg), cfg
    if method == "int4_weight_only":
        if device.type == "cuda":
            from torchao.quantization.quantize_.workflows.int4.int4_packing_format import Int4PackingFormat

            cfg = tq.Int4WeightOnlyConfig(group_size=group_size,
                                          int4_packing_format=Int4PackingFormat.TILE_PACKED_TO_4D)
        else:
            cfg = tq.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=tq.PerGroup(group_size))
        return dict.fromkeys(targets, cfg), cfg
    from torchao.quantization.quant_primitives import MappingType

    per_module = {}
    for name in targets:
        r = calibration[name]
        scale, zero_point = r.static_qparams()
        shape = (1,) * r.ndim  # torchao wants the scale's rank to equal the activation's
        per_module[name] = tq.Int8StaticActivationInt8WeightConfig(
            act_quant_scale=torch.full(shape, scale, dtype=torch.float32, device=device),
            act_quant_zero_point=torch.full(shape, zero_point, dtype=torch.int8, device=device),
            granularity=tq.PerTensor(), act_mapping_type=MappingType.ASYMMETRIC)
    # config.json gets the scale-free form; the scales live in quantization.json (see the module docstring).
    return per_module, tq.Int8StaticActivationInt8WeightConfig(granularity=tq.PerTensor(),
                                                               act_mapping_type=MappingType.ASYMMETRIC)


def _check_inputs(model: nn.Module, method: str, targets: list[str], calibration, group_size: int,
                  quantize_head: bool) -> None:
    if method not in QUANT_METHODS:
        raise LmcycleError(f"unknown quantization method {method!r} (known: {', '.join(QUANT_METHODS)})",
                           field="method")
    if not any(p.is_floating_point() for p in model.parameters()):
        raise LmcycleError("the model has no floating-point weights to quantize", field="model")
    _check_quantizable(model, method)
    if method in _CASTS:
        return
    if not targets:
        kinds = sorted({type(m).__name__ for m in model.modules() if "Conv1D" in type(m).__name__})
        hint = f" (its {', '.join(kinds)} layers are not supported)" if kinds else ""
        raise LmcycleError(f"{type(model).__name__} has no nn.Linear layer to quantize{hint}", field="model")
    if quantize_head and _embedding_tied(model):
        raise LmcycleError("the LM head shares its weight with the input embeddings (tie_word_embeddings); "
                           "quantizing it would untie them: leave quantize_head false", field="quantize_head")
    if method == "int4_weight_only":
        modules = dict(model.named_modules())
        bad = [n for n in targets if modules[n].in_features % group_size]
        if bad:
            raise LmcycleError(f"int4_weight_only groups {group_size} inputs; {bad[0]} has "
                               f"{modules[bad[0]].in_features} (not a multiple); choose another group_size",
                               field="group_size")
    if method == "int8_static":
        if calibration is None:
            raise LmcycleError("int8_static needs calibration ranges (run calibrate() on sample texts)",
                               field="calibration")
        if not isinstance(calibration, dict) or not all(isinstance(v, ActivationRange) for v in calibration.values()):
            raise LmcycleError("calibration must be the {layer: ActivationRange} that calibrate() returns",
                               field="calibration")
        missing = [n for n in targets if n not in calibration]
        if missing:
            raise LmcycleError(f"no calibration range for {len(missing)} layer(s), e.g. {missing[0]} (never run "
                               "during calibration)", field="calibration")


def quantize_model(model: nn.Module, method: str, *, calibration: dict[str, ActivationRange] | None = None,
                   quantize_head: bool = False, embeddings: bool = True, group_size: int = 32,
                   compile: bool = False) -> nn.Module:
    """A quantized deep copy of ``model`` (the original is never changed, also when this raises).

    The copy carries ``.quantization`` (the record :func:`save_quantized` writes) and, for torchao methods, the
    ``hf_quantizer`` that lets ``save_pretrained`` serialize it. ``calibration`` (from :func:`calibrate`) is required
    for ``int8_static``. Runs on the model's device (CPU or CUDA).
    """
    targets = linear_targets(model, quantize_head)
    _check_inputs(model, method, targets, calibration, group_size, quantize_head)
    device = next(model.parameters()).device
    record: dict[str, Any] = {"method": method, "compile": compile, "quantize_head": quantize_head,
                              "group_size": group_size if method == "int4_weight_only" else None}
    q = copy.deepcopy(model)
    if method in _CASTS:
        _cast(q, _CASTS[method])
        q.quantization = {**record, "dtype": str(_CASTS[method]).removeprefix("torch."), "linears": [],
                          "embeddings": []}
        return q
    if method == "int4_weight_only" and device.type == "cuda":
        q.to(torch.bfloat16)  # tinygemm's int4 kernel takes bf16 activations
    per_module, saved_cfg = _configs(method, calibration, targets, group_size, device)
    emb = embedding_targets(q) if embeddings else []
    tq = _torchao()
    modules = dict(q.named_modules())
    for name, cfg in per_module.items():
        tq.quantize_(modules[name], cfg)
    for name in emb:
        tq.quantize_(modules[name], tq.Int8WeightOnlyConfig(), filter_fn=lambda m, _fqn: isinstance(m, nn.Embedding))
    _attach_hf_quantizer(q, saved_cfg, targets, emb)
    record.update(dtype=str(next(p.dtype for p in q.parameters())).removeprefix("torch."), linears=targets,
                  embeddings=emb)
    if calibration is not None:
        record["calibration"] = {n: asdict(r) for n, r in calibration.items() if n in targets}
    q.quantization = record
    return q


def _cast(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast parameters and saved buffers the way ``from_pretrained(dtype=...)`` loads them, so that the in-memory
    model equals its reload: modules the architecture keeps in fp32 (T5's ``wo`` in fp16) and non-persistent
    buffers (rotary frequencies) stay as they are."""
    keep = set(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    if dtype == torch.float16:
        keep |= set(getattr(model, "_keep_in_fp32_modules", None) or [])
    for module_name, module in model.named_modules():
        if any(k in module_name.split(".") for k in keep):
            continue
        for p in module.parameters(recurse=False):
            if p.is_floating_point():
                p.data = p.data.to(dtype)
        for name, b in module.named_buffers(recurse=False):
            if b.is_floating_point() and name not in module._non_persistent_buffers_set:
                setattr(module, name, b.to(dtype))


def _attach_hf_quantizer(model: nn.Module, quant_type, linears: list[str], embeddings: list[str]) -> None:
    """What ``from_pretrained(quantization_config=TorchAoConfig(...))`` would have set, so save_pretrained works."""
    from transformers import TorchAoConfig
    from transformers.quantizers.quantizer_torchao import TorchAoHfQuantizer

    if not hasattr(model, "config"):
        return
    skipped = sorted({n for n, m in model.named_modules() if isinstance(m, nn.Linear)} - set(linears))
    qc = TorchAoConfig(quant_type=quant_type, modules_to_not_convert=skipped or None,
                       include_input_output_embeddings=bool(embeddings))
    model.hf_quantizer = TorchAoHfQuantizer(qc, pre_quantized=True)
    model.config.quantization_config = qc


# -- save / load -------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _static_scales_detached(model: nn.Module) -> Any:
    """Take the static activation scales off the int8 weights while saving (transformers' loader cannot read
    them back); they are in quantization.json."""
    held = []
    for m in model.modules():
        w = getattr(m, "weight", None)
        if getattr(w, "act_quant_scale", None) is not None:
            held.append((w, w.act_quant_scale, w.act_quant_zero_point))
            w.act_quant_scale, w.act_quant_zero_point = None, None
    try:
        yield
    finally:
        for w, scale, zero_point in held:
            w.act_quant_scale, w.act_quant_zero_point = scale, zero_point


def save_quantized(model: nn.Module, tokenizer, out_dir: str | os.PathLike,
                   record: dict[str, Any] | None = None) -> Path:
    """Write ``out_dir`` atomically: ``save_pretrained`` (safetensors, int8/int4 data as stored), the tokenizer and
    ``quantization.json`` (``record``, default the model's ``.quantization``)."""
    record = record if record is not None else getattr(model, "quantization", None)
    if not record or record.get("method") not in QUANT_METHODS:
        raise LmcycleError("no quantization record: pass the model quantize_model() returned", field="record")
    out = Path(out_dir)
    with atomic_dir(out) as tmp, _static_scales_detached(model):
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / RECORD_FILE, record)
    return out


def is_quantized_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder :func:`save_quantized` wrote."""
    return (Path(path) / RECORD_FILE).is_file() and (Path(path) / "config.json").is_file()


def read_record(path: str | os.PathLike) -> dict[str, Any]:
    try:
        return json.loads((Path(path) / RECORD_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LmcycleError(f"cannot read {RECORD_FILE}: {e}", file=path) from None


def model_class(path: Path):
    """The transformers class that ``path``'s config.json names in ``architectures``."""
    import transformers

    architectures = json.loads((path / "config.json").read_text(encoding="utf-8")).get("architectures") or []
    for arch in architectures:
        if hasattr(transformers, arch):
            return getattr(transformers, arch)
    raise LmcycleError(f"config.json names no known architecture ({architectures})", file=path / "config.json")


def load_quantized(path: str | os.PathLike, device: str | torch.device = "auto", attn_implementation: str = "sdpa"
                   ) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` from a :func:`save_quantized` folder, in eval mode on ``device`` (``auto``: CUDA when
    present, else CPU), with its record as ``model.quantization`` (static activation scales put back)."""
    from transformers import AutoTokenizer

    path = Path(path)
    device = resolve_device(device)
    check_attn_implementation(attn_implementation, device)
    record = read_record(path)
    dtype = getattr(torch, record.get("dtype") or "float32")
    try:
        # No device_map: transformers needs accelerate for one, which is not a dependency of ours.
        model = model_class(path).from_pretrained(
            path, dtype=dtype, attn_implementation=hf_attn_implementation(attn_implementation)).to(device)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, RuntimeError) as e:
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LmcycleError(f"cannot load quantized model: {first_line}", file=path) from None
    if record["method"] == "int8_static":
        _restore_static_scales(model, record, device)
    model.quantization = record
    model.eval()
    return model, tokenizer


def _restore_static_scales(model: nn.Module, record: dict[str, Any], device: torch.device) -> None:
    modules = dict(model.named_modules())
    for name, r in record.get("calibration", {}).items():
        scale, zero_point = ActivationRange(**r).static_qparams()
        shape = (1,) * r["ndim"]
        weight = modules[name].weight
        weight.act_quant_scale = torch.full(shape, scale, dtype=torch.float32, device=device)
        weight.act_quant_zero_point = torch.full(shape, zero_point, dtype=torch.int8, device=device)


def maybe_compile(model: nn.Module, record: dict[str, Any] | None = None) -> nn.Module:
    """``torch.compile(model)`` when the record (default ``model.quantization``) says ``compile: true``, else the
    model itself. torchao's int8 layers dispatch through tensor subclasses: slow in eager mode, fused once compiled
    (the first calls then take tens of seconds to compile)."""
    record = record if record is not None else getattr(model, "quantization", {}) or {}
    return torch.compile(model) if record.get("compile") else model
