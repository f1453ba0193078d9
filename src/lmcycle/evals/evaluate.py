"""Scoring a model's predictions with several metrics at once, and the perplexities an evaluation reports.

:func:`score_predictions` runs each requested metric of :data:`METRICS` on predictions against all of their
references: ROUGE and BLEU (summaries), ``accuracy`` and ``macro_f1`` (a generated label word), ``exact_match``
and ``token_f1`` (SQuAD extractive QA, best gold answer), ``gsm8k_accuracy`` (the final number of a worked
solution). It merges in the scores computed with a second model (:data:`MODEL_SCORES`: toxicity, perplexity,
reference perplexity) and returns the metrics, the settings behind every number, and per-example values.

:func:`reference_perplexity` is the perplexity of each example's ``targets[0]`` given its zero-shot prompt
(decoders: prompt + target with the prompt masked; encoder-decoders: target given prompt);
:func:`completion_perplexity` that of each generated completion given its prompt under a frozen reference model
(a fluency check: a policy that games the reward with gibberish scores high here).
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from lmcycle.artifacts import load_model
from lmcycle.errors import LmcycleError
from lmcycle.evals.bleu import bleu
from lmcycle.evals.classification import accuracy, macro_f1
from lmcycle.evals.gsm8k import gsm8k_accuracy
from lmcycle.evals.perplexity import conditional_perplexity, seq2seq_perplexity
from lmcycle.evals.rouge import rouge
from lmcycle.evals.score import Score
from lmcycle.evals.squad import exact_match, token_f1
from lmcycle.models.load import context_window, is_seq2seq

Metric = Literal["rouge", "bleu", "accuracy", "macro_f1", "exact_match", "token_f1", "gsm8k_accuracy", "toxicity"]

# Each metric's function and the key of its per-example value in predictions.jsonl (None: it has none).
METRICS = {
    "rouge": (rouge, "rougeL"),
    "bleu": (bleu, "bleu"),
    "accuracy": (accuracy, "accuracy"),
    "macro_f1": (macro_f1, None),  # F1 is a property of the whole set, not a mean over examples
    "exact_match": (exact_match, "exact_match"),
    "token_f1": (token_f1, "token_f1"),
    "gsm8k_accuracy": (gsm8k_accuracy, "gsm8k_accuracy"),
}
# Scores computed with a second model (they need more than predictions and references): metric name ->
# {key in the Score's values: key in eval.json's metrics}. The first key is also the Score's per-example value,
# written to predictions.jsonl under the metric's name.
MODEL_SCORES = {
    "toxicity": {"toxicity": "toxicity", "toxic_fraction": "toxic_fraction"},
    "perplexity": {"perplexity": "perplexity"},
    "reference_perplexity": {"perplexity": "reference_perplexity"},
}


def score_predictions(which: list[str], predictions: list[str], references: list[list[str]],
                      model_scores: dict[str, Score]):
    """(metrics, settings per metric, per-example values) for the requested metrics and the scores computed
    with a model (keys of :data:`MODEL_SCORES`: toxicity, perplexity, reference perplexity)."""
    metrics: dict[str, Any] = {}
    settings: dict[str, Any] = {}
    per_example: list[dict[str, Any]] = [{} for _ in predictions]
    for metric in dict.fromkeys(which):  # a metric listed twice is scored once
        if metric in MODEL_SCORES:
            continue
        fn, per_example_key = METRICS[metric]
        score = fn(predictions, references)
        metrics.update(score.values)
        settings[metric] = score.settings
        if per_example_key is None:
            continue
        for row, values in zip(per_example, score.per_example, strict=True):
            row[per_example_key] = values[per_example_key]
    for name in MODEL_SCORES:  # a fixed order, so eval.json's keys do not depend on the order of computing
        if name not in model_scores:
            continue
        score = model_scores[name]
        metrics.update({out: score.values[key] for key, out in MODEL_SCORES[name].items()})
        settings[name] = score.settings
        for row, values in zip(per_example, score.per_example, strict=True):
            row[name] = values[next(iter(MODEL_SCORES[name]))]
    metrics["n"] = len(predictions)
    return metrics, settings, per_example


def reference_perplexity(model, tokenizer, template, examples, seq2seq: bool, window: int, batch_size: int) -> Score:
    """Perplexity of each example's ``targets[0]`` given its zero-shot prompt rendered with ``template``."""
    prompts = [template.render(ex, []) for ex in examples]
    if seq2seq:
        return seq2seq_perplexity(model, tokenizer, prompts, [ex.targets[0] for ex in examples],
                                  batch_size=batch_size, max_len=window)
    # The target as fine-tuning shows it after the prompt (template.render_target: ' ' + target).
    targets = [template.render_target(ex) for ex in examples]
    return conditional_perplexity(model, tokenizer, prompts, targets, batch_size=batch_size, max_len=window)


def completion_perplexity(reference: str, prompts: list[str], completions: list[str], device: str,
                          batch_size: int, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32
                          ) -> Score:
    """Perplexity of each generated completion (as generated, before stripping) given its prompt, under the
    frozen ``reference`` model (loaded in ``dtype``); an empty completion has no value."""
    model, tokenizer = load_model(reference, device=device, attn_implementation=attn_implementation, dtype=dtype)
    window = context_window(model, tokenizer)
    if is_seq2seq(model):
        score = seq2seq_perplexity(model, tokenizer, prompts, completions, batch_size=batch_size, max_len=window)
    elif not any(completions):
        raise LmcycleError("reference_perplexity: every generated completion is empty", field="reference_model")
    else:
        score = conditional_perplexity(model, tokenizer, prompts, completions, batch_size=batch_size, max_len=window)
    score.settings.update({"reference_model": str(reference), "scored": "each generated completion (before "
                           "stripping) given its prompt"})
    return score
