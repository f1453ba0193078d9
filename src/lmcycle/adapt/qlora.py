"""QLoRA: LoRA adapters over a frozen base whose linear weights are stored quantized (int8 or 4-bit NF4).

:func:`quantize_model` swaps every ``nn.Linear`` / GPT-2 ``Conv1D`` (except the output head) for a
:class:`QuantLinear` in place; ``lora.add_lora`` then wraps those as it wraps ordinary linears, and only the
adapters train. Gradients flow through the frozen quantized layers to their inputs, dequantizing the weight again
in the backward pass instead of keeping a full-precision copy alive between forward and backward.

Two schemes, both weight-only (activations stay in the model's dtype):

- ``bits=8``: symmetric int8 with one absmax scale per output channel (row of the (out, in) weight).
- ``bits=4``: NF4, the 4-bit NormalFloat of the QLoRA paper with bitsandbytes' exact 16 code values, one absmax
  per block of 64 consecutive weights of the flattened (out, in) weight, two codes per byte (first code in the
  high nibble, as bitsandbytes packs them). A weight whose size is not a multiple of 64 is padded with zeros to
  whole blocks (zeros change no block's absmax and are stored as the exact code 0.0). Double quantization of the
  block scales (QLoRA's second trick, saving ~0.4 bit per weight) is not implemented: scales stay float32.

Never merge an adapter into quantized weights: rounding ``W + ΔW`` back to 4 or 8 bits throws most of the small
update away (peft #2321). :func:`lmcycle.adapt.lora.merge_qlora` merges into a full-precision copy of the base instead.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from lmcycle.errors import LmcycleError

NF4_BLOCK = 64
# bitsandbytes' NF4 table (functional.py, get_4bit_type("nf4")): normal quantiles scaled to [-1, 1], exact 0.
NF4_CODES = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526794, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (out, in) float -> (q (out, in) int8 in [-127, 127], scale (out,) float32) with w ≈ q · scale[:, None]."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1) / 127
    q = torch.round(w / scale.clamp_min(torch.finfo(torch.float32).tiny)[:, None]).clamp_(-127, 127)
    return q.to(torch.int8), scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q (out, in) int8, scale (out,) -> float32 (out, in)."""
    return q.float() * scale[:, None]


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """codes (2n,) integers in [0, 15] -> (n,) uint8, code 2i in the high nibble and 2i+1 in the low one."""
    codes = codes.to(torch.uint8).reshape(-1, 2)
    return (codes[:, 0] << 4) | codes[:, 1]


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """packed (n,) uint8 -> codes (2n,) int64 in [0, 15], the inverse of :func:`pack_nibbles`."""
    return torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1).long()


def quantize_nf4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (any shape, numel N) -> (packed (ceil(N/64)·32,) uint8, absmax (ceil(N/64),) float32).

    Each block of 64 flattened weights is divided by its absmax and rounded to the nearest NF4 code.
    """
    flat = w.detach().float().reshape(-1)
    flat = F.pad(flat, (0, -flat.numel() % NF4_BLOCK)).reshape(-1, NF4_BLOCK)
    absmax = flat.abs().amax(dim=1)
    normed = flat / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
    # Nearest code = which interval between consecutive codes' midpoints the value falls in.
    codes = NF4_CODES.to(flat.device)
    idx = torch.bucketize(normed, (codes[1:] + codes[:-1]) / 2)
    return pack_nibbles(idx.reshape(-1)), absmax


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, codes: torch.Tensor, numel: int) -> torch.Tensor:
    """packed (N'/2,) uint8, absmax (N'/64,), codes (16,) float32 -> float32 (numel,) (padding dropped)."""
    values = codes[unpack_nibbles(packed)].reshape(-1, NF4_BLOCK) * absmax[:, None]
    return values.reshape(-1)[:numel]


class _DequantLinearFn(torch.autograd.Function):
    """y = x @ W.T with W dequantized in forward and again in backward, so no full weight outlives the call."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: QuantLinear) -> torch.Tensor:
        ctx.layer = layer
        return F.linear(x, layer.weight_out_in().to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad_out @ ctx.layer.weight_out_in().to(grad_out.dtype), None


def _as_int32(t: torch.Tensor) -> torch.Tensor:
    # Float state is kept as int32 bit patterns so that model.half()/.to(bfloat16) cannot round it.
    return t.float().contiguous().view(torch.int32)


class QuantLinear(nn.Module):
    """A frozen ``nn.Linear`` or ``Conv1D`` whose weight is stored as int8 (bits=8) or packed NF4 (bits=4).

    ``forward(x)``: x (..., in) -> (..., out) = x @ dequantize(W).T + bias, in ``x``'s dtype; differentiable with
    respect to ``x`` only (the weight and bias are frozen). Buffers: ``qweight`` (int8 (out, in), or uint8 packed
    NF4), ``scale_bits`` (float32 scales as int32 bits: one per row for int8, one per 64-block for NF4).
    """

    # No float weight exists; transformers code that peeks at ``.weight`` (T5's feed-forward dtype cast) checks
    # ``isinstance(weight, Tensor)`` and so leaves the activations alone. Use dequantize() for the values.
    weight = None

    def __init__(self, base: nn.Linear | Conv1D, bits: Literal[8, 4]):
        super().__init__()
        if bits not in (8, 4):
            raise LmcycleError(f"quantization bits must be 8 or 4, got {bits!r}", field="bits")
        w = base.weight.detach()
        self.fan_in_fan_out = isinstance(base, Conv1D)  # the original weight was (in, out)
        w_out_in = w.T if self.fan_in_fan_out else w
        self.out_features, self.in_features = w_out_in.shape
        self.bits = bits
        self.dtype = w.dtype
        q, scale = quantize_int8(w_out_in) if bits == 8 else quantize_nf4(w_out_in)
        self.register_buffer("qweight", q)
        self.register_buffer("scale_bits", _as_int32(scale))
        self.register_buffer("code_bits", _as_int32(NF4_CODES).to(w.device), persistent=False)
        bias = base.bias.detach().clone() if base.bias is not None else None
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def weight_out_in(self) -> torch.Tensor:
        """The dequantized weight as float32 (out, in), whatever the original layout."""
        scale = self.scale_bits.view(torch.float32)
        if self.bits == 8:
            return dequantize_int8(self.qweight, scale)
        flat = dequantize_nf4(self.qweight, scale, self.code_bits.view(torch.float32),
                              self.out_features * self.in_features)
        return flat.reshape(self.out_features, self.in_features)

    def dequantize(self) -> torch.Tensor:
        """The dequantized weight in the original layer's layout and dtype: (out, in), or (in, out) for Conv1D."""
        w = self.weight_out_in()
        return (w.T if self.fan_in_fan_out else w).to(self.dtype)

    def weight_bytes(self) -> int:
        """Bytes of the stored quantized weight plus its scales (the bias is not counted)."""
        return self.qweight.numel() * self.qweight.element_size() + self.scale_bits.numel() * 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _DequantLinearFn.apply(x, self)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def extra_repr(self) -> str:
        scheme = "int8" if self.bits == 8 else "nf4"
        return f"in_features={self.in_features}, out_features={self.out_features}, {scheme}"


def _skipped(path: str, skip: tuple[str, ...] | list[str]) -> bool:
    return any(path == s or path.endswith("." + s) for s in skip)


def quantize_model(model: nn.Module, bits: Literal[8, 4], skip: tuple[str, ...] | list[str] = ("lm_head",)) -> dict:
    """Replace every ``nn.Linear`` / ``Conv1D`` of ``model`` by a :class:`QuantLinear`, in place.

    Kept in full precision: the output head (``model.get_output_embeddings()``, often tied to the input
    embeddings), embeddings and norms, and every module whose path equals, or ends with ``.`` + , a name in
    ``skip``. Quantize before adding LoRA. Returns ``{"bits", "scheme", "layers", "bytes_before", "bytes_after"}``
    where the bytes are those of the replaced layers' weights (before: as stored, in their dtype; after: quantized
    weights plus scales).
    """
    if bits not in (8, 4):
        raise LmcycleError(f"quantization bits must be 8 or 4, got {bits!r}", field="bits")
    if any(hasattr(m, "lora_A") for m in model.modules()):
        raise LmcycleError("the model already has LoRA adapters: quantize the base first, then add LoRA")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    paths = [p for p, m in model.named_modules()
             if isinstance(m, nn.Linear | Conv1D) and m is not head and p and not _skipped(p, skip)]
    if not paths:
        already = any(isinstance(m, QuantLinear) for m in model.modules())
        raise LmcycleError("the model is already quantized" if already else
                           f"nothing to quantize: no Linear/Conv1D layer outside the output head and skip {list(skip)}")
    before = after = 0
    for path in paths:
        layer = model.get_submodule(path)
        quant = QuantLinear(layer, bits)
        before += layer.weight.numel() * layer.weight.element_size()
        after += quant.weight_bytes()
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent), child, quant)
    return {"bits": bits, "scheme": "int8" if bits == 8 else "nf4", "layers": len(paths),
            "bytes_before": before, "bytes_after": after}


def weight_memory(model: nn.Module) -> dict[str, int]:
    """Weight memory of ``model`` as stored now vs the same model with every weight in float32.

    ``{"stored_bytes", "fp32_bytes", "quantized_layers"}``: parameters (each shared tensor once, LoRA adapters
    included) at their dtype plus each QuantLinear's packed weight and scales; ``fp32_bytes`` counts 4 bytes per
    parameter and per original weight element of every QuantLinear.
    """
    quant = [m for m in model.modules() if isinstance(m, QuantLinear)]
    params = list(model.parameters())  # deduplicates tied parameters
    stored = sum(p.numel() * p.element_size() for p in params) + sum(q.weight_bytes() for q in quant)
    fp32 = 4 * (sum(p.numel() for p in params) + sum(q.in_features * q.out_features for q in quant))
    return {"stored_bytes": stored, "fp32_bytes": fp32, "quantized_layers": len(quant)}
