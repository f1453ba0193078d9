"""EvalStage: build prompts, generate, score against every reference, and keep every per-example output.

For each example of ``data`` (the first ``limit``): the prompt is the template with ``shots`` solved examples
(drawn from ``shot_pool``, never the query itself) that fits the model's context window with room for
``decoding.max_new_tokens``; the model continues it; the continuation, stripped of surrounding whitespace, is
scored with the requested ``metrics`` against all of the example's targets
(:func:`lmcycle.evals.evaluate.score_predictions`): ROUGE and BLEU (summaries), ``accuracy`` and ``macro_f1`` (a
generated label word), ``exact_match`` and ``token_f1`` (SQuAD extractive QA, best gold answer),
``gsm8k_accuracy`` (the final number of a worked solution). Perplexity is of ``targets[0]`` given the zero-shot
prompt (decoders: prompt + target with the prompt masked; encoder-decoders: target given prompt).
With ``baseline: extractive`` no model is loaded: the prediction is the three longest utterances.

For detoxification: ``toxicity`` scores the predictions with the classifier ``toxicity_classifier`` (mean
probability of its ``toxic`` label, :func:`lmcycle.evals.toxicity.toxicity_score`), and ``reference_model`` adds
``reference_perplexity``: the perplexity of each generated completion given its prompt under that frozen model
(a fluency check: a policy that games the reward with gibberish scores high here).

Outputs in the stage directory: ``predictions.jsonl`` (id, prompt, prediction, references, per-example scores)
and ``eval.json`` (``metrics`` and the ``settings`` that produced every number).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from lmcycle.artifacts import load_model
from lmcycle.atomic import atomic_write_text
from lmcycle.config import DatasetName, ModelRef
from lmcycle.data.fewshot import build_prompt
from lmcycle.data.templates import get_template
from lmcycle.errors import LmcycleError
from lmcycle.evals.baselines import extractive_baseline
from lmcycle.evals.evaluate import Metric, completion_perplexity, reference_perplexity, score_predictions
from lmcycle.evals.score import Score
from lmcycle.evals.toxicity import toxicity_score
from lmcycle.models.classifier import TextClassifier
from lmcycle.models.generate import DecodingConfig, generate
from lmcycle.models.load import context_window, is_seq2seq
from lmcycle.report.markdown import figure, fraction, is_number, md, number, row, save_png
from lmcycle.report.rundir import Eval, Run
from lmcycle.stages.common import ModelStage, model_dtype, write_eval
from lmcycle.stages.context import RunContext


class EvalStage(ModelStage):
    """Score a model (or a baseline) on a dataset with the chosen metrics and perplexity."""

    type: Literal["eval"] = "eval"
    model: ModelRef | None = None  # None/"latest" = the newest model of an earlier stage
    data: DatasetName
    limit: int | None = Field(default=None, ge=1)
    template: str | dict = "summarize"
    shots: int = Field(default=0, ge=0)
    shot_pool: DatasetName | None = None  # dataset to draw shots from; default: `data` (never the query itself)
    decoding: DecodingConfig = Field(default_factory=lambda: DecodingConfig(max_new_tokens=64, stop=["\n\n"]))
    metrics: list[Metric] = ["rouge", "bleu"]
    perplexity: bool = True
    baseline: Literal["extractive"] | None = None
    toxicity_classifier: ModelRef | None = Field(None, validate_default=True,
                                                 description="classifier stage name or path (metric 'toxicity')")
    reference_model: ModelRef | None = Field(None, description="frozen model for reference_perplexity of completions")

    @field_validator("toxicity_classifier")
    @classmethod
    def _classifier_for_toxicity(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None and "toxicity" in (info.data.get("metrics") or []):
            raise ValueError("metric 'toxicity' needs a classifier: set it to a classifier stage's name or a path")
        return value

    @field_validator("reference_model")
    @classmethod
    def _reference_needs_a_model(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and info.data.get("baseline") is not None:
            raise ValueError("reference_perplexity scores a model's completions given its prompts; a baseline "
                             "has no prompts")
        return value


@dataclass
class _Outputs:
    """What a model (or a baseline) produced for the examples, before scoring."""

    prompts: list[str | None]
    predictions: list[str]
    model_scores: dict[str, Score] = field(default_factory=dict)  # keys of evals.evaluate.MODEL_SCORES
    settings: dict[str, Any] = field(default_factory=dict)


def run_eval(cfg: EvalStage, ctx: RunContext) -> dict[str, str]:
    """Run the evaluation; write predictions.jsonl and eval.json; return their paths."""
    name = cfg.stage_name
    examples = _examples(ctx, cfg)
    references = [list(ex.targets) for ex in examples]
    out = _run_baseline(examples) if cfg.baseline is not None else _run_model(cfg, ctx, examples)
    if "toxicity" in cfg.metrics:
        classifier = TextClassifier.load(ctx.model_path(cfg.toxicity_classifier), device=ctx.device,
                                         attn_implementation=ctx.attn_implementation)
        out.model_scores["toxicity"] = toxicity_score(classifier, out.predictions)
    metrics, settings, per_example = score_predictions(cfg.metrics, out.predictions, references, out.model_scores)

    # A baseline uses no prompt, so model, template, shots and decoding do not apply to it.
    settings.update({
        "model": None,
        "baseline": cfg.baseline,
        "data": cfg.data,
        "limit": cfg.limit,
        "n": len(examples),
        "template": None if cfg.baseline else cfg.template if isinstance(cfg.template, str) else "custom",
        "shots": None if cfg.baseline else cfg.shots,
        "shot_pool": cfg.shot_pool or (cfg.data if cfg.shots and not cfg.baseline else None),
        "decoding": None if cfg.baseline else cfg.decoding.model_dump(mode="json"),
        **out.settings,
    })

    stage_dir = ctx.stage_dir(name)
    pred_path = stage_dir / "predictions.jsonl"
    lines = [json.dumps({"id": ex.id, "prompt": prompt, "prediction": pred, "references": refs, **row},
                        ensure_ascii=False)
             for ex, prompt, pred, refs, row in zip(examples, out.prompts, out.predictions, references, per_example,
                                                    strict=True)]
    atomic_write_text(pred_path, "\n".join(lines) + "\n")
    eval_path = write_eval(stage_dir, {"metrics": metrics, "settings": settings})
    ctx.log(name, kind="eval", **metrics)
    return {"eval": eval_path, "predictions": str(pred_path)}


def _examples(ctx: RunContext, cfg: EvalStage) -> list:
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


def _run_baseline(examples: list) -> _Outputs:
    return _Outputs(prompts=[None] * len(examples), predictions=[extractive_baseline(ex.input) for ex in examples],
                    settings={"prediction_rule": "the three longest utterances, in dialogue order "
                                                 "(lmcycle.evals.baselines.extractive_baseline)"})


def _run_model(cfg: EvalStage, ctx: RunContext, examples: list) -> _Outputs:
    template = get_template(cfg.template)
    model_path = ctx.model_path(cfg.model)
    dtype = model_dtype(cfg, ctx)
    model, tokenizer = load_model(model_path, device=ctx.device, dtype=dtype,
                                  attn_implementation=ctx.attn_implementation)
    seq2seq = is_seq2seq(model)
    window = context_window(model, tokenizer)
    # A decoder's answer shares the context window with the prompt; an encoder-decoder's does not.
    reserve = 0 if seq2seq else cfg.decoding.max_new_tokens
    # Shots come from the whole pool dataset (not only the first `limit`); the builder never picks the query.
    pool = list(ctx.dataset(cfg.shot_pool or cfg.data))
    built = [build_prompt(template, ex, pool, cfg.shots, tokenizer, window, reserve, ctx.seed, query_index=i)
             for i, ex in enumerate(examples)]
    prompts = [b.text for b in built]
    raw = generate(model, tokenizer, prompts, cfg.decoding, progress=True)
    scores = {}
    if cfg.perplexity:
        scores["perplexity"] = reference_perplexity(model, tokenizer, template, examples, seq2seq, window,
                                                    cfg.decoding.batch_size)
    if cfg.reference_model is not None:
        scores["reference_perplexity"] = completion_perplexity(ctx.model_path(cfg.reference_model), prompts, raw,
                                                               ctx.device, cfg.decoding.batch_size,
                                                               ctx.attn_implementation, dtype=dtype)
    settings = {
        "model": str(model_path),
        "template_fields": template.model_dump(),
        "context_window": window,
        "shots_used_mean": sum(b.shots_used for b in built) / len(built),
        "prompts_truncated": sum(b.truncated for b in built),
        "prompt_tokens_mean": sum(b.n_tokens for b in built) / len(built),
        "seed": ctx.seed,
        "prediction_postprocess": "generated text cut at the first stop string, then stripped of whitespace",
        # Only when set: 16-bit weights change the scores a little, and float32 runs record what they always did.
        **({"model_dtype": cfg.model_dtype} if cfg.model_dtype != "float32" else {}),
    }
    return _Outputs(prompts, [text.strip() for text in raw], scores, settings)


EVAL_COLUMNS = [("rouge1", "ROUGE-1"), ("rouge2", "ROUGE-2"), ("rougeL", "ROUGE-L"), ("rougeLsum", "ROUGE-Lsum"),
                ("bleu", "BLEU"), ("accuracy", "Accuracy"), ("macro_f1", "Macro-F1"), ("exact_match", "EM"),
                ("token_f1", "Token F1"), ("gsm8k_accuracy", "GSM8K acc."), ("toxicity", "Toxicity"),
                ("toxic_fraction", "Toxic share"), ("perplexity", "Perplexity"),
                ("reference_perplexity", "Ref. perplexity")]
# The number that stands for a task in the "by model and dataset" table: the first of these an eval has.
HEADLINE_METRICS = ["rougeL", "macro_f1", "token_f1", "gsm8k_accuracy", "accuracy", "exact_match", "bleu",
                    "toxicity"]
FRACTION_METRICS = {"toxicity", "toxic_fraction"}  # 0-1 scores: three decimals, not two


def section(run: Run) -> str:
    """The evaluation table of report.md: every eval stage side by side, so the effect of each stage (prompting,
    fine-tuning, decoding) is one row apart, with a bar chart; then, when several models were scored on several
    datasets, their scores by model and dataset."""
    evals = run.generation_evals()
    return "\n".join(p for p in (_evaluation(run, evals), _by_model_and_dataset(run, evals)) if p)


def _evaluation(run: Run, evals: list[Eval]) -> str:
    if not evals:
        return ""
    present = {k for e in evals for k in e.metrics}
    columns = [(key, label) for key, label in EVAL_COLUMNS if key in present]
    header = ["Stage", "Scored", "Shots", "n"] + [label for _, label in columns]
    lines = ["## Evaluation", "",
             "Each row is one eval stage, in recipe order. ROUGE is F1 × 100 (max over references), BLEU is "
             "sacrebleu corpus BLEU, perplexity is of the first reference given the zero-shot prompt; the "
             "exact settings of every number are under *Settings*.", "",
             row(header), "|" + "---|" * 3 + "---:|" * (len(header) - 3)]
    for e in evals:
        if e.missing:
            lines.append(f"| {md(e.stage)} | eval.json missing |" + " |" * (len(header) - 2))
            continue
        m, s = e.metrics, e.settings
        shots, n = s.get("shots"), m.get("n", s.get("n"))
        cells = [md(e.stage), md(_scored(run, s)), "—" if shots is None else str(shots),
                 "—" if n is None else str(n)]
        cells += [fraction(m.get(key)) if key in FRACTION_METRICS else number(m.get(key)) for key, _ in columns]
        lines.append(row(cells))
    plot = _eval_bar_chart(run, [e for e in evals if not e.missing])
    if plot:
        lines += ["", f"![ROUGE-L and BLEU per eval stage]({plot})"]
    return "\n".join(lines) + "\n"


def _by_model_and_dataset(run: Run, evals: list[Eval]) -> str:
    """Rows: the datasets; columns: the models scored on them (in recipe order); cells: each task's headline
    metric, then (a second table) the perplexity of its references. Shown when several models were scored on
    several datasets (e.g. before/after fine-tuning on one task: catastrophic forgetting shows as a drop in the
    other rows, and as a rise in their perplexity even where a small model scores near zero)."""
    scored = [e for e in evals if not e.missing and not e.settings.get("baseline") and not e.settings.get("shots")]
    models = list(dict.fromkeys(_scored(run, e.settings).removesuffix("/model") for e in scored))
    headline: dict[str, dict[str, str]] = {}
    perplexity: dict[str, dict[str, str]] = {}
    for e in scored:
        model, data = _scored(run, e.settings).removesuffix("/model"), str(e.settings.get("data"))
        metric = next((k for k in HEADLINE_METRICS if is_number(e.metrics.get(k))), None)
        if metric is not None:
            label = dict(EVAL_COLUMNS)[metric]
            headline.setdefault(f"{data} ({label})", {})[model] = number(e.metrics[metric])
        if is_number(e.metrics.get("perplexity")):
            perplexity.setdefault(data, {})[model] = number(e.metrics["perplexity"])
    if len(headline) < 2 or len(models) < 2:
        return ""
    rule = ["|---|" + "---:|" * len(models)]
    lines = ["## Scores by model and dataset", "",
             "Each dataset's headline metric for every model that was scored on it (zero-shot prompts). After "
             "fine-tuning on one task, a drop in the other rows is catastrophic forgetting.", "",
             row(["Dataset (metric)", *(md(m) for m in models)]), *rule]
    lines += [row([md(d), *(c.get(m, "—") for m in models)]) for d, c in headline.items()]
    if len(perplexity) >= 2:
        lines += ["", "Perplexity of each dataset's reference answers given its prompt (lower is better):", "",
                  row(["Dataset", *(md(m) for m in models)]), *rule]
        lines += [row([md(d), *(c.get(m, "—") for m in models)]) for d, c in perplexity.items()]
    return "\n".join(lines) + "\n"


def _scored(run: Run, settings: dict) -> str:
    """What produced the predictions: the baseline, or the model's folder (relative to the run if inside it)."""
    if settings.get("baseline"):
        return f"baseline: {settings['baseline']}"
    model = settings.get("model")
    return run.short_path(str(model)) if model else ""


def _eval_bar_chart(run: Run, evals: list[Eval]) -> str | None:
    if not evals:
        return None
    stages = [e.stage for e in evals]
    fig = figure(max(5.0, 0.9 * len(stages) + 2), 3.6)
    ax = fig.subplots()
    xs = range(len(stages))
    ax.bar([x - 0.2 for x in xs], [_or_zero(e.metrics.get("rougeL")) for e in evals], width=0.4, label="ROUGE-L")
    ax.bar([x + 0.2 for x in xs], [_or_zero(e.metrics.get("bleu")) for e in evals], width=0.4, label="BLEU")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(stages, rotation=30, ha="right")
    ax.set_ylabel("score (× 100)")
    ax.set_title("ROUGE-L and BLEU per eval stage")
    ax.legend()
    save_png(fig, run.dir / "plots" / "eval_scores.png")
    return "plots/eval_scores.png"


def _or_zero(value) -> float:
    return float(value) if is_number(value) else 0.0
