"""Memory and compute planner: what it takes to train a model fully, with LoRA, QLoRA or prompt tuning.

Parameters are counted exactly by building the model on the ``meta`` device (no memory, no weights) from a
transformers config: a local model folder's ``config.json``, one of lmcycle's named sizes, or a llama-like shape
fitted to a parameter count.

Memory per method = weights + gradients + optimizer states + activations, where

- weights: fp32 4 B/param, bf16 2 B; int8 1 B and nf4 0.5625 B (4 bits + one fp32 absmax per block of 64
  weights, no double quantization, as :mod:`lmcycle.adapt.qlora` stores them) for the Linear weights inside the
  transformer blocks, the rest (embeddings, norms, biases, an untied LM head) in bf16, unquantized as
  ``quantize_model`` leaves them;
- gradients: one per trainable parameter in the training dtype; AdamW: two fp32 states per trainable parameter
  (plus an fp32 master copy of the weights when training in bf16 mixed precision);
- activations: the tensors autograd saves for the backward pass, counted per module for the way lmcycle runs
  these models (SDPA attention, which on CPU saves q, k, v, the output and a log-sum-exp but never the
  b·a·s² attention probabilities; no dropout; no recomputation, or with activation checkpointing per block each
  block's input plus one block's saved tensors at a time). A frozen Linear saves nothing for its own
  weight, which is why LoRA and prompt tuning save fewer activations than full fine-tuning. Plus the logits:
  lmcycle's loss takes an fp32 log-softmax over [b, s, V] (saved), and the first backward step holds two more
  [b, s, V] fp32 buffers (the gradients of the log-probabilities and of the logits). For comparison the plan's
  settings also give Korthikanti et al. (2022)'s s·b·h·(34 + 5·a·s/h) bytes per GPT layer (16-bit, dropout,
  attention probabilities kept); the saved-tensor accounting here is checked exactly against autograd in tests.

Per rank, with ``--world-size`` N processes (each with its own micro-batch, so activations are per rank and the
same under either strategy):

- ``ddp``: every rank holds the full weights, gradients and AdamW state, and nothing more: lmcycle's DDP engine
  passes ``gradient_as_bucket_view=True``, so the gradients are views into DDP's all-reduce buckets, not a second
  copy beside them (``distributed`` is 0). One process runs without any wrapper.
- ``fsdp`` (FSDP2 ``fully_shard`` per transformer block, then the root, ``reshard_after_forward=True``): weights,
  gradients and optimizer state divided by N, plus the unsharded working set: the two largest blocks' full
  parameters (the one computing and the one prefetched), the root's (embeddings, final norm, LM head: the root is
  not resharded after forward, its parameters are needed first in backward), and the unsharded gradients of the
  root and of one block before their reduce-scatter. FSDP2 all-gathers into buffers of its own even on one rank,
  so the working set is counted there too. ``fully_shard`` shards parameters only: the int8/nf4 block weights of
  QLoRA (and of an int8/nf4 base under prompt tuning) are buffers of :class:`lmcycle.adapt.qlora.QuantLinear`,
  so every rank holds them whole (in ``weights``, not divided by N, and never all-gathered); only the bf16/fp32
  parameters (embeddings, norms, biases, LoRA adapters, the soft prompt) are sharded and gathered.

``model_dtype`` (the recipe stage's field) is the dtype the weights are held in: ``bfloat16`` holds a frozen base
in bf16 with the trainable LoRA / prompt parameters and their AdamW state in fp32, and trains a full fine-tuning
in pure bf16 (weights, gradients and both AdamW states, 8 bytes/param, no fp32 master copy, as torchtune's
``dtype: bf16``); ``float32`` is ``precision`` fp32.

Compute: Chinchilla's compute-optimal budget D ≈ 20 tokens per parameter, C ≈ 6·N·D training FLOPs (Hoffmann et
al. 2022; Kaplan et al. 2020), time = D / tokens-per-second or C / FLOP-per-second.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, LlamaConfig, PretrainedConfig
from transformers.pytorch_utils import Conv1D

from lmcycle.adapt.lora import default_targets, find_targets
from lmcycle.errors import LmcycleError
from lmcycle.models.build import SIZES, model_config
from lmcycle.train.memory import transformer_blocks

PRECISIONS = ("fp32", "bf16", "int8", "nf4")
STRATEGIES = ("ddp", "fsdp")
# The stage field's spellings (stages/common.py's aliases) and the weight precision each one means.
MODEL_DTYPES = {"float32": "fp32", "fp32": "fp32", "bfloat16": "bf16", "bf16": "bf16"}
# Bytes per quantized weight as lmcycle.adapt.qlora stores it. nf4: 4 bits (0.5 B) + one fp32 absmax per block of
# 64 weights (4/64 = 0.0625 B) = 0.5625 B: QLoRA's double quantization (8-bit block scales plus an fp32 scale per
# 256 blocks, 0.516 B) is not implemented there. int8: 1 B (+ one fp32 scale per output row, 4/in B: left out).
QUANT_BYTES = {"int8": 1.0, "nf4": 0.5 + 4 / 64}
TOKENS_PER_PARAM = 20
GB = 1e9


# -- the model ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    """What the memory formulas need from a config. For T5, ``layers`` is the encoder's, ``decoder_layers`` the
    decoder's; ``head_dim`` is T5's d_kv (elsewhere hidden / heads)."""

    arch: str  # llama | gpt2 | t5
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    tied: bool
    decoder_layers: int = 0
    dropout: float = 0.0


def shape_of(config: PretrainedConfig) -> ModelShape:
    """The :class:`ModelShape` of a llama, gpt2 or t5 transformers config."""
    kind = config.model_type
    tied = bool(getattr(config, "tie_word_embeddings", True))
    if kind == "llama":
        heads = config.num_attention_heads
        return ModelShape("llama", config.hidden_size, config.num_hidden_layers, heads,
                          config.num_key_value_heads or heads,
                          getattr(config, "head_dim", None) or config.hidden_size // heads,
                          config.intermediate_size, config.vocab_size, tied,
                          dropout=float(config.attention_dropout or 0.0))
    if kind == "gpt2":
        return ModelShape("gpt2", config.n_embd, config.n_layer, config.n_head, config.n_head,
                          config.n_embd // config.n_head, config.n_inner or 4 * config.n_embd, config.vocab_size,
                          tied, dropout=max(config.resid_pdrop, config.embd_pdrop, config.attn_pdrop))
    if kind == "t5":
        return ModelShape("t5", config.d_model, config.num_layers, config.num_heads, config.num_heads, config.d_kv,
                          config.d_ff, config.vocab_size, tied, decoder_layers=config.num_decoder_layers,
                          dropout=float(config.dropout_rate))
    raise LmcycleError(f"model type '{kind}' is not supported by the planner (llama, gpt2, t5)", field="config")


def load_config(path: str | Path) -> PretrainedConfig:
    """The transformers config of a local model folder (or its ``config.json``); nothing else is read."""
    p = Path(path)
    if p.is_file() and p.name == "config.json":
        p = p.parent
    if not (p / "config.json").is_file():
        raise LmcycleError("no config.json here (give a local model folder or its config.json)", file=path)
    try:
        config = AutoConfig.from_pretrained(str(p), local_files_only=True)
    except (ValueError, OSError, KeyError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LmcycleError(f"cannot read the config: {first}", file=p / "config.json") from None
    shape_of(config)  # rejects unsupported architectures early
    return config


class _VocabOnly:
    """Stands in for a tokenizer where only the vocabulary size and special ids matter."""

    pad_token_id, eos_token_id, bos_token_id = 0, 1, 2

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size


def config_for_size(arch: str, size: str, vocab: int = 2048, max_len: int = 512) -> PretrainedConfig:
    """The config of one of lmcycle's named sizes (``lmcycle.models.build.SIZES``) with a ``vocab``-token vocabulary."""
    if arch not in SIZES:
        raise LmcycleError(f"unknown architecture '{arch}' (known: {', '.join(SIZES)})", field="--arch")
    if size not in SIZES[arch]:
        raise LmcycleError(f"unknown size '{size}' for {arch} (known: {', '.join(SIZES[arch])})", field="--size")
    return model_config(arch, size, _VocabOnly(vocab), max_len)


def llama_like(hidden: int, vocab: int = 32000) -> LlamaConfig:
    """A Llama-shaped config: depth hidden/128, heads of 128 (64 below hidden 1024), SwiGLU width ≈ 8/3·hidden
    rounded up to 256, untied embeddings. ``hidden`` must be a multiple of the head size."""
    layers, heads, ffn = _llama_like_shape(hidden)
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=heads, intermediate_size=ffn, tie_word_embeddings=False)


def _llama_like_shape(hidden: int) -> tuple[int, int, int]:
    heads = max(1, hidden // (128 if hidden >= 1024 else 64))
    return max(1, round(hidden / 128)), heads, 256 * math.ceil(8 * hidden / 3 / 256)


def config_for_params(n_params: float, vocab: int = 32000) -> LlamaConfig:
    """The :func:`llama_like` config (hidden 64 or a multiple of 128) whose parameter count is closest to
    ``n_params``."""
    if not (n_params > 0 and math.isfinite(n_params)):
        raise LmcycleError(f"must be a positive number, got {n_params:g}", field="--params")

    def approx(h: int) -> float:
        layers, _, ffn = _llama_like_shape(h)
        return layers * (4 * h * h + 3 * h * ffn + 2 * h) + 2 * vocab * h + h

    best = min([64, *range(128, 65537, 128)], key=lambda h: abs(approx(h) - n_params))
    return llama_like(best, vocab)


def meta_model(config: PretrainedConfig) -> nn.Module:
    """The model of ``config`` on the meta device: real module structure and shapes, no memory."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    with torch.device("meta"):
        return auto.from_config(config)


def params_by_kind(model: nn.Module) -> dict[str, int]:
    """Distinct parameters (tied ones once) by kind: embeddings, attention, mlp, norms, lm_head, other;
    ``block_linear_weights`` is the part of attention+mlp that int8/nf4 quantization stores in 8/4 bits."""
    out = dict.fromkeys(("embeddings", "attention", "mlp", "norms", "lm_head", "other", "block_linear_weights"), 0)
    seen: set[int] = set()
    for path, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            leaf = path.rsplit(".", 1)[-1]
            if isinstance(module, nn.Embedding):
                kind = "embeddings"
            elif isinstance(module, nn.Linear | Conv1D):
                kind = "lm_head" if leaf == "lm_head" else (
                    "attention" if any(k in path for k in ("attn", "attention", "Attention")) else "mlp")
                if kind != "lm_head" and pname == "weight":
                    out["block_linear_weights"] += p.numel()
            elif "norm" in type(module).__name__.lower() or leaf.startswith("ln"):
                kind = "norms"
            else:
                kind = "other"
            out[kind] += p.numel()
    out["total"] = sum(v for k, v in out.items() if k != "block_linear_weights")
    return out


def lora_trainable(model: nn.Module, r: int, targets: list[str] | None) -> tuple[int, set[str]]:
    """(LoRA parameters r·(in + out) summed over the targeted layers, the targeted layers' roles in a block).

    Targets follow ``lmcycle.adapt.lora``: module names or regex suffixes; None: its default targets. A role is a
    layer's path inside its block, e.g. ``self_attn.q_proj``, ``mlp.c_proj``, ``lm_head`` outside the blocks.
    """
    paths = find_targets(model, targets or default_targets(model))
    total = sum(r * sum(model.get_submodule(path).weight.shape) for path in paths)
    return total, {_role(path) for path in paths}


def lora_layers(model: nn.Module, targets: list[str] | None) -> int:
    """How many Linear/Conv1D layers LoRA adapts (each saves an extra [b, s, r] activation: B's input)."""
    return len(find_targets(model, targets or default_targets(model)))


def lora_layers_held(model: nn.Module, targets: list[str] | None, checkpointing: bool) -> int:
    """How many LoRA layers hold their [b, s, r] activation at the peak: all of them (:func:`lora_layers`), or
    with activation checkpointing those outside the blocks plus the most that one block has."""
    paths = find_targets(model, targets or default_targets(model))
    if not checkpointing:
        return len(paths)
    per_block: dict[str, int] = {}
    outside = 0
    for path in paths:
        parts = path.split(".")
        index = next((i for i, part in enumerate(parts) if part.isdigit()), None)
        if index is None:
            outside += 1
        else:
            block = ".".join(parts[:index + 1])
            per_block[block] = per_block.get(block, 0) + 1
    return outside + max(per_block.values(), default=0)


def _role(path: str) -> str:
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[i + 1:])
    return parts[-1]


# -- activations --------------------------------------------------------------------------------------------------
def _trained(roles: set[str] | None, *names: str) -> bool:
    """Whether any layer whose role ends with one of ``names`` is trained (roles None: everything is)."""
    return roles is None or any(r == n or r.endswith("." + n) for r in roles for n in names)


def _decoder_layer(sh: ModelShape, s: int, b: int, roles: set[str] | None, input_grad: bool,
                   ab: float) -> tuple[float, bool]:
    """Bytes one llama/gpt2 block saves for backward, and whether its output requires grad.

    ``roles``: the Linear layers trained (None: full fine-tuning, norms included); ``ab``: bytes per activation.
    """
    e, f, sb = s * b * sh.hidden, s * b * sh.ffn, s * b
    ekv = s * b * sh.kv_heads * sh.head_dim
    lse = 4 * b * sh.heads * s  # SDPA's fp32 log-sum-exp per query and head
    norm_stats = 1 if sh.arch == "llama" else 2  # RMSNorm: rsqrt; LayerNorm: mean and rstd
    full = roles is None
    n = 0.0
    if input_grad:
        n += (e + norm_stats * sb) * ab  # the norm's input and statistics
    if full and sh.arch == "llama":
        n += e * ab  # normalized input, for the norm weight's gradient
    qkv = ("q_proj", "k_proj", "v_proj") if sh.arch == "llama" else ("attn.c_attn", "c_attn")
    o = ("o_proj",) if sh.arch == "llama" else ("attn.c_proj",)
    up = ("gate_proj", "up_proj") if sh.arch == "llama" else ("c_fc",)
    down = ("down_proj",) if sh.arch == "llama" else ("mlp.c_proj",)
    if _trained(roles, *qkv):
        n += e * ab  # input of q/k/v (or c_attn), for their weight gradients
    attn_grad = input_grad or _trained(roles, *qkv)
    if attn_grad:
        qkv_saved = e + 2 * ekv if sh.arch == "llama" else 3 * e  # gpt2: one c_attn output, split into views
        n += (qkv_saved + e) * ab + lse  # SDPA saves q, k, v, its output and the log-sum-exp
    if _trained(roles, *o) and not attn_grad:
        # the heads concatenated, the output projection's input: on CPU, SDPA writes its output in [b, s, a, d]
        # layout, so this is the same memory as the output SDPA saves when it saves one
        n += e * ab
    h_grad = attn_grad or _trained(roles, *o)
    if h_grad:
        n += (e + norm_stats * sb) * ab  # the second norm's input (after the residual add) and statistics
    if full and sh.arch == "llama":
        n += e * ab
    if _trained(roles, *up):
        n += e * ab
    mlp_grad = h_grad or _trained(roles, *up)
    if mlp_grad:
        # llama: gate output (silu), silu output and up output (product); gpt2 "gelu_new" in eager ops: x, tanh,
        # 0.5·x and 1 + tanh.
        n += (3 if sh.arch == "llama" else 4) * f * ab
    if _trained(roles, *down):
        n += f * ab
    return n, mlp_grad or _trained(roles, *down)


def _t5_layer(sh: ModelShape, s: int, s_kv: int, b: int, roles: set[str] | None, input_grad: bool, ab: float,
              cross: bool, kv_grad: bool = False) -> tuple[float, bool]:
    """Bytes a T5 block saves (self-attention, cross-attention if ``cross``, gated-GELU FFN), and whether its
    output requires grad (``kv_grad``: whether the encoder output does). T5's self-attention runs in eager ops (its position bias needs a gradient), so it saves
    the b·a·s² attention probabilities; the cross-attention runs in SDPA. The encoder output that the
    cross-attention's k/v read is counted once per model by :func:`activation_bytes`."""
    e, inner, f, sb = s * b * sh.hidden, s * b * sh.heads * sh.head_dim, s * b * sh.ffn, s * b
    full = roles is None
    n, grad = 0.0, input_grad
    qkv = ("SelfAttention.q", "SelfAttention.k", "SelfAttention.v")
    if grad:
        n += (e + sb) * ab  # the norm's input and rsqrt
    if full:
        n += e * ab
    if _trained(roles, *qkv):
        n += e * ab  # the input of q/k/v
    q_grad, k_grad, v_grad = (grad or _trained(roles, "SelfAttention." + x) for x in "qkv")
    if full:
        # A position bias that needs a gradient sends SDPA to its math kernel, eager ops in effect:
        # scores = q @ kᵀ saves k for q's gradient and q for k's; probs @ v saves probs for v's gradient and v
        # for the probabilities'; softmax saves its output (the same probabilities).
        n += ((inner if q_grad else 0) + (inner if k_grad else 0) + (inner if q_grad or k_grad else 0)) * ab
        n += b * sh.heads * s * s * ab if (q_grad or k_grad or v_grad) else 0
    elif q_grad or k_grad or v_grad:
        # a frozen bias: the flash kernel saves q, k, v, its output, the log-sum-exp and the bias as an fp32
        # mask [1, a, s, s]
        n += 4 * inner * ab + 4 * b * sh.heads * s + 4 * sh.heads * s * s
    grad = q_grad or k_grad or v_grad
    if _trained(roles, "SelfAttention.o") and not (grad and not full):
        n += inner * ab
        grad = True
    if cross:
        if grad:
            n += (e + sb) * ab
        if full:
            n += e * ab
        if _trained(roles, "EncDecAttention.q"):
            n += e * ab
        kv_inner = s_kv * b * sh.heads * sh.head_dim
        if grad or kv_grad or _trained(roles, "EncDecAttention.q", "EncDecAttention.k", "EncDecAttention.v"):
            # SDPA: q, k, v, output, log-sum-exp (and the stack's position-bias mask)
            n += (2 * inner + 2 * kv_inner) * ab + 4 * b * sh.heads * s
            grad = True
        if _trained(roles, "EncDecAttention.o") and not grad:
            n += inner * ab
            grad = True
    if grad:
        n += (e + sb) * ab
    if full:
        n += e * ab
    if _trained(roles, "wi_0", "wi_1"):
        n += e * ab
        grad = True
    if grad:
        n += 6 * f * ab  # gelu_new's x, tanh, 0.5·x, 1 + tanh; its output and wi_1's (the product's inputs)
    if _trained(roles, "wo"):
        n += f * ab
        grad = True
    return n, grad


def activation_bytes(sh: ModelShape, seq_len: int, batch: int, roles: set[str] | None, *, act_bytes: float = 4,
                     input_grad: bool = True, checkpointing: bool = False) -> dict[str, float]:
    """Bytes saved for backward at peak: ``layers`` (all blocks and the final norm) and ``logits``.

    ``roles``: the trained Linear roles (None: full fine-tuning); ``input_grad``: whether the embeddings' output
    requires grad (full fine-tuning, prompt tuning). For T5 the decoder is assumed as long as the encoder.
    ``checkpointing``: activation checkpointing per block (train/memory.py): each block keeps only its input
    through the forward pass (plus the tensors the blocks of a stack share), and one block at a time holds its
    own saved tensors again, while its backward runs. By then the backward of the loss and the LM head is done
    and the logits' buffers are freed, so the peak holds the larger of the two, not both.
    """
    s, b, ab = seq_len, batch, act_bytes
    lm_head = roles is None or "lm_head" in roles
    recompute = 0.0  # with checkpointing: what the block whose backward runs holds again
    # int64 labels (the loss) and token ids (a trained embedding's backward)
    total, grad = 8 * b * s * (2 if roles is None else 1), input_grad
    if sh.arch == "t5":
        # relative-position bucket ids (int64, one [s, s] per stack, saved when the bias is trained) and the
        # cross-attention's (zero) position-bias mask [1, a, s, s], shared by the decoder's layers
        total += 2 * s * s * 8 if roles is None else 0
        total += 4 * sh.heads * s * s
        encoder = []
        for _ in range(sh.layers):
            n, grad = _t5_layer(sh, s, s, b, roles, grad, ab, cross=False)
            encoder.append(n)
        e = s * b * sh.hidden
        total += (e + s * b) * ab if grad else 0  # encoder final norm's input and rsqrt
        total += e * ab if roles is None else 0
        kv_trained = _trained(roles, "EncDecAttention.k", "EncDecAttention.v")
        if kv_trained:
            total += e * ab  # the encoder output, input of every cross-attention's k and v
        cross_grad = grad or kv_trained
        grad = input_grad
        decoder = []
        for _ in range(sh.decoder_layers):
            n, grad = _t5_layer(sh, s, s, b, roles, grad, ab, cross=True, kv_grad=cross_grad)
            decoder.append(n)
        if not checkpointing:
            total += sum(encoder) + sum(decoder)
        else:
            # Kept by the checkpoints: every block's input, each stack's fp32 self-attention position bias (block
            # 0 computes it, the others take it as an input) and the encoder output (an input of every decoder
            # block). The decoder's backward runs first, while the encoder's block inputs are still held.
            total += (len(encoder) + len(decoder)) * e * ab + 2 * 4 * sh.heads * s * s + (0 if kv_trained else e * ab)
            recompute = max(max(decoder, default=0), max(encoder, default=0) - len(decoder) * e * ab)
    else:
        blocks = []
        for _ in range(sh.layers):
            n, grad = _decoder_layer(sh, s, b, roles, grad, ab)
            blocks.append(n)
        if not checkpointing:
            total += sum(blocks)
        else:
            total += len(blocks) * s * b * sh.hidden * ab  # every block's input
            recompute = max(blocks, default=0)
        total += 2 * s * sh.head_dim * 4 if sh.arch == "llama" else 0  # rotary cos and sin, shared by all layers
    e = s * b * sh.hidden
    before_head = total
    if grad:
        total += (e + (1 if sh.arch != "gpt2" else 2) * s * b) * ab  # final norm's input and statistics
    if roles is None and sh.arch != "gpt2":
        total += e * ab
    if lm_head:
        total += e * ab  # the LM head's input
    logits = 3 * s * b * sh.vocab * 4  # fp32 log-probs saved + two [b, s, V] gradient buffers in backward
    if checkpointing:
        # While the recomputed block's backward runs, its gradients are alive too (the plain peak, at the head,
        # has none): dL/d of its output and about three [b, s, ffn] of the MLP's backward.
        recompute += (e + 3 * s * b * sh.ffn) * ab
    # The recomputed block counts where it outgrows what the head's backward held (the head's inputs, logits).
    total += max(0.0, recompute - (total - before_head) - logits)
    return {"layers": total, "logits": logits}


# -- the plan -----------------------------------------------------------------------------------------------------
@dataclass
class MethodMemory:
    """Bytes of one way to train, at peak."""

    method: str
    weights: float
    grads: float
    optimizer: float
    activations: float
    trainable: int
    note: str = ""
    distributed: float = 0.0  # FSDP's unsharded parameters and gradients (DDP: 0, its buckets are the grads)

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + self.distributed


@dataclass
class Plan:
    """Memory per method, the parameter counts behind it, the compute-optimal budget and every assumption."""

    model: str
    params: dict[str, int]
    rows: list[MethodMemory]
    compute: dict[str, float | None]
    settings: dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict:
        rows = [{**asdict(r), "total": r.total} for r in self.rows]
        return {"model": self.model, "params": self.params, "rows": rows, "compute": self.compute,
                "settings": self.settings}


# -- per rank -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Parts:
    """The model split the way FSDP2 shards it: the root's own parameters (by kind, as :func:`params_by_kind`)
    and each transformer block's, plus where LoRA's adapter parameters fall (``lora_root``, ``lora_blocks``)."""

    root: dict[str, int]
    blocks: list[dict[str, int]]
    lora_root: int
    lora_blocks: list[int]


def model_parts(model: nn.Module, lora_r: int, lora_targets: list[str] | None) -> Parts:
    """:class:`Parts` of ``model`` (a meta model): blocks as ``lmcycle.train.memory.transformer_blocks`` finds them
    (the modules lmcycle's FSDP wraps one by one), the root everything else."""
    whole = params_by_kind(model)
    blocks = transformer_blocks(model)
    per_block = [params_by_kind(b) for b in blocks]
    root = {k: whole[k] - sum(b[k] for b in per_block) for k in whole}
    lora_blocks = [0] * len(blocks)
    lora_root = 0
    owner = {id(m): i for i, b in enumerate(blocks) for m in b.modules()}  # module -> the block it is in
    for path in find_targets(model, lora_targets or default_targets(model)):
        module = model.get_submodule(path)
        n = lora_r * sum(module.weight.shape)
        i = owner.get(id(module))
        if i is None:
            lora_root += n
        else:
            lora_blocks[i] += n
    return Parts(root, per_block, lora_root, lora_blocks)


def per_rank(row: MethodMemory, parts: Parts, strategy: str, world_size: int, *, store, trainable_root: int,
             trainable_blocks: list[int], grad_bytes: float, replicated: float = 0.0) -> MethodMemory:
    """``row`` (one process) as one rank of ``world_size`` sees it under ``strategy``.

    ``store(kinds, i)``: bytes of the parameters of a part (a :func:`params_by_kind` dict; ``i`` the block, None
    the root) that FSDP shards and all-gathers, as this method holds them; ``replicated``: bytes of
    ``row.weights`` that are not parameters, which every rank holds whole and FSDP never gathers (the int8/nf4
    block weights: :func:`quantized_bytes`), left out of ``store``; ``trainable_root`` / ``trainable_blocks``:
    trainable parameters of the root and of each block, whose gradients (``grad_bytes`` each) FSDP holds
    unsharded until their reduce-scatter.

    ``ddp``: the single-process figures; lmcycle's DDP passes ``gradient_as_bucket_view=True``, so the
    gradients are views into the all-reduce buckets and ``distributed`` is 0 (one process: no wrapper at all).
    """
    n = world_size
    if strategy == "ddp":
        return MethodMemory(row.method, row.weights, row.grads, row.optimizer, row.activations, row.trainable,
                            row.note, 0.0)
    biggest = sorted(range(len(parts.blocks)), key=lambda i: store(parts.blocks[i], i), reverse=True)
    unsharded = store(parts.root, None) + sum(store(parts.blocks[i], i) for i in biggest[:2])
    grads = grad_bytes * (trainable_root + max(trainable_blocks, default=0))
    weights = (row.weights - replicated) / n + replicated
    return MethodMemory(row.method, weights, row.grads / n, row.optimizer / n, row.activations,
                        row.trainable, row.note, unsharded + grads)


def weight_bytes(params: dict[str, int], precision: str) -> float:
    """Bytes of all weights stored in ``precision`` (int8/nf4: block Linear weights quantized, the rest bf16)."""
    if precision == "fp32":
        return 4.0 * params["total"]
    if precision == "bf16":
        return 2.0 * params["total"]
    q = params["block_linear_weights"]
    return QUANT_BYTES[precision] * q + 2.0 * (params["total"] - q)


def quantized_bytes(params: dict[str, int], precision: str) -> float:
    """The part of :func:`weight_bytes` that is int8/nf4 block Linear weights (0 for fp32 and bf16): buffers of
    :class:`lmcycle.adapt.qlora.QuantLinear`, not parameters, so FSDP2's ``fully_shard`` does not shard them."""
    return QUANT_BYTES[precision] * params["block_linear_weights"] if precision in QUANT_BYTES else 0.0


def sharded_bytes(params: dict[str, int], precision: str) -> float:
    """The part of :func:`weight_bytes` that is parameters (what FSDP shards and all-gathers): all of it for fp32
    and bf16; for int8/nf4 the bf16 rest (embeddings, norms, biases, an untied LM head)."""
    return weight_bytes(params, precision) - quantized_bytes(params, precision)


def chinchilla(n_params: float, tokens_per_s: float | None = None, flops_per_s: float | None = None,
               tokens_per_param: float = TOKENS_PER_PARAM) -> dict[str, float | None]:
    """Compute-optimal tokens D = 20·N, training FLOPs C = 6·N·D, and the time at a throughput (None if none given).

    With both throughputs the time uses tokens per second.
    """
    tokens = tokens_per_param * n_params
    flops = 6.0 * n_params * tokens
    seconds = tokens / tokens_per_s if tokens_per_s else (flops / flops_per_s if flops_per_s else None)
    return {"params": float(n_params), "tokens": tokens, "flops": flops, "seconds": seconds}


def _check_positive(name: str, value: float | None, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if value is None or not value > 0 or not math.isfinite(value):
        raise LmcycleError(f"must be a positive number, got {value}", field=name)


def resolve_precision(precision: str | None, model_dtype: str | None) -> tuple[str, bool]:
    """(the weights' precision, whether full fine-tuning is pure bf16) from ``--precision`` and ``--model-dtype``.

    ``--model-dtype`` is the recipe's ``model_dtype``: the dtype the weights are held in, so it sets the precision
    to fp32 or bf16. It differs from ``--precision bf16`` only in the full fine-tuning row: lmcycle trains a
    bfloat16 model in pure bf16 (no fp32 master copy), while ``--precision bf16`` keeps the classic mixed-precision
    accounting (fp32 master weights in the optimizer). An int8/nf4 base is a quantized checkpoint, not a
    ``model_dtype``, and a precision that names another dtype contradicts it: both are refused.
    """
    if model_dtype is None:
        precision = precision or "fp32"
        if precision not in PRECISIONS:
            raise LmcycleError(f"unknown precision '{precision}' (one of {', '.join(PRECISIONS)})",
                               field="--precision")
        return precision, False
    if model_dtype not in MODEL_DTYPES:
        raise LmcycleError(f"unknown model dtype '{model_dtype}' (float32 or bfloat16)", field="--model-dtype")
    implied = MODEL_DTYPES[model_dtype]
    if precision is not None and precision != implied:
        raise LmcycleError(f"--model-dtype {model_dtype} holds the weights in {implied}, which contradicts "
                           f"--precision {precision}: give one of them", field="--model-dtype")
    return implied, implied == "bf16"


def make_plan(config: PretrainedConfig, *, seq_len: int = 512, batch: int = 8, precision: str | None = None,
              lora_r: int = 8, lora_targets: list[str] | None = None, virtual_tokens: int = 20,
              tokens_per_s: float | None = None, flops_per_s: float | None = None, name: str = "",
              activation_checkpointing: bool = False, strategy: str = "ddp", world_size: int = 1,
              model_dtype: str | None = None) -> Plan:
    """Plan full fine-tuning, LoRA, QLoRA (8- and 4-bit) and prompt tuning of ``config``'s model, plus its
    Chinchilla budget, per rank. ``seq_len`` × ``batch`` tokens per micro-batch (per rank); ``precision`` of the
    (frozen) weights (None: fp32, or what ``model_dtype`` says, see :func:`resolve_precision`);
    ``activation_checkpointing``: as ``train.activation_checkpointing`` (see :func:`activation_bytes`);
    ``strategy`` ddp | fsdp over ``world_size`` ranks (see the module's docstring)."""
    for key, v in (("--seq-len", seq_len), ("--batch", batch), ("--lora-r", lora_r),
                   ("--virtual-tokens", virtual_tokens), ("--world-size", world_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise LmcycleError(f"must be a positive integer, got {v}", field=key)
    _check_positive("--tokens-per-s", tokens_per_s)
    _check_positive("--flops-per-s", flops_per_s)
    if strategy not in STRATEGIES:
        raise LmcycleError(f"unknown strategy '{strategy}' (one of {', '.join(STRATEGIES)})", field="--strategy")
    precision, pure_bf16 = resolve_precision(precision, model_dtype)
    sh = shape_of(config)
    model = meta_model(config)
    params = params_by_kind(model)
    try:
        n_lora, roles = lora_trainable(model, lora_r, lora_targets)
    except LmcycleError as e:
        raise LmcycleError(e.message, field="--lora-targets") from None
    parts = model_parts(model, lora_r, lora_targets)
    quantized = precision in QUANT_BYTES
    ab = 4 if precision == "fp32" else 2  # activations in the compute dtype: fp32, else bf16
    base = weight_bytes(params, precision)
    rows = []
    if quantized:
        note_full = f"full fine-tuning cannot update {precision} weights: shown for bf16 mixed precision"
    elif pure_bf16:
        note_full = "model_dtype bfloat16: weights, grads and both AdamW states in bf16, no fp32 master copy"
    else:
        note_full = "" if precision == "fp32" else "bf16 mixed precision: fp32 master weights in the optimizer"
    full_prec = "fp32" if precision == "fp32" else "bf16"
    ckpt = activation_checkpointing
    act = activation_bytes(sh, seq_len, batch, None, act_bytes=4 if full_prec == "fp32" else 2, checkpointing=ckpt)
    p = params["total"]
    full_grad = 4 if full_prec == "fp32" else 2
    full_opt = 8 if full_prec == "fp32" else (4 if pure_bf16 else 12)
    label_full = "full FT (pure bf16)" if pure_bf16 else f"full FT ({full_prec})"
    full_row = MethodMemory(label_full, weight_bytes(params, full_prec), full_grad * p, full_opt * p,
                            act["layers"] + act["logits"], p, note_full)
    rows.append(per_rank(full_row, parts, strategy, world_size,
                         store=lambda kinds, i: weight_bytes(kinds, full_prec), trainable_root=parts.root["total"],
                         trainable_blocks=[b["total"] for b in parts.blocks], grad_bytes=full_grad))

    def lora_store(q: str):
        # the base's parameters in ``q`` (not its quantized weights) plus the fp32 adapters of that part (i: the
        # block, None: the root)
        return lambda kinds, i: sharded_bytes(kinds, q) + 4 * (parts.lora_root if i is None else parts.lora_blocks[i])

    lora_act = activation_bytes(sh, seq_len, batch, roles, act_bytes=ab, input_grad=False, checkpointing=ckpt)
    lora_extra = seq_len * batch * lora_r * ab * lora_layers_held(model, lora_targets, ckpt)
    lora_note = f"r={lora_r} on {', '.join(sorted(roles))}; fp32 adapters"
    label = f"LoRA ({precision} base)" if not quantized else f"QLoRA ({precision} base)"
    lora_kw = dict(trainable_root=parts.lora_root, trainable_blocks=parts.lora_blocks, grad_bytes=4)
    rows.append(per_rank(MethodMemory(label, base + 4 * n_lora, 4 * n_lora, 8 * n_lora,
                                      lora_act["layers"] + lora_act["logits"] + lora_extra, n_lora,
                                      lora_note + ("; bf16 compute" if ab == 2 else "")),
                         parts, strategy, world_size, store=lora_store(precision),
                         replicated=quantized_bytes(params, precision), **lora_kw))
    for q in ("int8", "nf4"):
        if q == precision:
            continue
        # The quantized weights are dequantized to the compute dtype, the one of --precision (fp32 or bf16).
        row = MethodMemory(f"QLoRA ({q} base)", weight_bytes(params, q) + 4 * n_lora, 4 * n_lora, 8 * n_lora,
                           lora_act["layers"] + lora_act["logits"] + lora_extra, n_lora,
                           lora_note + ("; bf16 compute" if ab == 2 else "; fp32 compute"))
        rows.append(per_rank(row, parts, strategy, world_size, store=lora_store(q),
                             replicated=quantized_bytes(params, q), **lora_kw))
    n_prompt = virtual_tokens * sh.hidden
    pt_act = activation_bytes(sh, seq_len + virtual_tokens, batch, set(), act_bytes=ab, input_grad=True,
                              checkpointing=ckpt)
    row = MethodMemory(f"prompt tuning ({precision} base)", base + 4 * n_prompt, 4 * n_prompt, 8 * n_prompt,
                       pt_act["layers"] + pt_act["logits"], n_prompt,
                       f"{virtual_tokens} virtual tokens (sequence {seq_len + virtual_tokens})")
    # the soft prompt is a parameter of the root (the wrapper around the model), outside every block
    rows.append(per_rank(row, parts, strategy, world_size,
                         store=lambda kinds, i: sharded_bytes(kinds, precision) + (4 * n_prompt if i is None else 0),
                         trainable_root=n_prompt, trainable_blocks=[], grad_bytes=4,
                         replicated=quantized_bytes(params, precision)))
    compute = chinchilla(p, tokens_per_s, flops_per_s)
    if strategy == "ddp":
        dist_note = ("one process: no wrapper, nothing extra" if world_size == 1 else
                     "DDP with gradient_as_bucket_view=True (lmcycle's engine): the grads are views into the "
                     "all-reduce buckets, no second copy, so 'distributed' is 0")
    else:
        dist_note = (f"FSDP2 fully_shard per block + root, reshard_after_forward=True: weights, grads and optimizer "
                     f"/ {world_size}; 'distributed' is the unsharded working set: the root's parameters "
                     "(embeddings, final norm, LM head) and the 2 largest blocks' (current + prefetched), plus "
                     "the unsharded grads of the root and one block before their reduce-scatter; int8/nf4 block "
                     "weights are QuantLinear buffers, which fully_shard does not shard: every rank holds them "
                     "whole (in 'weights'), only the bf16/fp32 parameters (embeddings, norms, biases, LoRA, the "
                     "soft prompt) are sharded")
    settings = {
        "arch": sh.arch, "seq_len": seq_len, "batch": batch, "precision": precision,
        "model_dtype": {"fp32": "float32", "bf16": "bfloat16"}.get(precision) if model_dtype else None,
        "strategy": strategy, "world_size": world_size,
        "per_rank": f"every figure is one rank's; batch {batch} is the micro-batch of each rank; {dist_note}",
        "lora_r": lora_r,
        "lora_targets": sorted(roles), "virtual_tokens": virtual_tokens,
        "optimizer": "AdamW, 2 bf16 states for pure-bf16 full FT" if pure_bf16 else "AdamW, 2 fp32 states",
        "attention": "SDPA (no b·a·s² probabilities saved)",
        "recomputation": ("per transformer block (activation checkpointing): each block keeps its input, one "
                          "block's activations at a time" if ckpt else "none"),
        "dropout": f"ignored (config has {sh.dropout:g})" if sh.dropout else "none",
        "logits": "fp32: log-probs saved + 2 backward buffers of [b, s, V]",
        "quantized_bytes_per_param": QUANT_BYTES,
        "tokens_per_param": TOKENS_PER_PARAM, "flops": "6·N·D", "tokens_per_s": tokens_per_s,
        "flops_per_s": flops_per_s,
        "korthikanti_2022_bytes_per_layer": seq_len * batch * sh.hidden * (34 + 5 * sh.heads * seq_len / sh.hidden),
        "not_counted": "framework/allocator overhead, CUDA context, temporary buffers of single ops",
    }
    if sh.arch == "t5":
        settings["t5"] = ("decoder as long as the encoder; self-attention saves the b·a·s² probabilities when the "
                          "position bias is trained (full FT: SDPA's math kernel)")
    return Plan(name or f"{sh.arch} h={sh.hidden} L={sh.layers}", params, rows, compute, settings)


def parse_count(text: str, field: str = "--params") -> float:
    """A parameter count like ``7e9``, ``7B``, ``125M``, ``1.5k`` as a number."""
    scale = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}
    t = text.strip().lower()
    factor = scale.get(t[-1:], 1.0)
    try:
        value = float(t[:-1] if t[-1:] in scale else t) * factor
    except ValueError:
        raise LmcycleError(f"'{text}' is not a count (e.g. 7e9, 7B, 125M)", field=field) from None
    if not (value > 0 and math.isfinite(value)):
        raise LmcycleError(f"must be a positive number, got '{text}'", field=field)
    return value


def resolve_config(model: str | None = None, arch: str | None = None, size: str | None = None,
                   params: str | None = None, vocab: int | None = None) -> tuple[PretrainedConfig, str]:
    """(config, a name for it) from exactly one of: a local model folder/config.json, ``arch`` + a named
    ``size``, or a parameter count (``params``, llama-like shape)."""
    given = [x for x in (model, size, params) if x is not None]
    if len(given) != 1:
        raise LmcycleError("give exactly one of: a model folder or config.json, --size (with --arch), --params",
                           file="command line")
    if vocab is not None and vocab <= 0:
        raise LmcycleError(f"must be a positive integer, got {vocab}", field="--vocab")
    if model is not None:
        if vocab is not None:
            raise LmcycleError("--vocab applies to --size and --params; a config has its own", field="--vocab")
        return load_config(model), str(model)
    if size is not None:
        return config_for_size(arch or "llama", size, vocab or 2048), f"lmcycle {arch or 'llama'} {size}"
    if arch not in (None, "llama"):
        raise LmcycleError(f"--params builds a llama-like shape; --arch {arch} needs --size or a config",
                           field="--arch")
    config = config_for_params(parse_count(params), vocab or 32000)
    return config, f"llama-like ≈{human_count(parse_count(params))} params"


# -- rendering ----------------------------------------------------------------------------------------------------
def human_bytes(n: float) -> str:
    """Bytes in the largest unit that keeps the number ≥ 1 (decimal units: 1 GB = 1e9 B)."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def human_count(n: float) -> str:
    """A count with a K/M/B/T suffix and 3 significant digits."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


def human_seconds(s: float) -> str:
    for unit, size in (("years", 365.25 * 86400), ("days", 86400), ("hours", 3600), ("minutes", 60)):
        if s >= size:
            return f"{s / size:.3g} {unit}"
    return f"{s:.3g} s"


def render(plan: Plan) -> str:
    """The plan as a markdown table, the rule of thumb, the compute budget and the settings."""
    p = plan.params
    lines = [f"# Training plan: {plan.model}", "",
             f"parameters: {p['total']:,} (embeddings {p['embeddings']:,}, attention {p['attention']:,}, "
             f"mlp {p['mlp']:,}, norms {p['norms']:,}, lm_head {p['lm_head']:,}, other {p['other']:,})", "",
             f"per rank: strategy {plan.settings['strategy']}, world size {plan.settings['world_size']}, "
             f"weights {plan.settings['precision']}"
             + (f" (model_dtype {plan.settings['model_dtype']})" if plan.settings.get("model_dtype") else ""), "",
             "| method | weights | grads | optimizer | activations | distributed | total | trainable params |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in plan.rows:
        share = f" ({100 * r.trainable / p['total']:.3g}%)"
        lines.append(f"| {r.method} | {human_bytes(r.weights)} | {human_bytes(r.grads)} | "
                     f"{human_bytes(r.optimizer)} | {human_bytes(r.activations)} | {human_bytes(r.distributed)} | "
                     f"**{human_bytes(r.total)}** | "
                     f"{r.trainable:,}{share} |")
    lines += ["", "notes: " + "; ".join(f"{r.method}: {r.note}" for r in plan.rows if r.note), "",
              f"rule of thumb: weights ≈ 4 bytes/param = {human_bytes(4 * p['total'])}; training fully ≈ 4 + 12..20 "
              f"bytes/param (grads 4, Adam 8, activations/temporaries 0..8) = {human_bytes(16 * p['total'])} .. "
              f"{human_bytes(24 * p['total'])}", ""]
    c = plan.compute
    when = f", time {human_seconds(c['seconds'])}" if c["seconds"] is not None else \
        " (give --tokens-per-s or --flops-per-s for the time)"
    lines += [f"compute-optimal (Chinchilla): D = {TOKENS_PER_PARAM}·N = {human_count(c['tokens'])} tokens, "
              f"C = 6·N·D = {c['flops']:.3g} FLOPs{when}", "",
              "settings: " + json.dumps(plan.settings, ensure_ascii=False)]
    return "\n".join(lines)
