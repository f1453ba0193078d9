"""Transitional: the eval stage still lives in lmcycle.evals.evaluate (moved here by issue 15)."""

from lmcycle.evals.evaluate import EvalStage, run_eval  # noqa: F401
from lmcycle.report.markdown import figure, fraction, is_number, md, number, row, save_png
from lmcycle.report.rundir import Eval, Run

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
