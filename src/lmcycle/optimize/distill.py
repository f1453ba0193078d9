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
- ``DistillStage`` (type ``distill``) trains on the shared loop, saves ``<stage>/model`` and writes
  ``<stage>/eval.json`` with the student's and the teacher's held-out scores and parameter counts.

The classifier texts may be offensive: nothing here logs or saves a text.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import safetensors.torch
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from tqdm.auto import tqdm

from lmcycle.atomic import atomic_write_bytes, atomic_write_json
from lmcycle.config import Config, DatasetName, ModelRef
from lmcycle.data.examples import plain_texts
from lmcycle.errors import LmcycleError
from lmcycle.evals.classification import score_labels
from lmcycle.models.classifier import TextClassifier, class_names, collate
from lmcycle.models.load import eval_mode
from lmcycle.optimize.student import (
    default_student_layers,
    hidden_size_of,
    num_layers_of,
    param_count,
    student_from_scratch,
    student_from_teacher,
    trim_embeddings,
    trim_vocabulary,
)
from lmcycle.stages.classifier import labelled_texts
from lmcycle.stages.common import TrainingStage, finish_training_stage
from lmcycle.stages.context import RunContext
from lmcycle.train.loop import (
    Batch,
    TrainConfig,
    held_out_metrics,
    micro_batch_indices,
    seed_everything,
    train,
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


# -- the stage -----------------------------------------------------------------------------------------------------


class DistillStage(Config):
    """Distil a frozen teacher (classifier or decoder LM) into a smaller student; score both on held-out sets."""

    type: Literal["distill"] = "distill"
    name: str | None = None
    teacher: ModelRef = Field(description="an earlier stage, a path or a hub id")
    task: Literal["classifier", "lm"] | None = Field(None, description="None: from the teacher's config")
    student_layers: list[int] | None = Field(None, description="teacher layers to copy (None and no "
                                                               "student_config: every other layer)")
    student_config: dict[str, Any] | None = Field(None, description="config overrides: a student from scratch")
    data: list[DatasetName] = Field(min_length=1)
    eval_data: list[DatasetName] = Field(default_factory=list)
    label_map: dict[str, str] | None = Field(None, description="classifier: dataset label -> class name (None: "
                                                               "the labels are the teacher's class names)")
    template: str | dict | None = Field(None, description="lm: a prompt template (loss on the completion); "
                                                          "None: every input and target as plain text")
    trim_vocab: bool = Field(False, description="classifier: keep only the word pieces of the training texts "
                                                "(plus special and single-character ones) in the student")
    max_len: int = Field(128, ge=8)
    temperature: float = Field(2.0, gt=0)
    alpha: float = Field(0.5, ge=0, description="weight of T^2 * KL(teacher || student) at temperature T")
    beta: float = Field(0.5, ge=0, description="weight of the cross-entropy on the hard labels at T = 1")
    hidden_weight: float = Field(0.0, ge=0, description="weight of the hidden-state MSE (0: off)")
    layer_map: dict[int, int] | None = Field(None, description="student layer -> teacher layer for the hidden "
                                                               "loss (None: the copied-from layer, else uniform)")
    train: TrainConfig


def run_distill(cfg: DistillStage, ctx: RunContext) -> dict[str, str]:
    """Distil; save the student to ``<stage>/model``; write ``<stage>/eval.json``; return ``{"model", "eval"}``."""
    if cfg.alpha == 0 and cfg.beta == 0:
        raise LmcycleError("alpha and beta are both 0: nothing to learn from", file=ctx.recipe_file, field="alpha")
    if cfg.student_layers is not None and cfg.student_config is not None:
        raise LmcycleError("set student_layers (copy teacher layers) or student_config (from scratch), not both",
                           file=ctx.recipe_file, field="student_config")
    name = cfg.name or "distill"
    source = ctx.model_path(cfg.teacher)
    task = cfg.task or ("classifier" if _is_classifier(source) else "lm")
    if task == "classifier":
        if not _is_classifier(source):
            raise LmcycleError("task is 'classifier' but the teacher is not a sequence classifier", file=source,
                               field="teacher")
        teacher_clf = TextClassifier.load(source, device=ctx.device)
        teacher, tokenizer = teacher_clf.model, teacher_clf.tokenizer
    else:
        from lmcycle.models.load import load_model

        if _is_classifier(source):
            raise LmcycleError("task is 'lm' but the teacher is a sequence classifier", file=source, field="teacher")
        if cfg.trim_vocab:
            raise LmcycleError("trim_vocab is for classifiers: an LM's output is its vocabulary",
                               file=ctx.recipe_file, field="trim_vocab")
        teacher, tokenizer = load_model(source, device=ctx.device)
        if getattr(teacher.config, "is_encoder_decoder", False):
            raise LmcycleError("LM distillation supports decoder LMs only (the teacher is an encoder-decoder)",
                               file=source, field="teacher")
    freeze(teacher)

    seed = cfg.train.seed if cfg.train.seed is not None else ctx.seed
    seed_everything(seed)  # a from-scratch student's init and a projection's are part of the run
    try:
        student, copied = build_student(teacher, cfg.student_layers, cfg.student_config)
        n_student_layers, n_teacher_layers = num_layers_of(student.config), num_layers_of(teacher.config)
        layer_map = cfg.layer_map or default_layer_map(n_student_layers, n_teacher_layers, copied)
        _check_layer_map(layer_map, n_student_layers, n_teacher_layers)
    except LmcycleError as e:  # the helpers name the field; the recipe is where to fix it
        raise LmcycleError(e.message, file=e.file or ctx.recipe_file, field=e.field) from None
    projection = None
    if cfg.hidden_weight > 0 and hidden_size_of(student.config) != hidden_size_of(teacher.config):
        projection = nn.Linear(hidden_size_of(student.config), hidden_size_of(teacher.config), bias=False)
    wrapper = Student(student, projection).to(ctx.device)
    stage = TrainingStage(name=name, out_dir=ctx.stage_dir(name), model=student, tokenizer=tokenizer,
                          train=cfg.train.model_copy(update={"seed": seed}), ctx=ctx)
    stage.log(event="distill", task=task, teacher_params=param_count(teacher), student_params=param_count(student),
              student_layers=copied, temperature=cfg.temperature, alpha=cfg.alpha, beta=cfg.beta,
              hidden_weight=cfg.hidden_weight)
    run = _run_classifier if task == "classifier" else _run_lm
    report, result = run(cfg, ctx, stage, wrapper, teacher, layer_map)
    produced = finish_training_stage(stage, result)

    n_t, n_s = param_count(teacher), param_count(student)
    report["metrics"].update({"teacher_params": n_t, "student_params": n_s, "param_ratio": n_s / n_t})
    report["settings"].update({
        "task": task, "teacher": source, "student_layers": copied, "student_config": cfg.student_config,
        "layer_map": {str(k): v for k, v in layer_map.items()}, "temperature": cfg.temperature, "alpha": cfg.alpha,
        "beta": cfg.beta, "hidden_weight": cfg.hidden_weight, "max_len": cfg.max_len, "data": cfg.data,
        "eval_data": cfg.eval_data, "train": stage.train.model_dump(mode="json"),
        "train_wall_time": round(result.wall_time, 1),
        "loss": "alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + beta * CE(student, label)"
                + (" + hidden_weight * MSE(hidden states)" if cfg.hidden_weight else "")})
    eval_path = stage.out_dir / "eval.json"
    atomic_write_json(eval_path, report)
    ctx.log(name, kind="eval", **{k: v for k, v in report["metrics"].items() if isinstance(v, (int, float))})
    return {**produced, "eval": str(eval_path)}


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


def _is_classifier(source: str) -> bool:
    from lmcycle.stages.context import is_scorer

    try:
        architectures = json.loads((Path(source) / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError):
        return is_scorer(source)
    return any(a.endswith("ForSequenceClassification") for a in architectures)


def _check_layer_map(layer_map: dict[int, int], n_student: int, n_teacher: int) -> None:
    for s, t in layer_map.items():
        if not 0 <= s < n_student or not 0 <= t < n_teacher:
            raise LmcycleError(f"layer_map {s}: {t} is out of range (student layers 0..{n_student - 1}, teacher "
                               f"layers 0..{n_teacher - 1})", field="layer_map")


# -- classifier distillation ---------------------------------------------------------------------------------------


def _run_classifier(cfg: DistillStage, ctx: RunContext, stage: TrainingStage, wrapper: Student, teacher: nn.Module,
                    layer_map: dict[int, int]):
    labels = [str(teacher.config.id2label[i]) for i in range(teacher.config.num_labels)]
    label_map = cfg.label_map if cfg.label_map is not None else {c: c for c in labels}
    if set(class_names(label_map)) != set(labels):
        raise LmcycleError(f"label_map's classes ({', '.join(class_names(label_map))}) are not the teacher's "
                           f"({', '.join(labels)})", file=ctx.recipe_file, field="label_map")
    texts, classes = labelled_texts(ctx, cfg.data, label_map, "data")
    y = [labels.index(c) for c in classes]  # the teacher's class ids, which the copied head uses too
    tokenizer, tcfg, seed = stage.tokenizer, stage.train, stage.seed
    teacher_tokenizer = tokenizer
    encoded = [tokenizer(t, truncation=True, max_length=cfg.max_len)["input_ids"] for t in texts]
    remap = None
    if cfg.trim_vocab:
        remap = trim_student_vocabulary(stage, wrapper.student, texts, encoded, cfg.max_len)
    soft = cached_teacher_logits(teacher, encoded, tokenizer.pad_token_id, stage.out_dir / "teacher_logits.safetensors",
                                 key=f"{ctx.model_path(cfg.teacher)}|{cfg.max_len}")
    pad = tokenizer.pad_token_id

    def batch_at(step: int) -> list[Batch]:
        out = []
        for idx in micro_batch_indices(len(encoded), step, tcfg.batch_size, tcfg.grad_accum, seed):
            batch = collate([encoded[i] for i in idx], pad, [y[i] for i in idx])
            batch["teacher_logits"] = soft[idx]
            if remap is not None:  # the teacher reads its own ids, the student the trimmed vocabulary's
                batch["teacher_input_ids"] = batch["input_ids"]
                batch["input_ids"] = remap[batch["input_ids"]]
            out.append(batch)
        return out

    def loss_fn(model: Student, batch: Batch) -> tuple[torch.Tensor, int]:
        hidden = cfg.hidden_weight > 0
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        out = model.student(**inputs, output_hidden_states=hidden)
        loss, n = distillation_loss(out.logits, batch["teacher_logits"], batch["labels"],
                                    temperature=cfg.temperature, alpha=cfg.alpha, beta=cfg.beta)
        if hidden:
            with torch.no_grad():
                t_states = teacher(input_ids=batch.get("teacher_input_ids", batch["input_ids"]),
                                   attention_mask=batch["attention_mask"], output_hidden_states=True).hidden_states
            mask = batch["attention_mask"].float()
            weights = mask / mask.sum(1, keepdim=True)  # each example weighs 1, like its KD and CE terms
            loss = loss + cfg.hidden_weight * hidden_state_loss(out.hidden_states, t_states, layer_map, weights,
                                                                model.projection)
        return loss, n

    stage.log(event="data", train_examples=len(encoded), datasets=cfg.data, max_len=cfg.max_len)
    tokenizer = stage.tokenizer  # the student's (trimmed) one from here on
    eval_sets = {name: labelled_texts(ctx, [name], label_map, "eval_data") for name in cfg.eval_data}

    def eval_fn(model: Student) -> dict[str, float]:
        clf = TextClassifier(model.student, tokenizer, labels)
        return {f"{name}.macro_f1": score_labels(clf.predict(t, max_len=cfg.max_len), g)["metrics"]["macro_f1"]
                for name, (t, g) in eval_sets.items()}

    result = train(wrapper, batch_at, loss_fn, tcfg, stage.out_dir, log=stage.log,
                   eval_fn=eval_fn if eval_sets and tcfg.eval_every else None, desc=stage.name)
    wrapper.student.eval()
    student_clf = TextClassifier(wrapper.student, tokenizer, labels)
    teacher_clf = TextClassifier(teacher, teacher_tokenizer, labels)
    metrics: dict[str, float] = {}
    per_student, per_teacher = {}, {}
    for name, (t, gold) in eval_sets.items():
        per_student[name] = score_labels(student_clf.predict(t, max_len=cfg.max_len), gold)
        per_teacher[name] = score_labels(teacher_clf.predict(t, max_len=cfg.max_len), gold)
        metrics.update({f"{name}.{k}": v for k, v in per_student[name]["metrics"].items()})
        metrics.update({f"teacher.{name}.{k}": v for k, v in per_teacher[name]["metrics"].items()})
        f1_t = per_teacher[name]["metrics"]["macro_f1"]
        metrics[f"{name}.macro_f1_ratio"] = per_student[name]["metrics"]["macro_f1"] / f1_t if f1_t else 0.0
    settings = {"labels": labels, "label_map": label_map, "n_train": len(encoded), "trim_vocab": cfg.trim_vocab,
                "student_vocab_size": wrapper.student.config.vocab_size,
                "teacher_vocab_size": teacher.config.vocab_size,
                "prediction_rule": "the most probable class (argmax of the softmax)"}
    return {"metrics": metrics, "settings": settings, "student": per_student, "teacher": per_teacher}, result


def trim_student_vocabulary(stage: TrainingStage, student: nn.Module, texts: list[str], encoded: list[list[int]],
                            max_len: int) -> torch.Tensor:
    """Trim the student's vocabulary to what the training texts use (:func:`trim_vocabulary`); make the trimmed
    tokenizer the stage's; return the map teacher id -> student id [V_teacher] (-1 for dropped ids)."""
    trimmed, kept = trim_vocabulary(stage.tokenizer, {i for ids in encoded for i in ids})
    remap = torch.full((stage.tokenizer.backend_tokenizer.get_vocab_size(with_added_tokens=True),), -1,
                       dtype=torch.long)
    remap[torch.tensor(kept)] = torch.arange(len(kept))
    # The guarantee the training relies on: the saved tokenizer gives the student the ids it was trained on.
    sample = range(0, len(texts), max(1, len(texts) // 500))
    if any(trimmed(texts[i], truncation=True, max_length=max_len)["input_ids"] != remap[encoded[i]].tolist()
           for i in sample):
        raise LmcycleError("trim_vocab changed how training texts tokenize; set trim_vocab: false",
                           field="trim_vocab")
    trim_embeddings(student, kept)
    stage.tokenizer = trimmed
    stage.log(event="trim_vocab", teacher_vocab=len(remap), student_vocab=len(kept),
              student_params=param_count(student))
    return remap


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
        from lmcycle.data.sft import encode_sft
        from lmcycle.data.templates import get_template

        return encode_sft(examples, get_template(template), tokenizer, max_len, seq2seq=False)
    texts = plain_texts(examples)
    ids = tokenizer(texts, truncation=True, max_length=max_len, verbose=False)["input_ids"]
    return [{"input_ids": list(i), "labels": list(i)} for i in ids if len(i) > 1]


def _run_lm(cfg: DistillStage, ctx: RunContext, stage: TrainingStage, wrapper: Student, teacher: nn.Module,
            layer_map: dict[int, int]):
    from lmcycle.data.sft import collate_sft
    from lmcycle.models.load import context_window

    tokenizer, tcfg, seed = stage.tokenizer, stage.train, stage.seed
    max_len = min(cfg.max_len, context_window(teacher, tokenizer), context_window(wrapper.student, tokenizer))
    items = lm_items([ex for d in cfg.data for ex in ctx.dataset(d)], tokenizer, cfg.template, max_len)
    if not items:
        raise LmcycleError("no training text for distillation", file=ctx.recipe_file, field="data")
    pad = tokenizer.pad_token_id

    def batch_at(step: int) -> list[Batch]:
        return [collate_sft([items[i] for i in idx], pad)
                for idx in micro_batch_indices(len(items), step, tcfg.batch_size, tcfg.grad_accum, seed)]

    def loss_fn(model: Student, batch: Batch) -> tuple[torch.Tensor, int]:
        hidden = cfg.hidden_weight > 0
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False,
                  "output_hidden_states": hidden}
        labels = F.pad(batch["labels"], (0, 1), value=IGNORE)[:, 1:]  # position t predicts token t + 1
        out = model.student(**inputs)
        with torch.no_grad():
            t_out = teacher(**inputs)
        loss, n = distillation_loss(out.logits, t_out.logits, labels, temperature=cfg.temperature,
                                    alpha=cfg.alpha, beta=cfg.beta)
        if hidden:
            weights = (labels != IGNORE).float()  # one per scored token, like the KD and CE terms
            loss = loss + cfg.hidden_weight * hidden_state_loss(out.hidden_states, t_out.hidden_states, layer_map,
                                                                weights, model.projection)
        return loss, n

    eval_batches = {}
    for name in cfg.eval_data:
        held_out = sorted(lm_items(ctx.dataset(name), tokenizer, cfg.template, max_len),
                          key=lambda it: len(it["input_ids"]))
        eval_batches[name] = [collate_sft(held_out[i:i + tcfg.batch_size], pad)
                              for i in range(0, len(held_out), tcfg.batch_size)]
    first = next(iter(eval_batches.values()), None)
    eval_fn = (lambda m: held_out_metrics(m.student, first)) if first else None
    stage.log(event="data", train_examples=len(items), datasets=cfg.data, max_len=max_len)
    result = train(wrapper, batch_at, loss_fn, tcfg, stage.out_dir, log=stage.log, eval_fn=eval_fn,
                   desc=stage.name)
    wrapper.student.eval()
    metrics: dict[str, float] = {}
    per_student, per_teacher = {}, {}
    for name, batches in eval_batches.items():
        with torch.no_grad():
            per_student[name] = held_out_metrics(wrapper.student, batches)
            per_teacher[name] = held_out_metrics(teacher, batches)
        metrics.update({f"{name}.loss": per_student[name]["eval_loss"], f"{name}.perplexity":
                        per_student[name]["eval_ppl"], f"teacher.{name}.loss": per_teacher[name]["eval_loss"],
                        f"teacher.{name}.perplexity": per_teacher[name]["eval_ppl"]})
    settings = {"n_train": len(items), "template": cfg.template,
                "perplexity": "exp(token-mean NLL of the scored tokens), nats"}
    return {"metrics": metrics, "settings": settings, "student": per_student, "teacher": per_teacher}, result
