"""Text classifiers: a wrapper for Hugging Face sequence classifiers, what fine-tuning one needs, a TF-IDF baseline.

- :class:`TextClassifier` wraps any sequence-classification folder: ``probabilities(texts)`` is the softmax over
  its labels (named by ``config.id2label``), ``predict(texts)`` the most probable label. The PPO detox reward is
  one column of it::

      clf = TextClassifier.load(path)
      reward = clf.probabilities(texts)[:, clf.label_index("not_toxic")]

- Fine-tuning: :func:`load_for_training` (a classifier over given labels, with a new head when the base has none
  or other labels), :func:`collate` (right-padded batches), :func:`classification_loss` (summed cross-entropy,
  optionally weighted by :func:`class_weights`, inverse class frequency). Class ids are the sorted class names
  (:func:`class_names`: ``not_toxic`` = 0, ``toxic`` = 1).
- :func:`fit_tfidf_baseline`: TF-IDF + logistic regression fitted on the same texts, to put a fine-tuned
  classifier's scores in perspective (scikit-learn, optional).

The texts these models see may be offensive: nothing here logs or saves a text.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmcycle.data.batching import pad_id_of, pad_rows
from lmcycle.errors import LmcycleError
from lmcycle.models.device import check_attn_implementation, hf_attn_implementation, resolve_device
from lmcycle.models.load import ensure_pad_token, eval_mode
from lmcycle.optimize.quantize import is_quantized_dir, load_quantized
from lmcycle.train.loop import Batch

# -- the classifier ------------------------------------------------------------------------------------------------


@dataclass
class TextClassifier:
    """A sequence classifier, its tokenizer and its label names (index = class id)."""

    model: Any
    tokenizer: Any
    labels: list[str]
    path: str = ""

    @classmethod
    def load(cls, path_or_name: str | os.PathLike, device: str | torch.device = "auto",
             attn_implementation: str = "sdpa") -> TextClassifier:
        """Load a saved sequence-classification model (a folder or hub id) on ``device`` (``auto``: CUDA when
        present, else CPU); labels from ``config.id2label``.

        A folder of a bare encoder (no classification head, e.g. the sentence-embedding MiniLM) is refused:
        its head would be random.
        """
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        source = str(path_or_name)
        device = resolve_device(device)
        check_attn_implementation(attn_implementation, device)
        if is_quantized_dir(source):
            model, tokenizer = load_quantized(source, device=device, attn_implementation=attn_implementation)
            ensure_pad_token(tokenizer, model)
            labels = [str(model.config.id2label[i]) for i in range(model.config.num_labels)]
            return cls(model=model, tokenizer=tokenizer, labels=labels, path=source)
        try:
            config = AutoConfig.from_pretrained(source)
            architectures = config.architectures or []
            if not any(a.endswith("ForSequenceClassification") for a in architectures):
                raise LmcycleError(f"not a sequence classifier (architectures: {', '.join(architectures) or 'none'});"
                                   " train one with a 'classifier' stage", file=source)
            model = AutoModelForSequenceClassification.from_pretrained(
                source, dtype=torch.float32, attn_implementation=hf_attn_implementation(attn_implementation))
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
                batch = collate([encoded[i] for i in rows], pad_id_of(self.tokenizer))
                logits = self.model(**{k: v.to(device) for k, v in batch.items()}).logits
                out[rows] = torch.softmax(logits.float(), dim=-1).cpu()
        return out

    def predict(self, texts: Sequence[str], batch_size: int = 64, max_len: int = 128) -> list[str]:
        """The most probable label of each text."""
        probs = self.probabilities(texts, batch_size=batch_size, max_len=max_len)
        return [self.labels[i] for i in probs.argmax(dim=-1).tolist()]


def collate(rows: list[list[int]], pad_id: int, labels: list[int] | None = None) -> Batch:
    """Right-padded ``input_ids`` [B, T] and ``attention_mask`` [B, T] (+ ``labels`` [B] when given)."""
    ids, mask = pad_rows(rows, pad_id)
    batch = {"input_ids": ids, "attention_mask": mask}
    if labels is not None:
        batch["labels"] = torch.tensor(labels, dtype=torch.long)
    return batch


# -- fine-tuning ---------------------------------------------------------------------------------------------------


def class_names(label_map: dict[str, str]) -> list[str]:
    """The classes (index = class id): the distinct names of ``label_map``, sorted."""
    return sorted(set(label_map.values()))


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


def load_for_training(source: str, labels: list[str], device: str | torch.device = "auto",
                      attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)``: a sequence classifier over ``labels`` from ``source``, on ``device`` (``auto``: CUDA
    when present), held in ``dtype``; a new (random) head when the source has none or has other labels."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    device = resolve_device(device)
    check_attn_implementation(attn_implementation, device)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            source, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)}, ignore_mismatched_sizes=True, dtype=dtype,
            attn_implementation=hf_attn_implementation(attn_implementation))
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LmcycleError(f"cannot load a classifier base: {first_line}", file=source, field="model") from None
    ensure_pad_token(tokenizer, model)
    return model.to(device), tokenizer


# -- the TF-IDF baseline -------------------------------------------------------------------------------------------


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
