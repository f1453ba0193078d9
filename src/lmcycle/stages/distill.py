"""DistillStage: distil a frozen teacher into a smaller student (:mod:`lmcycle.optimize.distill`).

``teacher`` is an earlier stage, a path or a Hub id; ``task`` (default: from the teacher's config) is
``classifier`` for a sequence-classification teacher (its logits over the training texts computed once and
cached in ``<stage>/teacher_logits.safetensors``) or ``lm`` for a decoder LM (the teacher runs per batch). The
student copies ``student_layers`` of the teacher (default every other one) or starts from scratch with
``student_config``; ``trim_vocab`` keeps only the word pieces the training texts use. It trains on the shared loop
(checkpoints, exact resume), is saved to ``<stage>/model``, and ``<stage>/eval.json`` holds the student's and the
teacher's held-out scores (macro-F1 per ``eval_data`` set, or perplexity) and parameter counts.

The classifier texts may be offensive: nothing here logs or saves a text.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from lmcycle.artifacts import load_model
from lmcycle.config import DatasetName, ModelRef
from lmcycle.data.batching import pad_id_of
from lmcycle.data.sft import collate_sft
from lmcycle.errors import LmcycleError
from lmcycle.evals.classification import score_labels
from lmcycle.models.classifier import TextClassifier, class_names, collate
from lmcycle.models.load import context_window
from lmcycle.optimize.distill import (
    IGNORE,
    Student,
    build_student,
    cached_teacher_logits,
    check_layer_map,
    default_layer_map,
    distillation_loss,
    freeze,
    hidden_state_loss,
    lm_items,
    trim_student_vocabulary,
)
from lmcycle.optimize.student import hidden_size_of, num_layers_of, param_count
from lmcycle.report.markdown import fixed, is_number, md, millions, share
from lmcycle.report.rundir import Run
from lmcycle.stages.classifier import labelled_texts
from lmcycle.stages.common import ModelStage, TrainingStage, finish_training_stage, model_dtype, write_eval
from lmcycle.stages.context import RunContext, is_scorer
from lmcycle.train.loop import (
    Batch,
    TrainConfig,
    held_out_metrics,
    micro_batch_indices,
    seed_everything,
    train,
)


class DistillStage(ModelStage):
    """Distil a frozen teacher (classifier or decoder LM) into a smaller student; score both on held-out sets.

    ``model_dtype`` is the teacher's: the student trains in float32 whatever it says (it is what trains).
    """

    type: Literal["distill"] = "distill"
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
    name = cfg.stage_name
    dtype = model_dtype(cfg, ctx)
    source = ctx.model_path(cfg.teacher)
    task = cfg.task or ("classifier" if _is_classifier(source) else "lm")
    if task == "classifier":
        if not _is_classifier(source):
            raise LmcycleError("task is 'classifier' but the teacher is not a sequence classifier", file=source,
                               field="teacher")
        teacher_clf = TextClassifier.load(source, device=ctx.device, attn_implementation=ctx.attn_implementation)
        teacher, tokenizer = teacher_clf.model.to(dtype), teacher_clf.tokenizer
    else:
        if _is_classifier(source):
            raise LmcycleError("task is 'lm' but the teacher is a sequence classifier", file=source, field="teacher")
        if cfg.trim_vocab:
            raise LmcycleError("trim_vocab is for classifiers: an LM's output is its vocabulary",
                               file=ctx.recipe_file, field="trim_vocab")
        teacher, tokenizer = load_model(source, device=ctx.device, dtype=dtype,
                                        attn_implementation=ctx.attn_implementation)
        if getattr(teacher.config, "is_encoder_decoder", False):
            raise LmcycleError("LM distillation supports decoder LMs only (the teacher is an encoder-decoder)",
                               file=source, field="teacher")
    freeze(teacher)

    seed = ctx.seed_for(cfg.train.seed)
    seed_everything(seed)  # a from-scratch student's init and a projection's are part of the run
    try:
        student, copied = build_student(teacher, cfg.student_layers, cfg.student_config)
        student.float()  # copied layers come in the teacher's dtype; the student trains in float32
        n_student_layers, n_teacher_layers = num_layers_of(student.config), num_layers_of(teacher.config)
        layer_map = cfg.layer_map or default_layer_map(n_student_layers, n_teacher_layers, copied)
        check_layer_map(layer_map, n_student_layers, n_teacher_layers)
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
    eval_path = write_eval(stage.out_dir, report)
    ctx.log(name, kind="eval", **{k: v for k, v in report["metrics"].items() if isinstance(v, (int, float))})
    return {**produced, "eval": eval_path}


def _is_classifier(source: str) -> bool:
    try:
        architectures = json.loads((Path(source) / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError):
        return is_scorer(source)
    return any(a.endswith("ForSequenceClassification") for a in architectures)


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
        stage.tokenizer, remap = trim_student_vocabulary(wrapper.student, tokenizer, texts, encoded, cfg.max_len)
        stage.log(event="trim_vocab", teacher_vocab=len(remap), student_vocab=wrapper.student.config.vocab_size,
                  student_params=param_count(wrapper.student))
    pad = pad_id_of(tokenizer)
    soft = cached_teacher_logits(teacher, encoded, pad, stage.out_dir / "teacher_logits.safetensors",
                                 key=f"{ctx.model_path(cfg.teacher)}|{cfg.max_len}")

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


# -- LM distillation -----------------------------------------------------------------------------------------------


def _run_lm(cfg: DistillStage, ctx: RunContext, stage: TrainingStage, wrapper: Student, teacher: nn.Module,
            layer_map: dict[int, int]):
    tokenizer, tcfg, seed = stage.tokenizer, stage.train, stage.seed
    max_len = min(cfg.max_len, context_window(teacher, tokenizer), context_window(wrapper.student, tokenizer))
    items = lm_items([ex for d in cfg.data for ex in ctx.dataset(d)], tokenizer, cfg.template, max_len)
    if not items:
        raise LmcycleError("no training text for distillation", file=ctx.recipe_file, field="data")
    pad = pad_id_of(tokenizer)

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


def section(run: Run) -> str:
    """The distillation table of report.md's Optimization chapter: teacher → student scores on held-out data
    (the student's share of the teacher's in brackets), layers and parameters."""
    found = [(s, d) for s in run.stages_of("distill") if (d := run.eval_json(s))]
    if not found:
        return ""
    lines = ["### Distillation", "", "Teacher → student on held-out data (the student's share of the teacher's "
             "score in brackets).", "", "| Stage | Student layers | Parameters (student / teacher) | Scores |",
             "|---|---|---:|---|"]
    for stage, data in found:
        m, s = data.get("metrics") or {}, data.get("settings") or {}
        scores = []
        for key, teacher in m.items():
            if key.startswith("teacher.") and key.endswith((".macro_f1", ".perplexity")):
                name = key.removeprefix("teacher.")
                student = m.get(name)
                ratio = f" ({100 * student / teacher:.1f}%)" if is_number(student) and teacher else ""
                scores.append(f"{md(name)}: {fixed(teacher, 2)} → {fixed(student, 2)}{ratio}")
        lines.append(f"| {md(stage)} | {md(str(s.get('student_layers') or s.get('student_config') or '—'))} | "
                     f"{millions(m.get('student_params'))} / {millions(m.get('teacher_params'))} "
                     f"({share(m.get('student_params'), m.get('teacher_params'))}) | {'; '.join(scores) or '—'} |")
    return "\n".join(lines) + "\n"
