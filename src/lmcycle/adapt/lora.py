"""LoRA: low-rank adapters on linear layers, in plain PyTorch, saved and loaded in PEFT's on-disk format.

A frozen weight ``W`` (out × in) gets a trainable update ``ΔW = B @ A · scaling`` with ``A`` (r × in) and ``B``
(out × r); ``B`` starts at zero so the adapted model starts exactly equal to the base. Several named adapters can
live on one base, one active at a time (or none: the base itself), or one per batch row (:func:`per_row_adapters`,
for a server batching requests that ask for different adapters). ``merge_lora`` folds the active adapter into
the base weights for fast serving; ``unmerge_lora`` takes it back out. The base layers may also be quantized
(:class:`lmcycle.adapt.qlora.QuantLinear`, for QLoRA); adapters are never merged into those.

Files written by :func:`save_lora` load with ``peft.PeftModel.from_pretrained`` (and vLLM), and adapters saved by
PEFT load with :func:`load_lora`. PEFT itself is never imported here.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from pydantic import Field
from torch import nn
from transformers.pytorch_utils import Conv1D

from lmcycle.adapt.adapters import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    read_adapter,
    reject_unknown_settings,
    write_adapter,
)
from lmcycle.adapt.qlora import QuantLinear
from lmcycle.config import Config
from lmcycle.errors import LmcycleError
from lmcycle.models.load import is_seq2seq

KEY_PREFIX = "base_model.model."
LINEAR_TYPES = (nn.Linear, Conv1D, QuantLinear)


class LoraConfig(Config):
    """Rank, scale, dropout and target layers of one LoRA adapter."""

    r: int = Field(8, gt=0, description="rank of the update B @ A")
    alpha: float = Field(16, gt=0, description="scaling = alpha / r (rsLoRA: alpha / sqrt(r))")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter's input")
    target_modules: list[str] | None = Field(
        None, description="module names or regex suffix patterns; None: the attention projections of the model")
    use_rslora: bool = False


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _in_out(layer: nn.Linear | Conv1D | QuantLinear) -> tuple[int, int]:
    if isinstance(layer, QuantLinear):
        return layer.in_features, layer.out_features
    rows, cols = layer.weight.shape
    return (rows, cols) if isinstance(layer, Conv1D) else (cols, rows)


QUANTIZED_MERGE = ("cannot merge a LoRA adapter into quantized (int8/NF4) weights: rounding the merged weight "
                   "loses most of the update; merge into a full-precision copy of the base "
                   "(lmcycle.adapt.lora.merge_qlora)")


class LoraLinear(nn.Module):
    """An ``nn.Linear``, GPT-2 ``Conv1D`` or ``QuantLinear`` plus named low-rank adapters, at most one active.

    ``forward(x)``: x (..., in) -> (..., out) = base(x) + scaling · B(A(dropout(x))) for the active adapter,
    unless that adapter is merged into the base weight (then the base alone already includes it).
    With ``row_groups`` set (x (batch, ..., in)), each adapter's update is added to its own rows of the batch
    instead: the base runs once for the whole batch and each adapter only on its rows.
    """

    def __init__(self, base: nn.Linear | Conv1D | QuantLinear):
        super().__init__()
        self.base_layer = base
        # Conv1D stores its weight as (in, out): "fan_in_fan_out" in PEFT's words (also when quantized since).
        self.fan_in_fan_out = base.fan_in_fan_out if isinstance(base, QuantLinear) else isinstance(base, Conv1D)
        self.in_features, self.out_features = _in_out(base)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.active: str | None = None
        self.merged: str | None = None
        self.row_groups: list[tuple[str, slice | torch.Tensor]] | None = None  # (adapter, its rows)
        self.batch_rows = 0

    @property
    def weight(self) -> torch.Tensor | None:
        """The base layer's weight (None when quantized): transformers code reads it (T5's feed-forward, its dtype)."""
        return self.base_layer.weight

    def add_adapter(self, name: str, r: int, scaling: float, dropout: float) -> None:
        """Add adapter ``name``: A (r × in) kaiming-uniform as PEFT does, B (out × r) zeros, both float32.

        float32 whatever the base's dtype (PEFT's ``autocast_adapter_dtype`` does the same over a 16-bit base):
        a bfloat16 B would round away updates smaller than 1/256 of its entries, and AdamW keeps its state in the
        parameter's dtype. :meth:`forward` casts the input to the adapter's dtype and the update back.
        """
        w = self.base_layer if isinstance(self.base_layer, QuantLinear) else self.base_layer.weight
        # A base still on the meta device (filled later by FSDP, shard by shard) gets real adapters, drawn on the
        # CPU as in one process; the engine moves them to its device.
        device = torch.device("cpu") if isinstance(w, torch.Tensor) and w.is_meta else w.device
        a = nn.Linear(self.in_features, r, bias=False, device=device, dtype=torch.float32)
        b = nn.Linear(r, self.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        nn.init.zeros_(b.weight)
        self.lora_A[name], self.lora_B[name] = a, b
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[name] = scaling

    def delta_weight(self, name: str) -> torch.Tensor:
        """B @ A · scaling in the base weight's layout: (out, in), or (in, out) for Conv1D."""
        delta = (self.lora_B[name].weight.float() @ self.lora_A[name].weight.float()) * self.scaling[name]
        return delta.T if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merge(self, name: str) -> None:
        if self.merged is not None:
            raise LmcycleError(f"adapter '{self.merged}' is already merged; unmerge it first")
        if isinstance(self.base_layer, QuantLinear):
            raise LmcycleError(QUANTIZED_MERGE)
        w = self.base_layer.weight
        w.copy_((w.float() + self.delta_weight(name)).to(w.dtype))
        self.merged = name

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged is None:
            return
        w = self.base_layer.weight
        w.copy_((w.float() - self.delta_weight(self.merged)).to(w.dtype))
        self.merged = None

    def _update(self, name: str, x: torch.Tensor) -> torch.Tensor:
        a, b = self.lora_A[name], self.lora_B[name]
        return b(a(self.lora_dropout[name](x.to(a.weight.dtype)))) * self.scaling[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.row_groups is not None:
            if x.shape[0] != self.batch_rows:
                raise LmcycleError(f"per-row adapters were set for {self.batch_rows} rows, the batch has {x.shape[0]}")
            for name, rows in self.row_groups:
                if isinstance(rows, slice):  # contiguous rows: views, no gather/scatter (much faster on CPU)
                    out[rows] += self._update(name, x[rows]).to(out.dtype)
                else:
                    out = out.index_add(0, rows, self._update(name, x.index_select(0, rows)).to(out.dtype))
            return out
        name = self.active
        if name is None or self.merged is not None:
            return out
        return out + self._update(name, x).to(out.dtype)


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """Every LoraLinear of ``model`` by module path."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


def default_targets(model: nn.Module) -> list[str]:
    """The attention projections LoRA adapts by default: Llama q_proj/v_proj, GPT-2 c_attn, T5 q/v."""
    leaves = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, (*LINEAR_TYPES, LoraLinear))}
    for names in (["q_proj", "v_proj"], ["c_attn"], ["q", "v"]):
        if set(names) <= leaves:
            return names
    raise LmcycleError(f"no default LoRA targets for {type(model).__name__}: set lora target_modules",
                       field="target_modules")


def _matches(path: str, pattern: str) -> bool:
    if re.fullmatch(r"\w+", pattern):
        return path == pattern or path.endswith("." + pattern)
    return re.fullmatch(rf"(?:.*\.)?(?:{pattern})", path) is not None


def find_targets(model: nn.Module, patterns: list[str]) -> list[str]:
    """Paths of the Linear/Conv1D/QuantLinear (or already-wrapped) modules whose path ends with one of ``patterns``."""
    for p in patterns:
        try:
            re.compile(p)
        except re.error as e:
            raise LmcycleError(f"target module pattern '{p}' is not a valid regex: {e}",
                               field="target_modules") from None
    found = []
    inside_lora = ()
    for path, module in model.named_modules():
        if inside_lora and path.startswith(inside_lora):
            continue  # base_layer and lora_A/B of a wrapped layer
        if isinstance(module, LoraLinear):
            inside_lora = (path + ".",)
        elif not isinstance(module, LINEAR_TYPES):
            continue
        if path and any(_matches(path, p) for p in patterns):
            found.append(path)
    if not found:
        raise LmcycleError(f"no Linear/Conv1D module matches target_modules {patterns}", field="target_modules")
    return found


def _wrap(model: nn.Module, path: str) -> LoraLinear:
    module = model.get_submodule(path)
    if isinstance(module, LoraLinear):
        return module
    parent_path, _, child = path.rpartition(".")
    wrapped = LoraLinear(module)
    setattr(model.get_submodule(parent_path), child, wrapped)
    return wrapped


def _inject(model: nn.Module, paths: list[str], name: str, r: int, scaling: float, dropout: float) -> None:
    for path in paths:
        layer = model.get_submodule(path)
        if isinstance(layer, LoraLinear) and layer.merged is not None:
            raise LmcycleError(f"cannot add adapter '{name}' while '{layer.merged}' is merged; unmerge first")
    for path in paths:
        _wrap(model, path).add_adapter(name, r, scaling, dropout)
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in lora_layers(model).values():
        if name in layer.lora_A:
            layer.lora_A[name].weight.requires_grad_(True)
            layer.lora_B[name].weight.requires_grad_(True)
    set_active_adapter(model, name)


def add_lora(model: nn.Module, cfg: LoraConfig, name: str = "default") -> nn.Module:
    """Inject adapter ``name`` into ``model`` in place, make it active and the only trainable thing.

    Every other parameter (base weights and other adapters) gets ``requires_grad=False``.
    """
    if any(name in layer.lora_A for layer in lora_layers(model).values()):
        raise LmcycleError(f"the model already has a LoRA adapter named '{name}'")
    paths = find_targets(model, cfg.target_modules or default_targets(model))
    _inject(model, paths, name, cfg.r, lora_scaling(cfg.r, cfg.alpha, cfg.use_rslora), cfg.dropout)
    model.lora_configs = {**getattr(model, "lora_configs", {}), name: cfg}
    return model


def set_active_adapter(model: nn.Module, name: str | None) -> None:
    """Make adapter ``name`` the one every LoRA layer applies; ``None``: run the base model alone."""
    layers = lora_layers(model)
    if name is not None and not any(name in layer.lora_A for layer in layers.values()):
        known = sorted({n for layer in layers.values() for n in layer.lora_A})
        raise LmcycleError(f"no LoRA adapter named '{name}' (the model has {known})")
    if any(layer.merged is not None for layer in layers.values()):
        raise LmcycleError("cannot switch adapters while one is merged; unmerge_lora first")
    for layer in layers.values():
        layer.active = name if name in layer.lora_A else None


def _rows(rows: list[int], device: torch.device) -> slice | torch.Tensor:
    if rows == list(range(rows[0], rows[-1] + 1)):
        return slice(rows[0], rows[-1] + 1)
    return torch.tensor(rows, device=device)


@contextmanager
def per_row_adapters(model: nn.Module, names: list[str | None]) -> Iterator[None]:
    """Inside the block, row i of every forward batch uses adapter ``names[i]`` (None: the base alone).

    One forward pass serves a batch of requests for different adapters (the base weights run once; each
    adapter's B @ A only on its rows), so a server need not split a mixed batch by adapter. The batch must
    keep ``len(names)`` rows (decoding with a KV cache does). The single active adapter is back afterwards.
    Rows sorted by adapter are fastest: each adapter then works on a slice of the batch.
    """
    layers = lora_layers(model)
    known = {n for layer in layers.values() for n in layer.lora_A}
    unknown = sorted({n for n in names if n is not None and n not in known})
    if unknown:
        raise LmcycleError(f"no LoRA adapter named {unknown} (the model has {sorted(known)})")
    if any(layer.merged is not None for layer in layers.values()):
        raise LmcycleError("cannot use per-row adapters while one is merged; unmerge_lora first")
    for layer in layers.values():
        device = layer.lora_B[next(iter(layer.lora_B))].weight.device
        groups = {}
        for i, name in enumerate(names):
            if name in layer.lora_A:
                groups.setdefault(name, []).append(i)
        layer.row_groups = [(n, _rows(rows, device)) for n, rows in groups.items()]
        layer.batch_rows = len(names)
    try:
        yield
    finally:
        for layer in layers.values():
            layer.row_groups, layer.batch_rows = None, 0


def merge_lora(model: nn.Module) -> None:
    """Add the active adapter's B @ A · scaling into the base weights (forward then skips the adapter)."""
    active = [layer for layer in lora_layers(model).values() if layer.active is not None]
    if any(isinstance(layer.base_layer, QuantLinear) for layer in active):
        raise LmcycleError(QUANTIZED_MERGE)  # checked first: no layer gets merged
    for layer in lora_layers(model).values():
        if layer.active is not None:
            layer.merge(layer.active)


def unmerge_lora(model: nn.Module) -> None:
    """Subtract a merged adapter back out of the base weights."""
    for layer in lora_layers(model).values():
        layer.unmerge()


def merge_and_unload(model: nn.Module) -> None:
    """Merge the active adapter and put every wrapped layer's base layer back in its place: the model is then
    an ordinary one again (the base's state-dict keys, every parameter trainable), for ``save_pretrained``."""
    merge_lora(model)
    for path in sorted(lora_layers(model), key=len, reverse=True):
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent), child, model.get_submodule(path).base_layer)
    if hasattr(model, "lora_configs"):
        del model.lora_configs
    for p in model.parameters():
        p.requires_grad_(True)


def lora_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """Adapter ``name``'s weights under PEFT's keys: ``base_model.model.<path>.lora_A.weight`` (r × in), ``lora_B``."""
    out = {}
    for path, layer in lora_layers(model).items():
        if name in layer.lora_A:
            out[f"{KEY_PREFIX}{path}.lora_A.weight"] = layer.lora_A[name].weight.detach()
            out[f"{KEY_PREFIX}{path}.lora_B.weight"] = layer.lora_B[name].weight.detach()
    if not out:
        raise LmcycleError(f"the model has no LoRA adapter named '{name}'")
    return out


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(parameters that require grad, parameters of the base model without any adapter)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    adapters = sum(p.numel() for layer in lora_layers(model).values()
                   for d in (layer.lora_A, layer.lora_B) for p in d.parameters())
    return trainable, sum(p.numel() for p in model.parameters()) - adapters


def save_lora(model: nn.Module, name: str, out_dir: str | os.PathLike,
              base_model_name_or_path: str | None = None) -> Path:
    """Write adapter ``name`` as ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT format), atomically."""
    tensors = {k: v.contiguous().cpu() for k, v in lora_state_dict(model, name).items()}
    layers = {p: layer for p, layer in lora_layers(model).items() if name in layer.lora_A}
    cfg = getattr(model, "lora_configs", {}).get(name)
    first = next(iter(layers.values()))
    r = first.lora_A[name].weight.shape[0]
    use_rslora = bool(cfg.use_rslora) if cfg else False
    # alpha is recovered from the scaling so that adapters loaded from disk save back unchanged.
    alpha = first.scaling[name] * (math.sqrt(r) if use_rslora else r)
    paths = sorted(layers)
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
    # PEFT matches a list by suffix; when that would adapt more layers than ours, name them exactly by regex.
    if all(p in layers for p in find_targets(model, leaves)):
        targets: list[str] | str = leaves
    else:
        targets = "^(" + "|".join(re.escape(p) for p in paths) + ")$"
    config = {
        "peft_type": "LORA",
        "task_type": "SEQ_2_SEQ_LM" if is_seq2seq(model) else "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": cfg.dropout if cfg else 0.0,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers.values()),
        "use_rslora": use_rslora,
        "modules_to_save": None,
        "inference_mode": True,
    }
    return write_adapter(out_dir, config, tensors)


# PEFT LoraConfig keys we implement, or that cannot change what a loaded adapter computes (initialisation,
# which modules a fresh adapter would target: loading follows the weights' own keys).
_UNDERSTOOD_KEYS = {"r", "lora_alpha", "lora_dropout", "target_modules", "bias", "fan_in_fan_out", "use_rslora",
                    "modules_to_save", "rank_pattern", "alpha_pattern", "use_dora", "init_lora_weights",
                    "layers_to_transform", "layers_pattern", "exclude_modules", "megatron_config", "megatron_core",
                    "qalora_group_size", "runtime_config", "loftq_config"}


def _read_adapter(path: Path) -> tuple[dict, dict]:
    config, tensors = read_adapter(path, "LORA")
    cfg_file = path / CONFIG_FILE
    reject_unknown_settings(config, _UNDERSTOOD_KEYS, cfg_file)
    unsupported = {"bias": config.get("bias", "none") not in (None, "none"),
                   "modules_to_save": bool(config.get("modules_to_save")),
                   "use_dora": bool(config.get("use_dora")),
                   "rank_pattern": bool(config.get("rank_pattern")),
                   "alpha_pattern": bool(config.get("alpha_pattern"))}
    for key, bad in unsupported.items():
        if bad:
            raise LmcycleError(f"unsupported value {config[key]!r}", file=cfg_file, field=key)
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), int | float) or config[key] <= 0:
            raise LmcycleError("must be a positive number", file=cfg_file, field=key)
    return config, tensors


def load_lora(model: nn.Module, adapter_dir: str | os.PathLike, name: str = "default") -> nn.Module:
    """Load a PEFT-format LoRA adapter as adapter ``name`` (active, trainable); all checks before any change."""
    path = Path(adapter_dir)
    config, tensors = _read_adapter(path)
    weights_file = path / WEIGHTS_FILE
    r = int(config["r"])
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = re.fullmatch(rf"{re.escape(KEY_PREFIX)}(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight", key)
        if m is None:
            raise LmcycleError(f"unexpected tensor '{key}' (only LoRA A/B weights are supported)", file=weights_file)
        pairs.setdefault(m.group(1), {})[m.group(2)] = t
    if not pairs:
        raise LmcycleError("the adapter has no LoRA weights", file=weights_file)
    if any(name in layer.lora_A for layer in lora_layers(model).values()):
        raise LmcycleError(f"the model already has a LoRA adapter named '{name}'")
    modules = dict(model.named_modules())
    for mpath, ab in sorted(pairs.items()):
        module = modules.get(mpath)
        if isinstance(module, LoraLinear):
            module = module.base_layer
        if not isinstance(module, LINEAR_TYPES):
            raise LmcycleError(f"adapter targets '{mpath}', which is not a Linear/Conv1D layer of this model",
                               file=weights_file)
        if set(ab) != {"lora_A", "lora_B"}:
            raise LmcycleError(f"'{mpath}' has {sorted(ab)} but needs both lora_A and lora_B", file=weights_file)
        in_f, out_f = _in_out(module)
        want = {"lora_A": (r, in_f), "lora_B": (out_f, r)}
        for k, shape in want.items():
            if tuple(ab[k].shape) != shape:
                raise LmcycleError(f"'{mpath}.{k}' has shape {tuple(ab[k].shape)}, this model needs {shape}",
                                   file=weights_file)
    scaling = lora_scaling(r, float(config["lora_alpha"]), bool(config.get("use_rslora", False)))
    _inject(model, sorted(pairs), name, r, scaling, float(config.get("lora_dropout") or 0.0))
    layers = lora_layers(model)
    with torch.no_grad():
        for mpath, ab in pairs.items():
            layers[mpath].lora_A[name].weight.copy_(ab["lora_A"])
            layers[mpath].lora_B[name].weight.copy_(ab["lora_B"])
    model.lora_configs = {**getattr(model, "lora_configs", {}), name: LoraConfig(
        r=r, alpha=float(config["lora_alpha"]), dropout=float(config.get("lora_dropout") or 0.0),
        target_modules=sorted(pairs), use_rslora=bool(config.get("use_rslora", False)))}
    return model


def merge_qlora(full_precision_model: nn.Module, adapter_dir: str | os.PathLike, name: str = "default") -> nn.Module:
    """Load a (Q)LoRA adapter into a full-precision copy of the base and merge it: a plain model, returned.

    ``full_precision_model`` is the unquantized base (reload it from disk); it is changed in place.
    """
    if any(isinstance(m, QuantLinear) for m in full_precision_model.modules()):
        raise LmcycleError("merge_qlora needs the full-precision base model, not the quantized one: reload the "
                           "base from disk and merge into that")
    load_lora(full_precision_model, adapter_dir, name=name)
    merge_and_unload(full_precision_model)
    return full_precision_model


def _active_adapter(model: nn.Module) -> str | None:
    return next((layer.active for layer in lora_layers(model).values() if layer.active is not None), None)


@contextmanager
def adapter_disabled(model: nn.Module) -> Iterator[None]:
    """Run ``model`` as its base (no LoRA adapter) inside the block; the active adapter comes back afterwards,
    also when the block raises."""
    previous = _active_adapter(model)
    set_active_adapter(model, None)
    try:
        yield
    finally:
        set_active_adapter(model, previous)
