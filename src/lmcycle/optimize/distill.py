"""Knowledge distillation: a frozen teacher, a smaller student trained on the teacher's soft predictions.

The student loss (Hinton et al. 2015) is, per example (classifier) or per scored token (LM)::

    alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))  +  beta * CE(student at T = 1, hard label)

plus, optionally, ``hidden_weight * MSE(student hidden state, teacher hidden state)`` over a layer map
(TinyBERT-style; a learned linear projection bridges a student of another width).

- The student starts from a subset of the teacher's layers (:func:`student_from_teacher`; DistilBERT's
  initialisation) or from scratch (:func:`student_from_scratch`, same tokenizer and vocabulary).
- ``task: classifier`` (a sequence-classification teacher, e.g. a ``classifier`` stage's MiniLM): the teacher's
  logits over the training texts are computed once and cached in the stage folder. ``task: lm`` (a decoder
  LM): the teacher runs per batch (full-vocabulary logits are too big to cache), token-level distillation.
- ``trim_vocab`` (classifiers): the student keeps only the word pieces its training texts use (plus special and
  single-character ones). In a small BERT the word embeddings are most of the parameters (all-MiniLM-L6-v2:
  52%), so dropping layers alone cannot halve it: 3 of its 6 layers keep 77% of the parameters, 48% trimmed.
- The ``distill`` stage (:mod:`lmcycle.stages.distill`) trains the student on the shared loop, saves it and
  scores student and teacher on held-out sets.

The classifier texts may be offensive: nothing here logs or saves a text.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lmcycle.atomic import atomic_write_bytes
from lmcycle.data.examples import plain_texts
from lmcycle.data.sft import encode_sft
from lmcycle.data.templates import get_template
from lmcycle.errors import LmcycleError
from lmcycle.models.classifier import collate
from lmcycle.models.load import eval_mode
from lmcycle.optimize.student import (
    default_student_layers,
    num_layers_of,
    student_from_scratch,
    student_from_teacher,
    trim_embeddings,
    trim_vocabulary,
)

IGNORE = -100

# -- the loss ------------------------------------------------------------------------------------------------------


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *,
                      temperature: float, alpha: float, beta: float,
                      mask: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """``(loss summed over the counted rows, number of counted rows)`` for the shared loop.

    Shapes: classifier ``student_logits``/``teacher_logits`` [B, C], ``labels`` [B]; LM [B, L, V] and [B, L]
    (already aligned: row ``[b, l]`` predicts ``labels[b, l]``). ``labels`` equal to -100 are ignored. ``mask``
    ([B] or [B, L], bool) picks the rows that count; None: the rows with a label. A row counted by ``mask``
    without a label gets the soft term only.

    Per row: ``alpha * T^2 * KL(p_t || p_s) + beta * CE(student logits, label)`` with ``p = softmax(logits / T)``
    and the cross-entropy at T = 1. Why T^2: the gradient of the soft term with respect to the student's logits
    is ``(p_s - p_t) / T``, and for large T ``p_s - p_t`` itself shrinks like ``1 / T`` (Hinton et al. 2015), so
    without the factor the soft targets' pull would fade as ``1 / T^2``; multiplying by T^2 keeps it on the same
    scale whatever T, so ``alpha`` and ``beta`` keep their meaning when T changes.
    """
    if temperature <= 0:
        raise LmcycleError(f"temperature must be positive, got {temperature}", field="temperature")
    width = student_logits.size(-1)
    if teacher_logits.shape != student_logits.shape:
        raise LmcycleError(f"teacher logits {tuple(teacher_logits.shape)} and student logits "
                           f"{tuple(student_logits.shape)} differ: teacher and student need the same labels/vocabulary",
                           field="teacher")
    student = student_logits.reshape(-1, width).float()
    teacher = teacher_logits.reshape(-1, width).float().detach()
    labels = labels.reshape(-1)
    keep = labels != IGNORE if mask is None else mask.reshape(-1).bool()
    # Only the counted rows go through the softmaxes: for an LM most positions may be prompt or padding.
    student, teacher, labels = student[keep], teacher[keep], labels[keep]
    loss = student.new_zeros(())
    if alpha:
        log_p_s = F.log_softmax(student / temperature, dim=-1)
        log_p_t = F.log_softmax(teacher / temperature, dim=-1)
        kl = F.kl_div(log_p_s, log_p_t, log_target=True, reduction="sum")
        loss = loss + alpha * temperature ** 2 * kl
    if beta:
        loss = loss + beta * F.cross_entropy(student, labels, ignore_index=IGNORE, reduction="sum")
    return loss, int(keep.sum())


def hidden_state_loss(student_states: tuple[torch.Tensor, ...], teacher_states: tuple[torch.Tensor, ...],
                      layer_map: dict[int, int], weights: torch.Tensor,
                      projection: nn.Module | None = None) -> torch.Tensor:
    """``sum_{b,t} weights[b, t] * mean over mapped layers and hidden units of (proj(h_s) - h_t)^2``.

    ``*_states``: Hugging Face ``hidden_states`` (entry 0 = embeddings, entry ``i + 1`` = transformer layer
    ``i``'s output), each [B, T, H_student] / [B, T, H_teacher]. ``layer_map``: student layer -> teacher layer
    (0-based transformer layers). ``weights`` [B, T]: how much each position counts (the caller's unit: 1 per
    scored token, or 1 / length per example). ``projection``: H_student -> H_teacher when the widths differ.
    """
    total = weights.new_zeros((), dtype=torch.float32)
    for s, t in layer_map.items():
        h_s = student_states[s + 1].float()
        if projection is not None:
            h_s = projection(h_s)
        per_position = (h_s - teacher_states[t + 1].float().detach()).pow(2).mean(-1)  # [B, T]
        total = total + (per_position * weights.float()).sum()
    return total / max(len(layer_map), 1)


def default_layer_map(n_student: int, n_teacher: int, copied_from: list[int] | None) -> dict[int, int]:
    """Student layer -> teacher layer: the layer it was copied from, else uniform (student layer i <-> teacher
    layer ``round((i + 1) * n_teacher / n_student) - 1``, so the last layers meet)."""
    if copied_from is not None:
        return dict(enumerate(copied_from))
    return {i: max(0, round((i + 1) * n_teacher / n_student) - 1) for i in range(n_student)}


class Student(nn.Module):
    """What the loop trains and checkpoints: the student and, for the hidden-state loss between different
    widths, its projection (trained with it, never saved with the model)."""

    def __init__(self, student: nn.Module, projection: nn.Module | None = None):
        super().__init__()
        self.student = student
        self.projection = projection


# -- the student ---------------------------------------------------------------------------------------------------


def build_student(teacher: nn.Module, layers: list[int] | None,
                  config: dict[str, Any] | None) -> tuple[nn.Module, list[int] | None]:
    """``(student, the teacher layers it copies or None)``: from scratch with ``config`` overrides, else a copy
    of teacher ``layers`` (None: :func:`default_student_layers`)."""
    if config is not None:
        student = student_from_scratch(teacher, **config)
        if student.config.vocab_size != teacher.config.vocab_size:
            raise LmcycleError("teacher and student vocabularies differ", field="student_config")
        return student, None
    layers = layers if layers is not None else default_student_layers(num_layers_of(teacher.config))
    return student_from_teacher(teacher, layers), layers


def freeze(model: nn.Module) -> None:
    """Eval mode (no dropout) and no gradients: the teacher never changes."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)


def check_layer_map(layer_map: dict[int, int], n_student: int, n_teacher: int) -> None:
    """A layer map's student and teacher layers must exist (0-based): else an error naming ``layer_map``."""
    for s, t in layer_map.items():
        if not 0 <= s < n_student or not 0 <= t < n_teacher:
            raise LmcycleError(f"layer_map {s}: {t} is out of range (student layers 0..{n_student - 1}, teacher "
                               f"layers 0..{n_teacher - 1})", field="layer_map")


# -- classifier distillation ---------------------------------------------------------------------------------------


def trim_student_vocabulary(student: nn.Module, tokenizer, texts: list[str], encoded: list[list[int]],
                            max_len: int) -> tuple[Any, torch.Tensor]:
    """Trim the student's vocabulary to the word pieces of ``encoded`` (the training texts' token ids under
    ``tokenizer``; :func:`trim_vocabulary`, :func:`trim_embeddings`), in place; return the trimmed tokenizer and
    the map teacher id -> student id [V_teacher] (-1 for dropped ids)."""
    trimmed, kept = trim_vocabulary(tokenizer, {i for ids in encoded for i in ids})
    remap = torch.full((tokenizer.backend_tokenizer.get_vocab_size(with_added_tokens=True),), -1, dtype=torch.long)
    remap[torch.tensor(kept)] = torch.arange(len(kept))
    # The guarantee the training relies on: the saved tokenizer gives the student the ids it was trained on.
    sample = range(0, len(texts), max(1, len(texts) // 500))
    if any(trimmed(texts[i], truncation=True, max_length=max_len)["input_ids"] != remap[encoded[i]].tolist()
           for i in sample):
        raise LmcycleError("trim_vocab changed how training texts tokenize; set trim_vocab: false",
                           field="trim_vocab")
    trim_embeddings(student, kept)
    return trimmed, remap


def teacher_logits(teacher: nn.Module, encoded: list[list[int]], pad_id: int, batch_size: int = 64) -> torch.Tensor:
    """The teacher's logits [N, C] (float32, CPU) for token-id lists ``encoded``, batched by length."""
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    out = torch.empty(len(encoded), teacher.config.num_labels)
    device = next(teacher.parameters()).device
    with eval_mode(teacher), torch.no_grad():
        for start in tqdm(range(0, len(order), batch_size), desc="teacher logits", leave=False):
            rows = order[start:start + batch_size]
            batch = collate([encoded[i] for i in rows], pad_id)
            out[rows] = teacher(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()
    return out


def cached_teacher_logits(teacher: nn.Module, encoded: list[list[int]], pad_id: int, path: Path,
                          key: str) -> torch.Tensor:
    """:func:`teacher_logits`, read from ``path`` when it was written for the same teacher, settings (``key``)
    and token ids (a resumed run does not recompute them), else computed and saved there atomically."""
    digest = hashlib.sha256((key + json.dumps(encoded)).encode("utf-8")).hexdigest()
    if path.is_file():
        with safetensors.safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("fingerprint") == digest:
                return f.get_tensor("logits")
    logits = teacher_logits(teacher, encoded, pad_id)
    atomic_write_bytes(path, safetensors.torch.save({"logits": logits}, metadata={"fingerprint": digest}))
    return logits


# -- LM distillation -----------------------------------------------------------------------------------------------


def lm_items(examples: list, tokenizer, template, max_len: int) -> list[dict]:
    """``{"input_ids", "labels"}`` items: with a template, prompt + completion (loss on the completion, as SFT);
    without, every input and target as a plain text (loss on every token but the first)."""
    if template is not None:
        return encode_sft(examples, get_template(template), tokenizer, max_len, seq2seq=False)
    texts = plain_texts(examples)
    ids = tokenizer(texts, truncation=True, max_length=max_len, verbose=False)["input_ids"]
    return [{"input_ids": list(i), "labels": list(i)} for i in ids if len(i) > 1]
