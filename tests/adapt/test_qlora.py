"""QLoRA: int8/NF4 quantization error bounds, packing, memory, quantized logits, training, merging, PEFT parity.

Tolerance for quantized logits: a quantized layer perturbs its output by about its relative weight error
ε = ‖W - Q(W)‖ / ‖W‖ (for inputs not aligned with the error). To first order the perturbations of layers in
sequence add up, but residual connections and normalisation keep the logits' relative error within a small
multiple of the largest ε in these 1-2 layer models (measured ≤ 2.1 ε over llama/gpt2/t5 and both schemes), so we
require ‖Δlogits‖ / ‖logits‖ ≤ 3 ε: int8 (ε ≈ 0.006) has to be ~16x tighter than NF4 (ε ≈ 0.1).
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import tiny_lm
import torch
import torch.nn.functional as F
from test_lora import logits, randomise_b, tiny
from torch import nn
from transformers.pytorch_utils import Conv1D

from lmcycle.adapt.lora import (
    LoraConfig,
    LoraLinear,
    add_lora,
    load_lora,
    lora_layers,
    merge_and_unload,
    merge_lora,
    merge_qlora,
    save_lora,
)
from lmcycle.adapt.qlora import (
    NF4_BLOCK,
    NF4_CODES,
    QuantLinear,
    dequantize_int8,
    dequantize_nf4,
    pack_nibbles,
    quantize_int8,
    quantize_model,
    quantize_nf4,
    unpack_nibbles,
    weight_memory,
)
from lmcycle.errors import LmcycleError
from lmcycle.train.loop import lm_loss_sum


def quantized_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in model.named_buffers() if n.endswith(("qweight", "scale_bits"))}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def weight_error(base: nn.Module, quantized: nn.Module) -> float:
    """The largest relative weight error ε over the quantized layers."""
    originals = dict(base.named_modules())
    return max(rel_err(q.dequantize(), originals[path.removesuffix(".base_layer")].weight)
               for path, q in quantized.named_modules() if isinstance(q, QuantLinear))


def test_nf4_table_is_bitsandbytes_normal_quantiles():
    # bitsandbytes' create_normal_map(offset=0.9677083): 8 positive and 7 negative normal quantiles, 0, scaled.
    offset = 0.9677083
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([pos, neg, torch.zeros(1, dtype=torch.float64)]).sort().values
    values /= values.max()
    assert NF4_CODES.shape == (16,) and NF4_CODES[7] == 0 and NF4_CODES[0] == -1 and NF4_CODES[15] == 1
    assert (NF4_CODES.double() - values).abs().max() <= 1e-6


def test_int8_error_is_at_most_half_a_step_per_row():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 37, generator=g) * torch.tensor([1e-3, 0.02, 1.0, 50.0, 0.5, 0.0])[:, None]
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and q.shape == w.shape and scale.shape == (6,)
    assert int(q.abs().max()) == 127  # the absmax of each non-zero row uses the full range
    err = (dequantize_int8(q, scale) - w).abs().amax(dim=1)
    assert torch.all(err <= scale / 2 * (1 + 1e-5))
    assert torch.allclose(scale, w.abs().amax(dim=1) / 127)
    assert torch.equal(dequantize_int8(q, scale)[5], torch.zeros(37))  # an all-zero row stays exactly zero


def test_nf4_values_are_absmax_times_the_nearest_code():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(7, 20, generator=g)  # 140 weights: two full blocks of 64 and one padded block
    w[0, :] *= 30.0
    w[4:, :] = 0.0  # the third block (weights 128..139) is all zeros
    packed, absmax = quantize_nf4(w)
    n_blocks = math.ceil(w.numel() / NF4_BLOCK)
    assert packed.dtype == torch.uint8 and packed.shape == (n_blocks * NF4_BLOCK // 2,) and absmax.shape == (n_blocks,)
    deq = dequantize_nf4(packed, absmax, NF4_CODES, w.numel())
    assert deq.shape == (w.numel(),)

    flat = w.reshape(-1)
    block_absmax = torch.stack([flat[i:i + NF4_BLOCK].abs().max() for i in range(0, flat.numel(), NF4_BLOCK)])
    assert torch.equal(absmax, block_absmax)
    per_weight_absmax = block_absmax.repeat_interleave(NF4_BLOCK)[:flat.numel()]
    candidates = per_weight_absmax[:, None] * NF4_CODES[None, :]  # (140, 16): every value a weight may take
    assert torch.all((candidates == deq[:, None]).any(dim=1))
    nearest = (candidates - flat[:, None]).abs().min(dim=1).values
    assert torch.all((deq - flat).abs() <= nearest + 1e-6 * per_weight_absmax)
    assert torch.equal(deq[128:], torch.zeros(12))


def test_nibble_packing_roundtrip_and_order():
    codes = torch.randint(0, 16, (2 * 50,), generator=torch.Generator().manual_seed(2))
    packed = pack_nibbles(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (50,)
    assert torch.equal(unpack_nibbles(packed), codes)
    assert int(packed[0]) == 16 * int(codes[0]) + int(codes[1])  # bitsandbytes order: first code high


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_quant_linear_matches_its_dequantized_weight_and_passes_gradients(kind, bits):
    torch.manual_seed(0)
    layer = nn.Linear(48, 24) if kind == "linear" else Conv1D(24, 48)  # Conv1D(nf=out, nx=in)
    nn.init.normal_(layer.bias)
    q = QuantLinear(layer, bits)
    assert (q.in_features, q.out_features) == (48, 24)
    w = q.dequantize()
    assert w.shape == layer.weight.shape and w.dtype == layer.weight.dtype
    assert 0 < rel_err(w, layer.weight.detach()) < (0.02 if bits == 8 else 0.15)

    x = torch.randn(3, 5, 48, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    reference = copy.deepcopy(layer)
    with torch.no_grad():
        reference.weight.copy_(w)
    out, out_ref = q(x), reference(x_ref)
    assert out.shape == (3, 5, 24) and torch.allclose(out, out_ref, atol=1e-6)
    grad = torch.randn(3, 5, 24)
    out.backward(grad)
    out_ref.backward(grad)
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-6)
    assert not any(p.requires_grad for p in q.parameters())
    stored = 24 * 48 + 4 * 24 if bits == 8 else 24 * 48 // 2 + 4 * (24 * 48 // NF4_BLOCK)
    assert q.weight_bytes() == stored


def test_casting_the_model_does_not_round_the_quantization_state():
    q = QuantLinear(nn.Linear(64, 8), 4)
    before = q.dequantize()
    q.to(torch.bfloat16)
    assert torch.equal(q.dequantize(), before)  # scales and codes are integer buffers, which casts leave alone
    assert q(torch.randn(2, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("kind", ["llama", "gpt2", "t5"])
def test_quantize_model_bytes_and_logits(kind, bits):
    base = tiny(kind)
    model = copy.deepcopy(base)
    linears = {p: m for p, m in base.named_modules() if isinstance(m, nn.Linear | Conv1D) and p != "lm_head"}
    summary = quantize_model(model, bits)

    assert summary["layers"] == len(linears) and summary["bits"] == bits
    quantized = {p: m for p, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert quantized.keys() == linears.keys()
    assert isinstance(model.lm_head, nn.Linear)
    assert model.get_input_embeddings().weight.dtype == torch.float32

    fp32 = sum(4 * m.weight.numel() for m in linears.values())
    numels = [m.weight.numel() for m in linears.values()]
    rows = [q.out_features for q in quantized.values()]
    if bits == 8:
        expected = sum(numels) + 4 * sum(rows)  # 1 byte per weight + a float32 scale per row
    else:
        blocks = [math.ceil(n / NF4_BLOCK) for n in numels]
        expected = sum(b * NF4_BLOCK // 2 + 4 * b for b in blocks)  # half a byte per weight + a scale per 64
    assert summary["bytes_before"] == fp32 and summary["bytes_after"] == expected
    ratio = expected / fp32
    smallest_in = min(q.in_features for q in quantized.values())
    if bits == 8:
        assert 0.25 < ratio <= 0.25 + 1 / smallest_in
    else:
        assert 0.125 < ratio <= 0.125 + 1 / NF4_BLOCK + 1e-9

    memory, original = weight_memory(model), weight_memory(base)
    assert original["stored_bytes"] == original["fp32_bytes"] and original["quantized_layers"] == 0
    assert memory["fp32_bytes"] == original["fp32_bytes"] and memory["quantized_layers"] == len(linears)
    assert memory["stored_bytes"] == original["stored_bytes"] - fp32 + expected

    eps = weight_error(base, model)
    assert (0.003 < eps < 0.01) if bits == 8 else (0.05 < eps < 0.15)
    assert 0 < rel_err(logits(model), logits(base)) <= 3 * eps


@pytest.mark.parametrize("arch,bits", [("llama", 4), ("gpt2", 8), ("t5", 4)])
def test_qlora_training_changes_only_the_adapter(arch, bits, tok, t5_tok):
    seq2seq = arch == "t5"
    tokenizer = t5_tok if seq2seq else tok
    model = getattr(tiny_lm, f"tiny_{arch}")(tokenizer)
    quantize_model(model, bits)
    add_lora(model, LoraConfig(r=4, alpha=8))
    assert lora_layers(model) and all(isinstance(m.base_layer, QuantLinear) for m in lora_layers(model).values())
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())
    buffers = quantized_state(model)

    texts = tiny_lm.sentences(8, seed=3)
    if seq2seq:
        enc = tokenizer(texts[:4], padding=True, return_tensors="pt")
        labels = tokenizer(texts[4:], padding=True, return_tensors="pt")["input_ids"]
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                 "labels": labels.masked_fill(labels == tokenizer.pad_token_id, -100)}
    else:
        enc = tokenizer(texts, padding=True, return_tensors="pt")
        batch = {**enc, "labels": enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    model.train()
    losses = []
    for _ in range(8):
        loss_sum, n = lm_loss_sum(model, batch)
        (loss_sum / n).backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss_sum.detach()) / n)
    assert losses[-1] < losses[0] - 0.1

    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in frozen.items())
    assert all(not torch.equal(after[n], p) for n, p in adapters.items() if "lora_B" in n)  # B moved off zero
    new_buffers = quantized_state(model)
    assert new_buffers.keys() == buffers.keys() and all(torch.equal(new_buffers[n], b) for n, b in buffers.items())


@pytest.mark.parametrize("kind", ["llama", "gpt2", "t5"])
def test_merge_refused_on_quantized_and_merge_qlora_into_fp32(kind, tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny(kind)
    qmodel = copy.deepcopy(base)
    quantize_model(qmodel, 4)
    add_lora(qmodel, LoraConfig(r=4, alpha=8))
    randomise_b(qmodel)
    adapted = logits(qmodel)
    state = {k: v.clone() for k, v in qmodel.state_dict().items()}

    with pytest.raises(LmcycleError, match="full-precision"):
        merge_lora(qmodel)
    with pytest.raises(LmcycleError, match="full-precision"):
        merge_and_unload(qmodel)
    assert all(layer.merged is None for layer in lora_layers(qmodel).values())
    assert all(torch.equal(qmodel.state_dict()[k], v) for k, v in state.items())
    assert torch.equal(logits(qmodel), adapted)

    save_lora(qmodel, "default", tmp_path / "adapter", base_model_name_or_path="tiny")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] == (kind == "gpt2")

    fp32_adapted = logits(load_lora(copy.deepcopy(base), tmp_path / "adapter"))
    merged = merge_qlora(copy.deepcopy(base), tmp_path / "adapter")
    assert not lora_layers(merged) and not any(isinstance(m, QuantLinear | LoraLinear) for m in merged.modules())
    assert merged.state_dict().keys() == base.state_dict().keys()
    assert (logits(merged) - fp32_adapted).abs().max() <= 1e-5
    # The quantized model with the same adapter differs from the merged one by the base's quantization only.
    assert rel_err(adapted, logits(merged)) <= 3 * weight_error(base, qmodel)
    assert (logits(merged) - logits(base)).abs().max() > 1e-3  # the adapter really does something

    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").eval()
    assert (logits(theirs) - fp32_adapted).abs().max() <= 1e-5


def test_bad_inputs(tmp_path):
    with pytest.raises(LmcycleError, match="bits"):
        quantize_model(tiny("llama"), 3)
    with pytest.raises(LmcycleError, match="bits"):
        QuantLinear(nn.Linear(4, 4), 2)
    with pytest.raises(LmcycleError, match="nothing to quantize"):
        quantize_model(nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4)), 8)
    with pytest.raises(LmcycleError, match="nothing to quantize"):
        quantize_model(tiny("gpt2"), 8, skip=("c_attn", "c_proj", "c_fc"))
    model = tiny("llama")
    quantize_model(model, 8)
    with pytest.raises(LmcycleError, match="already quantized"):
        quantize_model(model, 4)
    with pytest.raises(LmcycleError, match="quantize the base first"):
        quantize_model(add_lora(tiny("llama"), LoraConfig(r=2)), 4)

    add_lora(model, LoraConfig(r=2))
    save_lora(model, "default", tmp_path / "a")
    with pytest.raises(LmcycleError, match="full-precision base"):
        merge_qlora(model, tmp_path / "a")
    with pytest.raises(LmcycleError, match="missing"):
        merge_qlora(tiny("llama"), tmp_path / "nowhere")


def test_skip_keeps_named_layers_in_full_precision():
    model = tiny("llama")
    summary = quantize_model(model, 8, skip=("lm_head", "mlp.down_proj"))
    assert all(isinstance(layer.mlp.down_proj, nn.Linear) for layer in model.model.layers)
    assert all(isinstance(layer.mlp.up_proj, QuantLinear) for layer in model.model.layers)
    assert summary["layers"] == sum(isinstance(m, QuantLinear) for m in model.modules())
    # A quantized layer computes with exactly its dequantized weight.
    x = torch.randn(2, 32)
    q = model.model.layers[0].self_attn.q_proj
    assert torch.allclose(q(x), F.linear(x, q.dequantize()), atol=1e-6)


def test_t5_feed_forward_output_layer_can_be_quantized_and_adapted():
    # T5's feed-forward reads ``wo.weight`` to pick a dtype; a quantized or wrapped wo must not break it.
    model = tiny("t5")
    quantize_model(model, 4)
    before = logits(model)
    add_lora(model, LoraConfig(r=2, target_modules=["wo"]))
    assert all(isinstance(m.base_layer, QuantLinear) for m in lora_layers(model).values())
    assert torch.equal(logits(model), before)  # B starts at zero
    randomise_b(model)
    assert (logits(model) - before).abs().max() > 1e-3
