"""report.md: one page that shows what every stage of a run did, rebuilt from the run directory alone.

Inputs (all inside the run directory, so ``lmcycle report RUN_DIR`` can regenerate the page at any time):

- ``config.yaml`` — the resolved recipe (name, description, stages);
- ``metrics.jsonl`` — every logged event: training rows (``step``, ``loss``, ``eval_loss``, ...), eval rows
  (``kind="eval"``) and the runner's ``{"event": "stage_end", "seconds": s}``;
- ``artifacts.json`` — stage name -> ``{key: path}`` in stage order: ``eval`` -> eval.json (with
  ``predictions`` -> predictions.jsonl), ``plot`` -> PNG of an explore stage, ``model`` (and, for LoRA,
  ``adapter``) -> the saved checkpoint of a training stage.

Output: ``report.md`` plus ``plots/*.png`` (matplotlib, Agg; no pyplot global state). The evaluation table puts
every eval stage side by side, so the effect of each stage (prompting, fine-tuning, decoding) is one row apart.
"""

from __future__ import annotations

import io
import json
import os
import re
import time
from pathlib import Path
from typing import Any

import yaml

from lmcycle.atomic import atomic_write_bytes, atomic_write_text

EVAL_COLUMNS = [("rouge1", "ROUGE-1"), ("rouge2", "ROUGE-2"), ("rougeL", "ROUGE-L"), ("rougeLsum", "ROUGE-Lsum"),
                ("bleu", "BLEU"), ("accuracy", "Accuracy"), ("macro_f1", "Macro-F1"), ("exact_match", "EM"),
                ("token_f1", "Token F1"), ("gsm8k_accuracy", "GSM8K acc."), ("toxicity", "Toxicity"),
                ("toxic_fraction", "Toxic share"), ("perplexity", "Perplexity"),
                ("reference_perplexity", "Ref. perplexity")]
# The number that stands for a task in the "by model and dataset" table: the first of these an eval has.
HEADLINE_METRICS = ["rougeL", "macro_f1", "token_f1", "gsm8k_accuracy", "accuracy", "exact_match", "bleu",
                    "toxicity"]
FRACTION_METRICS = {"toxicity", "toxic_fraction"}  # 0-1 scores: three decimals, not two
N_EXAMPLES = 3
EXAMPLE_CHARS = 300


def write_report(run_dir: str | os.PathLike, title: str | None = None,
                 artifacts: dict[str, dict[str, str]] | None = None) -> Path:
    """Build ``run_dir/report.md`` (and ``run_dir/plots/*.png``) from the run directory; return its path."""
    run_dir = Path(run_dir)
    config = _read_yaml(run_dir / "config.yaml")
    rows = _read_jsonl(run_dir / "metrics.jsonl")
    if artifacts is None:
        artifacts = _read_json(run_dir / "artifacts.json") or {}
    from lmcycle.report_alignment import alignment_section, alignment_stages, ppo_sections
    from lmcycle.report_apps import APP_KINDS, apps_section
    from lmcycle.report_optimize import OPTIMIZE_KINDS, optimize_section

    aligned = alignment_stages(config, rows)
    optimized = stages_of_kinds(config, rows, OPTIMIZE_KINDS)
    applied = stages_of_kinds(config, rows, APP_KINDS)
    # Alignment, optimization and application stages write eval.json too; they get their own sections, not rows
    # among the generation evals.
    own_section = {*aligned, *optimized, *applied}
    evals = [e for e in _load_evals(run_dir, artifacts) if e["stage"] not in own_section]

    parts = [_header(run_dir, config, rows, title), _stage_times(rows, config),
             _evaluation(run_dir, evals), _by_model_and_dataset(run_dir, evals),
             _finetuning(run_dir, config, rows, artifacts, evals),
             alignment_section(run_dir, aligned, rows, artifacts), ppo_sections(run_dir, rows),
             optimize_section(run_dir, optimized, rows, artifacts), apps_section(run_dir, applied, artifacts),
             _training(run_dir, rows), _explore(run_dir, artifacts),
             _examples(evals), _settings(evals)]
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(p for p in parts if p).rstrip() + "\n")
    return path


# -- reading the run directory -----------------------------------------------------------------------------

def _read_yaml(path: Path) -> dict:
    if not path.exists():
        return {}
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a killed run
    return [r for r in rows if isinstance(r, dict)]


def resolve(run_dir: Path, recorded: str) -> Path | None:
    """Find a recorded artifact path: as written, relative to the run directory, or (for a run directory that
    was moved or a path recorded relative to another working directory) by its trailing components."""
    p = Path(recorded)
    candidates = [p] if p.is_absolute() else [run_dir / p, p]
    candidates += [run_dir.joinpath(*p.parts[i:]) for i in range(1, len(p.parts))]
    return next((c for c in candidates if c.exists()), None)


def _load_evals(run_dir: Path, artifacts: dict[str, dict[str, str]]) -> list[dict]:
    """One entry per eval stage, in stage order: name, metrics, settings, first predictions."""
    evals = []
    for stage, produced in artifacts.items():
        if "eval" not in produced:
            continue
        eval_path = resolve(run_dir, produced["eval"])
        data = _read_json(eval_path) if eval_path else None
        if not isinstance(data, dict):
            evals.append({"stage": stage, "metrics": {}, "settings": {}, "examples": [], "missing": True})
            continue
        pred_path = resolve(run_dir, produced["predictions"]) if "predictions" in produced else None
        pred_path = pred_path or eval_path.with_name("predictions.jsonl")
        examples = _read_jsonl(pred_path)[:N_EXAMPLES] if pred_path.exists() else []
        evals.append({"stage": stage, "metrics": data.get("metrics", {}), "settings": data.get("settings", {}),
                      "examples": examples, "missing": False})
    return evals


# -- sections ----------------------------------------------------------------------------------------------

def stages_of_kinds(config: dict, rows: list[dict], kinds) -> dict[str, str]:
    """Stage name -> kind of every stage of the run whose type is in ``kinds``, in recipe order."""
    found = {s.get("name") or s.get("type"): s.get("type") for s in config.get("stages") or []
             if s.get("type") in kinds}
    for r in rows:  # a config.yaml without stages still has the runner's stage_end rows
        if r.get("event") == "stage_end" and r.get("type") in kinds:
            found.setdefault(str(r.get("stage")), r["type"])
    return found


def _pending_stages(run_dir: Path, config: dict) -> list[str]:
    """Stages of the recipe, other than reports, that have not produced their artifacts yet."""
    path = run_dir / "artifacts.json"
    done = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    names = [s.get("name") or s.get("type") for s in config.get("stages") or [] if s.get("type") != "report"]
    return [n for n in names if n not in done]


def _header(run_dir: Path, config: dict, rows: list[dict], title: str | None) -> str:
    name = config.get("name") or run_dir.name
    lines = [f"# {title or f'lmcycle run: {name}'}", ""]
    if config.get("description"):
        lines += [str(config["description"]), ""]
    times = [r["time"] for r in rows if isinstance(r.get("time"), int | float)]
    status = ("finished" if (run_dir / "DONE").exists() or not _pending_stages(run_dir, config) else
              "failed: " + (run_dir / "FAILED").read_text(encoding="utf-8").strip()
              if (run_dir / "FAILED").exists() else "not finished when this report was written")
    lines.append(f"- Recipe: **{_md(str(name))}**, run directory `{run_dir.name}` ({status})")
    if times:
        start, end = min(times), max(times)
        lines.append(f"- Ran {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(start))} → "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(end))} "
                     f"({_duration(end - start)})")
    if "seed" in config:
        lines.append(f"- Seed {config['seed']}, device {config.get('device', 'cpu')}")
    return "\n".join(lines) + "\n"


def _stage_times(rows: list[dict], config: dict) -> str:
    ends = [r for r in rows if r.get("event") == "stage_end" and "seconds" in r]
    if not ends:
        return ""
    lines = ["## Stages", "", "| Stage | Type | Wall time |", "|---|---|---:|"]
    for r in ends:
        lines.append(f"| {_md(str(r.get('stage')))} | {_md(str(r.get('type', '')))} | {_duration(r['seconds'])} |")
    total = sum(float(r["seconds"]) for r in ends)
    lines.append(f"| **total** | | **{_duration(total)}** |")
    return "\n".join(lines) + "\n"


def _evaluation(run_dir: Path, evals: list[dict]) -> str:
    if not evals:
        return ""
    present = {k for e in evals for k in e["metrics"]}
    columns = [(key, label) for key, label in EVAL_COLUMNS if key in present]
    header = ["Stage", "Scored", "Shots", "n"] + [label for _, label in columns]
    lines = ["## Evaluation", "",
             "Each row is one eval stage, in recipe order. ROUGE is F1 × 100 (max over references), BLEU is "
             "sacrebleu corpus BLEU, perplexity is of the first reference given the zero-shot prompt; the "
             "exact settings of every number are under *Settings*.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * 3 + "---:|" * (len(header) - 3)]
    for e in evals:
        if e["missing"]:
            lines.append(f"| {_md(e['stage'])} | eval.json missing |" + " |" * (len(header) - 2))
            continue
        m, s = e["metrics"], e["settings"]
        shots, n = s.get("shots"), m.get("n", s.get("n"))
        cells = [_md(e["stage"]), _md(_scored(s, run_dir)), "—" if shots is None else str(shots),
                 "—" if n is None else str(n)]
        cells += [_fraction(m.get(key)) if key in FRACTION_METRICS else _number(m.get(key)) for key, _ in columns]
        lines.append("| " + " | ".join(cells) + " |")
    plot = _eval_bar_chart(run_dir, [e for e in evals if not e["missing"]])
    if plot:
        lines += ["", f"![ROUGE-L and BLEU per eval stage]({plot})"]
    return "\n".join(lines) + "\n"


def _by_model_and_dataset(run_dir: Path, evals: list[dict]) -> str:
    """Rows: the datasets; columns: the models scored on them (in recipe order); cells: each task's headline
    metric, then (a second table) the perplexity of its references. Shown when several models were scored on
    several datasets (e.g. before/after fine-tuning on one task: catastrophic forgetting shows as a drop in the
    other rows, and as a rise in their perplexity even where a small model scores near zero)."""
    scored = [e for e in evals if not e["missing"] and not e["settings"].get("baseline")
              and not e["settings"].get("shots")]
    models = list(dict.fromkeys(_scored(e["settings"], run_dir).removesuffix("/model") for e in scored))
    headline: dict[str, dict[str, str]] = {}
    perplexity: dict[str, dict[str, str]] = {}
    for e in scored:
        model, data = _scored(e["settings"], run_dir).removesuffix("/model"), str(e["settings"].get("data"))
        metric = next((k for k in HEADLINE_METRICS if _is_number(e["metrics"].get(k))), None)
        if metric is not None:
            label = dict(EVAL_COLUMNS)[metric]
            headline.setdefault(f"{data} ({label})", {})[model] = _number(e["metrics"][metric])
        if _is_number(e["metrics"].get("perplexity")):
            perplexity.setdefault(data, {})[model] = _number(e["metrics"]["perplexity"])
    if len(headline) < 2 or len(models) < 2:
        return ""
    header = ["|---|" + "---:|" * len(models)]
    lines = ["## Scores by model and dataset", "",
             "Each dataset's headline metric for every model that was scored on it (zero-shot prompts). After "
             "fine-tuning on one task, a drop in the other rows is catastrophic forgetting.", "",
             "| Dataset (metric) | " + " | ".join(_md(m) for m in models) + " |", *header]
    lines += [f"| {_md(d)} | " + " | ".join(c.get(m, "—") for m in models) + " |" for d, c in headline.items()]
    if len(perplexity) >= 2:
        lines += ["", "Perplexity of each dataset's reference answers given its prompt (lower is better):", "",
                  "| Dataset | " + " | ".join(_md(m) for m in models) + " |", *header]
        lines += [f"| {_md(d)} | " + " | ".join(c.get(m, "—") for m in models) + " |" for d, c in perplexity.items()]
    return "\n".join(lines) + "\n"


def _finetuning(run_dir: Path, config: dict, rows: list[dict], artifacts: dict[str, dict[str, str]],
                evals: list[dict]) -> str:
    """One row per finished sft stage: what trained, what it cost, how big the checkpoint is, how it scored."""
    stages = {s.get("name") or "sft": s for s in config.get("stages") or [] if s.get("type") == "sft"}
    for r in rows:  # a config.yaml without stages still has the runner's stage_end rows
        if r.get("event") == "stage_end" and r.get("type") == "sft":
            stages.setdefault(str(r.get("stage")), {})
    stages = {name: s for name, s in stages.items() if "model" in artifacts.get(name, {})}
    if not stages:
        return ""
    lines = ["## Fine-tuning compared", "",
             "One row per sft stage. Full fine-tuning trains every parameter; LoRA trains low-rank adapters on "
             "a frozen model (QLoRA: on a quantized one); prompt tuning trains virtual input tokens. Wall time "
             "and peak RSS are of the training loop; the checkpoint is what the stage must keep (the adapter for "
             "PEFT, the whole model for full fine-tuning); ROUGE is from the eval stages that scored the stage's "
             "model.", "",
             "| Stage | Method | Trainable params | % of total | Wall time | Peak RSS (+ added by training), MiB | Checkpoint (MB) "
             "| ROUGE-1/2/L |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for name, stage_cfg in stages.items():
        produced = artifacts[name]
        peft = _last_event(rows, name, "peft")
        end = _last_event(rows, name, "train_end")
        model_dir = resolve(run_dir, produced["model"])
        if peft is not None or "adapter" in produced or stage_cfg.get("peft"):
            method = _peft_method(peft, stage_cfg.get("peft") or {}, _last_event(rows, name, "quantize"))
            trainable, percent = (peft or {}).get("trainable_params"), (peft or {}).get("trainable_percent")
            checkpoint = resolve(run_dir, produced["adapter"]) if "adapter" in produced else None
        else:
            method, trainable, percent, checkpoint = "full", _count_params(model_dir), 100.0, model_dir
        size = _dir_bytes(checkpoint)
        scores = ["/".join(_number(e["metrics"].get(k)) for k in ("rouge1", "rouge2", "rougeL"))
                  + f" ({_md(e['stage'])})" for e in evals
                  if not e["missing"] and _is_number(e["metrics"].get("rougeL"))
                  and _same_path(run_dir, e["settings"].get("model"), produced["model"])]
        cells = [_md(name), _md(method), f"{trainable:,}" if _is_number(trainable) else "—",
                 f"{percent:.2f}%" if _is_number(percent) else "—",
                 _duration(end["wall_time"]) if end and _is_number(end.get("wall_time")) else "—",
                 _peak_rss(end),
                 _megabytes(size) if size is not None else "—", "; ".join(scores) or "—"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _peft_method(peft: dict | None, cfg: dict, quantize: dict | None) -> str:
    """``lora r=8``, ``qlora r=8 nf4``, ``prompt_tuning 20 tokens`` from the logged peft event or the config."""
    method = str((peft or {}).get("method") or cfg.get("method") or "lora")
    if method == "prompt_tuning":
        tokens = cfg.get("num_virtual_tokens")
        return method + (f" {tokens} tokens" if tokens is not None else "")
    rank = (peft or {}).get("r", cfg.get("r"))
    method += f" r={rank}" if rank is not None else ""
    if method.startswith("qlora"):
        bits = (quantize or {}).get("bits", cfg.get("bits"))
        method += {4: " nf4", 8: " int8"}.get(bits, "")
    return method


def _peak_rss(end: dict | None) -> str:
    """``peak (+growth)``: the process's peak during training and how much of it training itself added."""
    if not end or not _is_number(end.get("peak_rss_mb")):
        return "—"
    growth = end.get("rss_growth_mb")
    return f"{end['peak_rss_mb']:.0f}" + (f" (+{growth:.0f})" if _is_number(growth) else "")


def _last_event(rows: list[dict], stage: str, event: str) -> dict | None:
    return next((r for r in reversed(rows) if r.get("stage") == stage and r.get("event") == event), None)


def _count_params(model_dir: Path | None) -> int | None:
    """Number of parameters saved in a model folder, from the safetensors headers (no tensor is loaded)."""
    from lmcycle.train.checkpoint import saved_param_count

    files = sorted(model_dir.glob("*.safetensors")) if model_dir and model_dir.is_dir() else []
    return sum(saved_param_count(f) for f in files) if files else None


def _dir_bytes(path: Path | None) -> int | None:
    if path is None:
        return None
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _same_path(run_dir: Path, a: Any, b: Any) -> bool:
    """Whether two recorded paths name the same folder (also when the run directory was moved)."""
    if not a or not b:
        return False
    if str(a) == str(b):
        return True
    found_a, found_b = resolve(run_dir, str(a)), resolve(run_dir, str(b))
    return found_a is not None and found_b is not None and found_a.resolve() == found_b.resolve()


def _megabytes(n_bytes: int) -> str:
    mb = n_bytes / 1e6
    return f"{mb:.1f}" if mb >= 10 else f"{mb:.2f}" if mb >= 0.1 else f"{mb:.3f}"


def _training(run_dir: Path, rows: list[dict]) -> str:
    stages: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("kind") != "eval" and "step" in r and ("loss" in r or "eval_loss" in r):
            stages.setdefault(str(r.get("stage")), []).append(r)
    if not stages:
        return ""
    lines = ["## Training", ""]
    for stage, stage_rows in stages.items():
        # One point per step: a run resumed before this version logged the steps it re-ran twice (last wins).
        train = list({r["step"]: r["loss"] for r in stage_rows if _is_number(r.get("loss"))}.items())
        evals = list({r["step"]: r["eval_loss"] for r in stage_rows if _is_number(r.get("eval_loss"))}.items())
        facts = []
        if train:
            facts.append(f"{len(train)} logged steps, last train loss {train[-1][1]:.4f} at step {train[-1][0]}")
        if evals:
            facts.append(f"last eval loss {evals[-1][1]:.4f} at step {evals[-1][0]}")
        lines += [f"### {_md(stage)}", "", "; ".join(facts) + ".", ""]
        plot = _loss_plot(run_dir, stage, train, evals)
        lines += [f"![loss curves of {_md(stage)}]({plot})", ""]
    return "\n".join(lines)


def _explore(run_dir: Path, artifacts: dict[str, dict[str, str]]) -> str:
    lines = []
    for stage, produced in artifacts.items():
        if "plot" not in produced:
            continue
        path = resolve(run_dir, produced["plot"])
        if path is None:
            continue
        lines += [f"### {_md(stage)}", "", f"![{_md(stage)}]({_relative(path, run_dir)})", ""]
    return "\n".join(["## Decoding explorer", "", *lines]) if lines else ""


def _examples(evals: list[dict]) -> str:
    blocks = []
    for e in evals:
        if not e["examples"]:
            continue
        blocks += [f"### {_md(e['stage'])}", ""]
        if "toxicity" in e["metrics"]:  # completions scored for toxicity are offensive by design: files only
            blocks += ["Not shown: these completions were scored for toxicity and can be offensive; they are in "
                       "the stage's `predictions.jsonl`.", ""]
            continue
        for ex in e["examples"]:
            refs = ex.get("references") or []
            blocks.append(f"- **{_md(str(ex.get('id', '')))}** — prediction: {_excerpt(ex.get('prediction', ''))}")
            if refs:
                blocks.append(f"  <br>reference: {_excerpt(refs[0])}")
        blocks.append("")
    return "\n".join([f"## Example predictions (first {N_EXAMPLES} per eval stage)", "", *blocks]) if blocks else ""


def _settings(evals: list[dict]) -> str:
    blocks: list[str] = []
    shown_rouge: tuple[str, dict] = ("", {})  # the last ROUGE options written out in full
    for e in evals:
        s = e["settings"]
        if not s:
            continue
        blocks += [f"### {_md(e['stage'])}", ""]
        for key in ("model", "baseline", "data", "n", "template", "shots", "shot_pool", "shots_used_mean",
                    "context_window", "prompts_truncated", "seed"):
            if s.get(key) is not None:
                blocks.append(f"- {key}: `{_inline(s[key])}`")
        if s.get("decoding"):
            blocks.append(f"- decoding: `{_inline(s['decoding'])}`")
        rouge = {k: v for k, v in (s.get("rouge") or {}).items() if k != "n"}
        if rouge and rouge == shown_rouge[1]:
            blocks.append(f"- ROUGE: same options as {_md(shown_rouge[0])}")
        elif rouge:
            blocks.append("- ROUGE: " + "; ".join(f"{k}: {_md(_plain(v))}" for k, v in rouge.items()))
            shown_rouge = (e["stage"], rouge)
        bleu = s.get("bleu") or {}
        if bleu.get("signature"):
            blocks.append(f"- BLEU: sacrebleu signature `{bleu['signature']}`; {_md(_plain(bleu.get('multi_ref', '')))}")
        ppl = s.get("perplexity") or {}
        if ppl:
            blocks.append("- Perplexity: " + "; ".join(f"{k}: {_md(_plain(v))}" for k, v in ppl.items()))
        blocks.append("")
    return "\n".join(["## Settings", "", *blocks]) if blocks else ""


# -- plots -------------------------------------------------------------------------------------------------

def _save_png(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    atomic_write_bytes(path, buf.getvalue())


def _eval_bar_chart(run_dir: Path, evals: list[dict]) -> str | None:
    from matplotlib.figure import Figure

    stages = [e["stage"] for e in evals]
    rouge_l = [_float_or_zero(e["metrics"].get("rougeL")) for e in evals]
    bleu = [_float_or_zero(e["metrics"].get("bleu")) for e in evals]
    if not stages:
        return None
    fig = Figure(figsize=(max(5.0, 0.9 * len(stages) + 2), 3.6))
    ax = fig.subplots()
    xs = range(len(stages))
    ax.bar([x - 0.2 for x in xs], rouge_l, width=0.4, label="ROUGE-L")
    ax.bar([x + 0.2 for x in xs], bleu, width=0.4, label="BLEU")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(stages, rotation=30, ha="right")
    ax.set_ylabel("score (× 100)")
    ax.set_title("ROUGE-L and BLEU per eval stage")
    ax.legend()
    _save_png(fig, run_dir / "plots" / "eval_scores.png")
    return "plots/eval_scores.png"


def _loss_plot(run_dir: Path, stage: str, train: list[tuple], evals: list[tuple]) -> str:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.6))
    ax = fig.subplots()
    if train:
        ax.plot([s for s, _ in train], [v for _, v in train], label="train loss", linewidth=1)
    if evals:
        ax.plot([s for s, _ in evals], [v for _, v in evals], "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"{stage}: loss")
    ax.legend()
    name = f"loss_{_filename(stage)}.png"
    _save_png(fig, run_dir / "plots" / name)
    return f"plots/{name}"


# -- formatting --------------------------------------------------------------------------------------------

def _scored(settings: dict, run_dir: Path) -> str:
    """What produced the predictions: the baseline, or the model's folder (relative to the run if inside it)."""
    if settings.get("baseline"):
        return f"baseline: {settings['baseline']}"
    model = settings.get("model")
    if not model:
        return ""
    found = resolve(run_dir, str(model))
    if found is not None:
        try:
            return found.resolve().relative_to(run_dir.resolve()).as_posix()
        except ValueError:
            pass
    return "/".join(Path(str(model)).parts[-2:])


def _fraction(value: Any) -> str:
    return f"{value:.3f}" if _is_number(value) else "—"


def _number(value: Any) -> str:
    return f"{value:.2f}" if _is_number(value) else "—"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value


def _float_or_zero(value: Any) -> float:
    return float(value) if _is_number(value) else 0.0


def _duration(seconds: float) -> str:
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {sec:02d}s" if hours else f"{minutes}m {sec:02d}s"


def _md(text: str) -> str:
    """Text safe inside a Markdown table cell or paragraph (``_`` inside words is not emphasis in GFM)."""
    return re.sub(r"([\\`*|<>\[\]])", r"\\\1", text)


def _plain(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _inline(value: Any) -> str:
    """A value for an inline code span (backticks cannot be escaped there, so they are replaced)."""
    return _plain(value).replace("`", "'").replace("\n", "\\n")


def _excerpt(text: str) -> str:
    text = " ".join(str(text).split())
    if len(text) > EXAMPLE_CHARS:
        text = text[:EXAMPLE_CHARS].rstrip() + " …"
    return _md(text) if text else "*(empty)*"


def _filename(stage: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stage)


def _relative(path: Path, run_dir: Path) -> str:
    try:
        return Path(os.path.relpath(path.resolve(), run_dir.resolve())).as_posix()
    except ValueError:  # another drive on Windows
        return path.resolve().as_posix()
