"""EvalStage: build prompts, generate, score against every reference, and keep every per-example output.

For each example of ``data`` (the first ``limit``): the prompt is the template with ``shots`` solved examples
(drawn from ``shot_pool``, never the query itself) that fits the model's context window with room for
``decoding.max_new_tokens``; the model continues it; the continuation, stripped of surrounding whitespace, is
scored with ROUGE and BLEU against all of the example's targets. Perplexity is of ``targets[0]`` given the
zero-shot prompt (decoders: prompt + target with the prompt masked; encoder-decoders: target given prompt).
With ``baseline: extractive`` no model is loaded: the prediction is the three longest utterances.

Outputs in the stage directory: ``predictions.jsonl`` (id, prompt, prediction, references, per-example scores)
and ``eval.json`` (``metrics`` and the ``settings`` that produced every number).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import Field

from lmcycle.atomic import atomic_write_json, atomic_write_text
from lmcycle.config import Config
from lmcycle.data.fewshot import build_prompt
from lmcycle.data.templates import get_template
from lmcycle.errors import LmcycleError
from lmcycle.evals.baselines import extractive_baseline
from lmcycle.evals.bleu import bleu
from lmcycle.evals.perplexity import conditional_perplexity, seq2seq_perplexity
from lmcycle.evals.rouge import rouge
from lmcycle.models.generate import DecodingConfig, generate
from lmcycle.models.load import context_window, is_seq2seq, load_model


class EvalStage(Config):
    """Score a model (or a baseline) on a dataset with ROUGE, BLEU and perplexity."""

    type: Literal["eval"] = "eval"
    name: str | None = None
    model: str | None = None  # None/"latest" = the newest model of an earlier stage
    data: str
    limit: int | None = Field(default=None, ge=1)
    template: str | dict = "summarize"
    shots: int = Field(default=0, ge=0)
    shot_pool: str | None = None  # dataset to draw shots from; default: `data` (never the query itself)
    decoding: DecodingConfig = Field(default_factory=lambda: DecodingConfig(max_new_tokens=64, stop=["\n\n"]))
    metrics: list[Literal["rouge", "bleu"]] = ["rouge", "bleu"]
    perplexity: bool = True
    baseline: Literal["extractive"] | None = None


def run_eval(cfg: EvalStage, ctx) -> dict[str, str]:
    """Run the evaluation; write predictions.jsonl and eval.json; return their paths."""
    name = cfg.name or "eval"
    examples = _examples(ctx, cfg)
    references = [list(ex.targets) for ex in examples]

    if cfg.baseline is not None:
        prompts, predictions, ppl, model_path, extra = _run_baseline(cfg, examples)
    else:
        prompts, predictions, ppl, model_path, extra = _run_model(cfg, ctx, examples)

    metrics: dict[str, Any] = {}
    settings: dict[str, Any] = {}
    per_example: list[dict[str, float]] = [{} for _ in examples]
    if "rouge" in cfg.metrics:
        score = rouge(predictions, references)
        metrics.update(score.values)
        settings["rouge"] = score.settings
        for row, values in zip(per_example, score.per_example, strict=True):
            row["rougeL"] = values["rougeL"]
    if "bleu" in cfg.metrics:
        score = bleu(predictions, references)
        metrics.update(score.values)
        settings["bleu"] = score.settings
        for row, values in zip(per_example, score.per_example, strict=True):
            row["bleu"] = values["bleu"]
    if ppl is not None:
        metrics["perplexity"] = ppl.values["perplexity"]
        settings["perplexity"] = ppl.settings
        for row, values in zip(per_example, ppl.per_example, strict=True):
            row["perplexity"] = values["perplexity"]
    metrics["n"] = len(examples)

    settings.update({
        "model": model_path,
        "baseline": cfg.baseline,
        "data": cfg.data,
        "limit": cfg.limit,
        "n": len(examples),
        "template": cfg.template if isinstance(cfg.template, str) else "custom",
        "template_fields": extra.get("template_fields"),
        "shots": cfg.shots,
        "shot_pool": cfg.shot_pool or (cfg.data if cfg.shots else None),
        "decoding": cfg.decoding.model_dump(mode="json") if cfg.baseline is None else None,
        "prediction_postprocess": "generated text cut at the first stop string, then stripped of whitespace",
        **{k: v for k, v in extra.items() if k != "template_fields"},
    })

    out_dir = ctx.stage_dir(name)
    pred_path, eval_path = out_dir / "predictions.jsonl", out_dir / "eval.json"
    lines = [json.dumps({"id": ex.id, "prompt": prompt, "prediction": pred, "references": refs, **row},
                        ensure_ascii=False)
             for ex, prompt, pred, refs, row in zip(examples, prompts, predictions, references, per_example,
                                                    strict=True)]
    atomic_write_text(pred_path, "\n".join(lines) + "\n")
    atomic_write_json(eval_path, {"metrics": metrics, "settings": settings})
    ctx.log(name, kind="eval", **metrics)
    return {"eval": str(eval_path), "predictions": str(pred_path)}


def _examples(ctx, cfg: EvalStage) -> list:
    examples = list(ctx.dataset(cfg.data))
    if cfg.limit is not None:
        examples = examples[: cfg.limit]
    if not examples:
        raise LmcycleError(f"dataset '{cfg.data}' has no examples to evaluate", file=ctx.recipe_file, field="data")
    for ex in examples:
        if not ex.targets:
            raise LmcycleError(f"example '{ex.id}' of dataset '{cfg.data}' has no reference target",
                               file=ctx.recipe_file, field="data")
    return examples


def _run_baseline(cfg: EvalStage, examples: list):
    predictions = [extractive_baseline(ex.input) for ex in examples]
    return [None] * len(examples), predictions, None, None, {"prediction_rule": "three longest utterances "
                                                                                 "(lmcycle.evals.baselines)"}


def _run_model(cfg: EvalStage, ctx, examples: list):
    template = get_template(cfg.template)
    model_path = ctx.model_path(cfg.model)
    model, tokenizer = load_model(model_path, device=ctx.device)
    seq2seq = is_seq2seq(model)
    window = context_window(model, tokenizer)
    # A decoder's answer shares the context window with the prompt; an encoder-decoder's does not.
    reserve = 0 if seq2seq else cfg.decoding.max_new_tokens
    pool = list(ctx.dataset(cfg.shot_pool)) if cfg.shot_pool else _shot_pool(ctx, cfg)
    built = [build_prompt(template, ex, pool, cfg.shots, tokenizer, window, reserve, ctx.seed, query_index=i)
             for i, ex in enumerate(examples)]
    prompts = [b.text for b in built]
    raw = generate(model, tokenizer, prompts, cfg.decoding, progress=True)
    predictions = [text.strip() for text in raw]

    ppl = None
    if cfg.perplexity:
        ppl = _reference_perplexity(model, tokenizer, template, examples, seq2seq, window, cfg.decoding.batch_size)
    extra = {
        "template_fields": template.model_dump(),
        "context_window": window,
        "shots_used_mean": sum(b.shots_used for b in built) / len(built),
        "prompts_truncated": sum(b.truncated for b in built),
        "prompt_tokens_mean": sum(b.n_tokens for b in built) / len(built),
        "seed": ctx.seed,
    }
    return prompts, predictions, ppl, str(model_path), extra


def _shot_pool(ctx, cfg: EvalStage) -> list:
    """Shots come from the whole evaluated dataset (not only the first ``limit``); the builder skips the query."""
    return list(ctx.dataset(cfg.data))


def _reference_perplexity(model, tokenizer, template, examples, seq2seq: bool, window: int, batch_size: int):
    prompts = [template.render(ex, []) for ex in examples]
    if seq2seq:
        return seq2seq_perplexity(model, tokenizer, prompts, [ex.targets[0] for ex in examples],
                                  batch_size=batch_size, max_len=window)
    # The target as fine-tuning shows it after the prompt (template.render_target: ' ' + target).
    targets = [template.render_target(ex) for ex in examples]
    return conditional_perplexity(model, tokenizer, prompts, targets, batch_size=batch_size, max_len=window)
