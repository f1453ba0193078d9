"""Pruning: zero (or remove) the weights that matter least, then optionally heal the model with LoRA.

Four methods, all on the ``nn.Linear`` layers inside the transformer blocks (attention q/k/v/o and the MLP;
paths matching ``...layers.<i>.`` / ``layer.<i>.`` / ``h.<i>.`` / ``block.<i>.``). Embeddings, the LM head,
poolers and classifier heads are never pruned: they sit outside the blocks, and zeroing rows of an embedding or
head removes whole tokens or classes. ``layers=`` (a regex searched in the module path) narrows the selection.

- :func:`magnitude_prune` — unstructured: per layer, zero the ``sparsity`` fraction of weights with the smallest
  ``|W|``.
- :func:`wanda_prune` — Wanda (Sun et al. 2023): score ``|W_ij| * ||X_j||_2``, where ``X_j`` is input feature
  ``j`` over every (non-padding) calibration token, and zero the lowest scores *per output row*. The input norms
  come from ONE forward pass over the unpruned model (forward hooks); the paper instead prunes block by block and
  feeds each block the outputs of the already-pruned ones. One pass is simpler and close in quality at 50%.
- :func:`nm_prune` — N:M semi-structured: in every group of M consecutive input weights of a row, keep the N
  with the largest score (magnitude or Wanda). 2:4 is what sparse tensor cores accelerate.
- :func:`structured_prune` — remove whole attention heads (Llama; whole KV groups with their query heads) and
  MLP intermediate channels (Llama, BERT), physically shrinking the matrices and the config, the same number in
  every layer, so the saved folder is a standard checkpoint with smaller shapes.

The unstructured methods return the *keep masks* (``path -> bool tensor``, True = kept), which
:func:`heal_with_lora` re-applies after merging the LoRA update so that healing keeps the sparsity. Every
function validates its arguments before it changes anything: on bad input the model is untouched. The ``prune``
stage (:mod:`lmcycle.stages.prune`) runs one method on a model of the run, with perplexities before and after.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from lmcycle.adapt.lora import LoraConfig, add_lora, merge_and_unload
from lmcycle.data.batching import pad_id_of, pad_rows
from lmcycle.errors import LmcycleError
from lmcycle.train.loop import (
    TrainConfig,
    TrainResult,
    lm_loss_sum,
    micro_batch_indices,
    seed_everything,
    train,
)

BLOCK_PATTERN = r"(?:^|\.)(?:layers|layer|h|block|blocks)\.\d+\."
Batch = dict[str, torch.Tensor]
Masks = dict[str, torch.Tensor]

# -- which layers ------------------------------------------------------------------------------------------------


def prunable_layers(model: nn.Module, layers: str | None = None) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules inside transformer blocks (path matches :data:`BLOCK_PATTERN`), optionally only
    those whose path also matches the regex ``layers`` (``re.search``)."""
    try:
        extra = re.compile(layers) if layers else None
    except re.error as e:
        raise LmcycleError(f"'{layers}' is not a valid regex: {e}", field="layers") from None
    found = {name: m for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and re.search(BLOCK_PATTERN, name)
             and (extra is None or extra.search(name))}
    if not found:
        raise LmcycleError(f"no nn.Linear layer inside the transformer blocks of {type(model).__name__}"
                           + (f" matches '{layers}'" if layers else ""), field="layers")
    return found


def check_sparsity(sparsity: float) -> None:
    if not isinstance(sparsity, (int, float)) or not 0 < sparsity < 1:
        raise LmcycleError(f"sparsity must be strictly between 0 and 1, got {sparsity!r}", field="sparsity")


# -- calibration -------------------------------------------------------------------------------------------------


def tokenize_calibration(tokenizer, texts: Sequence, max_len: int = 256, batch_size: int = 8) -> list[Batch]:
    """Tokenize calibration ``texts`` into right-padded batches: ``input_ids`` and ``attention_mask`` [B, T].

    Texts must be non-empty strings (anything else is the wrong modality for a language model)."""
    if len(texts) == 0:
        raise LmcycleError("the calibration data is empty", field="calibration")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise LmcycleError(f"calibration item {i} is a {type(t).__name__}, not text: pruning calibrates a "
                               "language model on strings", field="calibration")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise LmcycleError("every calibration text is blank", field="calibration")
    pad = pad_id_of(tokenizer)
    ids = [list(tokenizer(t)["input_ids"])[:max_len] for t in texts]
    batches = []
    for start in range(0, len(ids), batch_size):
        input_ids, mask = pad_rows(ids[start:start + batch_size], pad)
        batches.append({"input_ids": input_ids, "attention_mask": mask})
    return batches


def check_batches(batches) -> None:
    """Calibration batches must be a non-empty list of dicts with integer ``input_ids`` [B, T]."""
    if not batches:
        raise LmcycleError("the calibration data is empty: Wanda and activation scores need calibration batches",
                           field="calibration")
    for i, b in enumerate(batches):
        ids = b.get("input_ids") if isinstance(b, dict) else None
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.long, torch.int, torch.int32) or ids.ndim != 2:
            raise LmcycleError(f"calibration batch {i} has no integer input_ids [batch, tokens] (wrong modality: "
                               "pruning calibrates on tokenized text)", field="calibration")
        if "attention_mask" in b and b["attention_mask"].shape != ids.shape:
            raise LmcycleError(f"calibration batch {i}: attention_mask and input_ids differ in shape",
                               field="calibration")


@torch.no_grad()
def input_norms(model: nn.Module, batches: list[Batch], names: Sequence[str]) -> dict[str, torch.Tensor]:
    """``||X_j||_2`` [in_features] for each layer in ``names``: the L2 norm of each input feature over every
    calibration token that is not padding, from one forward pass of the (unchanged) model with hooks."""
    check_batches(batches)
    device = next(model.parameters()).device
    sq: dict[str, torch.Tensor] = {}
    token_mask: list[torch.Tensor | None] = [None]

    def hook(name: str) -> Callable:
        def collect(_module, args):
            x = args[0].detach()
            keep = token_mask[0]
            # Padding positions carry real activations too; they must not count in the norms.
            x = x[keep] if keep is not None and x.shape[:-1] == keep.shape else x.reshape(-1, x.shape[-1])
            sq[name] = sq.get(name, 0) + x.float().pow(2).sum(0)
        return collect

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(batches, desc="calibration", leave=False):
            ids = batch["input_ids"].to(device)
            mask = batch.get("attention_mask", torch.ones_like(ids)).to(device)
            token_mask[0] = mask.bool()
            model(input_ids=ids, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {n: sq[n].sqrt() for n in names}


# -- unstructured and N:M ----------------------------------------------------------------------------------------


def lowest_mask(score: torch.Tensor, k: int, dim: int | None = None) -> torch.Tensor:
    """Keep mask (True = kept) that drops exactly the ``k`` lowest scores, over the whole tensor (``dim=None``)
    or along ``dim`` in every row. Ties go to the lower index (stable sort), so the result is deterministic."""
    flat = score.reshape(-1) if dim is None else score
    order = torch.argsort(flat, dim=-1 if dim is not None else 0, stable=True)
    keep = torch.ones_like(flat, dtype=torch.bool)
    if dim is None:
        keep[order[:k]] = False
    else:
        keep.scatter_(-1, order[..., :k], False)
    return keep.reshape(score.shape)


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Masks) -> None:
    """Zero every weight whose mask entry is False."""
    for name, keep in masks.items():
        w = model.get_submodule(name).weight
        w.mul_(keep.to(device=w.device, dtype=w.dtype))


def magnitude_prune(model: nn.Module, sparsity: float, layers: str | None = None) -> Masks:
    """Zero the ``round(sparsity * numel)`` smallest ``|W|`` of each prunable layer, in place; return the masks."""
    check_sparsity(sparsity)
    targets = prunable_layers(model, layers)
    masks = {n: lowest_mask(m.weight.detach().abs(), round(sparsity * m.weight.numel())) for n, m in targets.items()}
    apply_masks(model, masks)
    return masks


def wanda_scores(model: nn.Module, batches: list[Batch], names: Sequence[str]) -> dict[str, torch.Tensor]:
    """``|W| * ||X_j||`` [out, in] per layer: the weight's magnitude times its input feature's norm."""
    norms = input_norms(model, batches, names)
    return {n: model.get_submodule(n).weight.detach().abs().float() * norms[n].unsqueeze(0) for n in names}


def wanda_prune(model: nn.Module, calibration_batches: list[Batch], sparsity: float,
                layers: str | None = None) -> Masks:
    """Wanda: in each output row of each prunable layer, zero the ``round(sparsity * in)`` weights with the lowest
    ``|W_ij| * ||X_j||_2`` (norms from one calibration pass over the unpruned model), in place; return the masks."""
    check_sparsity(sparsity)
    targets = prunable_layers(model, layers)
    scores = wanda_scores(model, calibration_batches, list(targets))
    masks = {n: lowest_mask(s, round(sparsity * s.shape[1]), dim=1) for n, s in scores.items()}
    apply_masks(model, masks)
    return masks


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep mask [out, in] keeping the ``n`` highest scores in every group of ``m`` consecutive inputs of a row."""
    out_f, in_f = score.shape
    groups = score.reshape(out_f, in_f // m, m)
    return lowest_mask(groups, m - n, dim=-1).reshape(out_f, in_f)


def check_nm(n: int, m: int, targets: dict[str, nn.Linear]) -> None:
    if not isinstance(n, int) or not isinstance(m, int) or n < 1 or n >= m:
        raise LmcycleError(f"N:M pruning needs 1 <= n < m, got n={n}, m={m}", field="n")
    for name, layer in targets.items():
        if layer.in_features % m:
            raise LmcycleError(f"m={m} does not divide the input size {layer.in_features} of layer {name}",
                               field="m")


def nm_prune(model: nn.Module, n: int = 2, m: int = 4, score: Literal["magnitude", "wanda"] = "magnitude",
             calibration_batches: list[Batch] | None = None, layers: str | None = None) -> Masks:
    """N:M sparsity: keep the ``n`` highest scores (``|W|``, or Wanda's ``|W| * ||X||``) in every group of ``m``
    consecutive input weights of every row of each prunable layer, in place; return the masks."""
    targets = prunable_layers(model, layers)
    check_nm(n, m, targets)
    if score == "magnitude":
        scores = {name: layer.weight.detach().abs() for name, layer in targets.items()}
    elif score == "wanda":
        if calibration_batches is None:
            raise LmcycleError("N:M with Wanda scores needs calibration data", field="calibration")
        scores = wanda_scores(model, calibration_batches, list(targets))
    else:
        raise LmcycleError(f"score must be 'magnitude' or 'wanda', got {score!r}", field="score")
    masks = {name: nm_mask(s, n, m) for name, s in scores.items()}
    apply_masks(model, masks)
    return masks


# -- report ------------------------------------------------------------------------------------------------------


def nm_conformity(weight: torch.Tensor, n: int = 2, m: int = 4) -> float | None:
    """Fraction of the groups of ``m`` consecutive inputs of a row with at most ``n`` non-zeros (None when ``m``
    does not divide the input size)."""
    if weight.ndim != 2 or weight.shape[1] % m:
        return None
    nonzero = (weight.reshape(weight.shape[0], -1, m) != 0).sum(-1)
    return float((nonzero <= n).float().mean())


def sparsity_report(model: nn.Module, layers: str | None = None, n: int = 2, m: int = 4) -> list[dict]:
    """One row per prunable layer (``layer``, ``shape``, ``params``, ``zeros``, ``sparsity``, ``nm_conformity``
    for ``n:m``), then a row ``layer="[pruned layers]"`` with their totals and ``layer="[whole model]"`` over
    every parameter (embeddings, norms and heads included)."""
    rows = []
    for name, layer in prunable_layers(model, layers).items():
        w = layer.weight.detach()
        zeros = int((w == 0).sum())
        rows.append({"layer": name, "shape": list(w.shape), "params": w.numel(), "zeros": zeros,
                     "sparsity": zeros / w.numel(), f"nm_{n}_{m}": nm_conformity(w, n, m)})
    params, zeros = sum(r["params"] for r in rows), sum(r["zeros"] for r in rows)
    rows.append({"layer": "[pruned layers]", "params": params, "zeros": zeros, "sparsity": zeros / params})
    # Parameters shared by two modules (tied embeddings) count once, as named_parameters yields them.
    all_params = [p.detach() for p in model.parameters()]
    total, total_zeros = sum(p.numel() for p in all_params), sum(int((p == 0).sum()) for p in all_params)
    rows.append({"layer": "[whole model]", "params": total, "zeros": total_zeros, "sparsity": total_zeros / total})
    return rows


# -- structured --------------------------------------------------------------------------------------------------


def _shrunk_linear(layer: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """A new Linear holding only output ``rows`` and input ``cols`` (index tensors) of ``layer``."""
    w = layer.weight.detach()
    b = layer.bias.detach() if layer.bias is not None else None
    if rows is not None:
        w = w[rows]
        b = b[rows] if b is not None else None
    if cols is not None:
        w = w[:, cols]
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b)
    return new


def _blocks(model: nn.Module) -> tuple[str, list[tuple[str, nn.Module]]]:
    """``("llama" | "bert", [(path, block)])``: the architecture and its transformer blocks."""
    from transformers.models.bert.modeling_bert import BertLayer
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    llama = [(n, m) for n, m in model.named_modules() if isinstance(m, LlamaDecoderLayer)]
    if llama:
        return "llama", llama
    bert = [(n, m) for n, m in model.named_modules() if isinstance(m, BertLayer)]
    if bert:
        return "bert", bert
    raise LmcycleError(f"structured pruning supports Llama and BERT models, not {type(model).__name__}",
                       field="method")


def _keep_top(score: torch.Tensor, n_remove: int) -> torch.Tensor:
    """Indices (ascending) of the entries of ``score`` that survive removing the ``n_remove`` lowest."""
    return torch.nonzero(lowest_mask(score, n_remove)).squeeze(1)


def _column_importance(layer: nn.Linear, norm: torch.Tensor | None) -> torch.Tensor:
    """[in]: ``||W[:, j]||_2`` of each input column, times ``||X_j||_2`` when activations are known."""
    col = layer.weight.detach().float().norm(dim=0)
    return col * norm if norm is not None else col


def structured_prune(model: nn.Module, heads: float = 0.0, mlp: float = 0.0,
                     calibration_batches: list[Batch] | None = None) -> dict:
    """Remove the ``heads`` fraction of attention heads and the ``mlp`` fraction of MLP channels in every block,
    shrinking the weight matrices and the config in place (the same count in every layer, so the config stays
    standard; counts are rounded, so a tiny fraction may remove nothing). Returns
    ``{"heads_removed", "channels_removed", "params_before", "params_after"}`` (heads: per layer).

    Importance (lowest removed): an MLP channel ``j``'s output-projection column norm ``||W_down[:, j]||``; a head's
    sum over its columns of the output projection; with ``calibration_batches`` each column's norm is multiplied
    by its input activation norm (Wanda-style). Llama: whole KV groups go, each with its query heads (so GQA
    ratios stay), ``head_dim`` is written into the config. BERT: MLP channels only, because BERT in transformers
    5.23 derives the head size from ``hidden_size / num_attention_heads`` and has no ``pruned_heads``.
    """
    for field, frac in (("heads", heads), ("mlp", mlp)):
        if not isinstance(frac, (int, float)) or not 0 <= frac < 1:
            raise LmcycleError(f"{field} must be a fraction in [0, 1), got {frac!r}", field=field)
    if heads == 0 and mlp == 0:
        raise LmcycleError("structured pruning needs heads > 0 or mlp > 0", field="heads")
    arch, blocks = _blocks(model)
    cfg = model.config
    if arch == "bert" and heads > 0:
        raise LmcycleError("BERT heads cannot be removed in a standard checkpoint (transformers 5.23 computes the "
                           "head size as hidden_size / num_attention_heads and has no pruned_heads); prune mlp only",
                           field="heads")
    n_kv = cfg.num_key_value_heads if arch == "llama" else cfg.num_attention_heads
    kv_remove, ch_remove = round(heads * n_kv), round(mlp * cfg.intermediate_size)
    if kv_remove >= n_kv:
        raise LmcycleError(f"heads={heads} would remove every attention head", field="heads")
    if ch_remove >= cfg.intermediate_size:
        raise LmcycleError(f"mlp={mlp} would remove every MLP channel", field="mlp")
    if calibration_batches is not None:
        check_batches(calibration_batches)
    params_before = sum(p.numel() for p in model.parameters())

    attn_out, mlp_out = ("self_attn.o_proj", "mlp.down_proj") if arch == "llama" else \
        ("attention.output.dense", "output.dense")
    norms = {}
    if calibration_batches is not None and (kv_remove or ch_remove):
        norms = input_norms(model, calibration_batches, [f"{p}.{o}" for p, _ in blocks for o in (attn_out, mlp_out)])
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    group = cfg.num_attention_heads // n_kv  # query heads per KV head (1 without GQA)
    for path, block in blocks:
        if ch_remove:
            _remove_mlp_channels(block, arch, ch_remove, norms.get(f"{path}.{mlp_out}"))
        if kv_remove:
            _remove_kv_groups(block.self_attn, kv_remove, n_kv, group, head_dim, norms.get(f"{path}.{attn_out}"))
    if kv_remove:
        cfg.head_dim = head_dim  # no longer hidden_size / num_attention_heads: must be explicit
        cfg.num_key_value_heads = n_kv - kv_remove
        cfg.num_attention_heads = (n_kv - kv_remove) * group
    cfg.intermediate_size -= ch_remove
    return {"heads_removed": kv_remove * group, "channels_removed": ch_remove, "params_before": params_before,
            "params_after": sum(p.numel() for p in model.parameters())}


def _remove_mlp_channels(block: nn.Module, arch: str, n_remove: int, norm: torch.Tensor | None) -> None:
    """Drop the ``n_remove`` least important intermediate channels: rows of the up (and gate) projection,
    columns of the down projection."""
    if arch == "llama":
        mlp = block.mlp
        keep = _keep_top(_column_importance(mlp.down_proj, norm), n_remove)
        mlp.gate_proj = _shrunk_linear(mlp.gate_proj, rows=keep)
        mlp.up_proj = _shrunk_linear(mlp.up_proj, rows=keep)
        mlp.down_proj = _shrunk_linear(mlp.down_proj, cols=keep)
        mlp.intermediate_size = len(keep)
    else:
        keep = _keep_top(_column_importance(block.output.dense, norm), n_remove)
        block.intermediate.dense = _shrunk_linear(block.intermediate.dense, rows=keep)
        block.output.dense = _shrunk_linear(block.output.dense, cols=keep)


def _remove_kv_groups(attn: nn.Module, n_remove: int, n_kv: int, group: int, head_dim: int,
                      norm: torch.Tensor | None) -> None:
    """Drop the ``n_remove`` least important KV heads of a Llama attention with their ``group`` query heads:
    rows of q/k/v, columns of o. A group's importance is the sum of its o_proj columns' importance."""
    col = _column_importance(attn.o_proj, norm)  # [n_kv * group * head_dim], query heads in KV-group order
    kv_keep = _keep_top(col.reshape(n_kv, group * head_dim).sum(1), n_remove)
    dims = torch.arange(head_dim, device=kv_keep.device)
    kv_cols = (kv_keep[:, None] * head_dim + dims).reshape(-1)
    q_heads = (kv_keep[:, None] * group + torch.arange(group, device=kv_keep.device)).reshape(-1)
    q_cols = (q_heads[:, None] * head_dim + dims).reshape(-1)
    attn.q_proj = _shrunk_linear(attn.q_proj, rows=q_cols)
    attn.k_proj = _shrunk_linear(attn.k_proj, rows=kv_cols)
    attn.v_proj = _shrunk_linear(attn.v_proj, rows=kv_cols)
    attn.o_proj = _shrunk_linear(attn.o_proj, cols=q_cols)


# -- healing -----------------------------------------------------------------------------------------------------


def text_items(tokenizer, texts: Sequence[str], max_len: int) -> list[list[int]]:
    """The token ids of each text (cut to ``max_len``) that has at least two tokens: one causal-LM item each."""
    items = []
    for t in texts:
        ids = list(tokenizer(t)["input_ids"])[:max_len]
        if len(ids) >= 2:
            items.append(ids)
    if not items:
        raise LmcycleError("the healing data has no text of two tokens or more", field="heal.data")
    return items


def _collate(items: list[list[int]], pad: int) -> dict[str, torch.Tensor]:
    ids, mask = pad_rows(items, pad)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def heal_with_lora(model: nn.Module, tokenizer, texts: Sequence[str], masks: Masks, lora: LoraConfig,
                   train_cfg: TrainConfig, out_dir: str | Path, log: Callable[..., None], max_len: int = 256,
                   seed: int = 0) -> TrainResult:
    """Fine-tune LoRA adapters on ``texts`` (causal LM loss on every token), merge them, then re-apply ``masks``.

    The adapter's update ``B @ A`` is dense, so merging it would fill the pruned weights back in; zeroing them
    again afterwards keeps the sparsity (the part of the update that fell on pruned weights is dropped, which
    is why the healed perplexity is measured after re-masking). ``lora.target_modules=None`` adapts every
    prunable layer. Checkpoints go to ``out_dir``."""
    items = text_items(tokenizer, texts, max_len)
    if lora.target_modules is None:
        lora = lora.model_copy(update={"target_modules": [re.escape(n) for n in prunable_layers(model)]})
    seed_everything(seed)  # the adapter's random init
    add_lora(model, lora)
    pad = pad_id_of(tokenizer)

    def batch_at(step: int):
        return [_collate([items[i] for i in idx], pad)
                for idx in micro_batch_indices(len(items), step, train_cfg.batch_size, train_cfg.grad_accum, seed)]

    result = train(model, batch_at, lm_loss_sum, train_cfg.model_copy(update={"seed": seed}), out_dir, log=log,
                   desc="heal")
    merge_and_unload(model)
    apply_masks(model, masks)
    return result
