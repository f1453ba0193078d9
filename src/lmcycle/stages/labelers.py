"""LabelersStage: simulated labelers rank a completions stage's items through the labeling app, as people would.

The human step of the closed loop (generate → rank → agree → reward model → RL → regenerate) without people:
a fresh label database in ``<stage>/labels.sqlite`` gets the completions stage's items, an account per
labeler and guidelines that state the preference rule; the labeling app (:mod:`lmcycle.feedback.web`) is
served on a loopback port and every labeler (:mod:`lmcycle.feedback.simulate`: the oracle through noise of
its own, or at random) labels through its JSON API at once, one thread each. The first ``gold`` items are gold
items ranked by the noise-free oracle, so each labeler's accuracy is measured as a project's would be.

The same database holds project ``oracle``: every item ranked by the noise-free oracle, written through the
store, so that a reward model can be scored against the true preference rather than the labelers' noisy one.

Writes ``<stage>/rankings.jsonl`` (the export that ``data: {format: rankings, stage: <this stage>}`` reads)
and ``<stage>/eval.json``: the agreement report (:func:`lmcycle.feedback.agreement.agreement_report`), the
project's stats, and per labeler its rule, labels and submission latency. Simulated labelers submit at once,
so the project's too-fast threshold is 0 here.
"""

from __future__ import annotations

import importlib.util
import random
import secrets
import statistics
from dataclasses import replace
from typing import Literal

from pydantic import Field, field_validator

from lmcycle.config import Config, StageName
from lmcycle.errors import LmcycleError
from lmcycle.feedback import simulate
from lmcycle.feedback.agreement import agreement_plot, agreement_report
from lmcycle.feedback.export import rankings_from_snapshot, write_export
from lmcycle.feedback.items import read_completions
from lmcycle.feedback.labels import Label
from lmcycle.feedback.stats import project_stats
from lmcycle.feedback.store import LabelStore
from lmcycle.report.markdown import fraction, md
from lmcycle.report.rundir import Run
from lmcycle.stages.common import StageConfig, write_eval
from lmcycle.stages.context import RunContext

LABEL_EXTRA = ("fastapi", "uvicorn", "jinja2", "argon2", "krippendorff")
ORACLE = "oracle"
GUIDELINES = """# Ranking summaries

Rank the summaries of each dialogue from best to worst. A better summary says what the reference summary
says: who did what, in the dialogue's own words. Put summaries that are equally good in the same place (a tie).
Mark an item **not rankable** when every summary is as good as the others.
"""


class SimulatedLabelerConfig(Config):
    """One simulated labeler: the oracle seen through Gaussian ``noise``, or ``random`` rankings."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
    noise: float = Field(0.0, ge=0.0, description="standard deviation added to each oracle score (ROUGE-L F1)")
    random: bool = Field(False, description="rank uniformly at random, whatever the completions say")


class LabelersStage(StageConfig):
    """Simulated labelers label a completions stage's items through the labeling app's HTTP API."""

    type: Literal["labelers"] = "labelers"
    completions: StageName = Field(description="the completions stage whose items are labelled")
    labelers: list[SimulatedLabelerConfig] = Field(min_length=2, description="at least 2, so agreement exists")
    overlap: int | None = Field(None, ge=2, description="labelers per item (default: all of them)")
    gold: int = Field(0, ge=0, description="the first N items become gold items, ranked by the noise-free oracle")
    tie_tolerance: float = Field(0.02, ge=0.0, description="perceived scores this close are tied")
    seed: int | None = None

    @field_validator("type")
    @classmethod
    def _label_extra(cls, value: str) -> str:
        # found when the recipe loads, not after the stages before this one ran
        missing = [m for m in LABEL_EXTRA if importlib.util.find_spec(m) is None]
        if missing:
            raise ValueError(f"the labelers stage serves the labeling app, which needs {', '.join(missing)}: "
                             "pip install 'lmcycle[label]'")
        return value

    @field_validator("labelers")
    @classmethod
    def _unique_names(cls, labelers: list[SimulatedLabelerConfig]) -> list[SimulatedLabelerConfig]:
        names = [lab.name for lab in labelers]
        if len(set(names)) < len(names):
            raise ValueError(f"labeler names must be unique, got {names}")
        return labelers


def run_labelers(cfg: LabelersStage, ctx: RunContext) -> dict[str, str]:
    """Label the items through the app; write the export and the agreement report; return ``{"labels",
    "rankings", "eval"}``."""
    name = cfg.stage_name
    out_dir = ctx.stage_dir(name)
    seed = ctx.seed_for(cfg.seed)
    items = read_completions(ctx.artifact(cfg.completions, "completions"))
    references = {}
    for item in items:
        if not isinstance(item.meta.get("reference"), str):
            raise LmcycleError(f"item '{item.prompt_id}' has no reference for the oracle (its dataset has no "
                               "targets)", file=ctx.recipe_file, field=f"stages.{name}.completions")
        references[item.prompt_id] = item.meta["reference"]
    labelers = [simulate.SimulatedLabeler(lab.name, secrets.token_urlsafe(16), lab.noise, lab.random, cfg.tie_tolerance,
                                 seed) for lab in cfg.labelers]
    items = _with_gold(items, cfg.gold, references, cfg.tie_tolerance)

    db_path = out_dir / "labels.sqlite"
    for stale in out_dir.glob("labels.sqlite*"):  # an interrupted attempt's half-labelled project starts over
        stale.unlink()
    from lmcycle.feedback.web import create_app  # lazy: FastAPI is the label extra (checked at recipe load)

    with LabelStore.init(str(db_path)) as store:
        store.create_project(overlap=cfg.overlap or len(labelers), too_fast_s=0.0, guidelines=GUIDELINES)
        for lab in labelers:
            store.add_user(lab.name, "labeler", lab.password)
        store.add_items(items)
        with simulate.serving(create_app(store)) as url:
            runs = simulate.run_labelers(url, labelers, references)
        snap = store.snapshot()
        oracle_labels = _oracle_project(store, items, references, cfg.tie_tolerance)
    rankings, gold = rankings_from_snapshot(snap)
    report = agreement_report(rankings, gold)
    rankings_path = out_dir / "rankings.jsonl"
    write_export(snap, rankings_path)
    rows = []
    for lab, run in zip(cfg.labelers, runs, strict=True):
        lat = sorted(run.latencies_s)
        rows.append({"labeler": lab.name, "noise": lab.noise, "random": lab.random, "submitted": run.submitted,
                     "replays": run.replays, "latency_p50_ms": 1000 * statistics.median(lat) if lat else None,
                     "latency_p95_ms": 1000 * lat[int(0.95 * (len(lat) - 1))] if lat else None})
        ctx.log(name, event="labeler", **rows[-1])
    payload = {"kind": "labelers", "agreement": report, "stats": project_stats(snap), "labelers": rows,
               "settings": {"completions": cfg.completions, "items": len(items), "gold": cfg.gold,
                            "oracle_project": ORACLE, "oracle_labels": oracle_labels,
                            "overlap": cfg.overlap or len(labelers), "tie_tolerance": cfg.tie_tolerance,
                            "seed": seed, "oracle": "ROUGE-L F1 (stemmed) against the item's reference",
                            "transport": "the labeling app's JSON API over loopback HTTP"}}
    return {"labels": str(db_path), "rankings": str(rankings_path), "eval": write_eval(out_dir, payload)}


def _oracle_label(item, references: dict[str, str], tie_tolerance: float) -> dict:
    """The noise-free oracle's label of an item (the truth the labelers see through their noise)."""
    oracle = simulate.SimulatedLabeler("oracle", "", tie_tolerance=tie_tolerance)  # noise 0: rng never matters
    task = {"completions": [{"id": c.id, "text": c.text} for c in item.completions]}
    return simulate.simulated_label(oracle, task, references[item.prompt_id], random.Random(0))


def _with_gold(items: list, n: int, references: dict[str, str], tie_tolerance: float) -> list:
    """The first ``n`` items that the oracle can rank, made gold items with the oracle's own ranking."""
    out, made = [], 0
    for item in items:
        if made < n and (ranking := _oracle_label(item, references, tie_tolerance)["ranking"]) is not None:
            item, made = replace(item, gold=ranking), made + 1
        out.append(item)
    return out


def _oracle_project(store: LabelStore, items: list, references: dict[str, str], tie_tolerance: float) -> int:
    """Project ``oracle`` of the same database: every item ranked once by the noise-free oracle, written
    through the store (it is the truth, not a labeler), so that reward models can be scored against the real
    preference (``data: {format: label_db, stage: <this stage>, project: oracle}``). Returns its labels."""
    store.create_project(ORACLE, overlap=1, too_fast_s=0.0, guidelines=GUIDELINES)
    store.add_user(ORACLE, "admin", secrets.token_urlsafe(16))  # admin: no labeler of the labelers' project
    store.add_items([replace(item, gold=None, overlap=1) for item in items], ORACLE)
    stored = 0
    while (task := store.next_item_for(ORACLE, ORACLE)) is not None:
        item = next(i for i in items if i.prompt_id == task.prompt_id)
        store.submit(ORACLE, task.item_id, Label.from_dict(_oracle_label(item, references, tie_tolerance)),
                     f"oracle-{task.item_id}")
        stored += 1
    return stored


def section(run: Run) -> str:
    """The human-feedback part of report.md: who labelled how, their agreement and who was flagged."""
    found = [(stage, data) for stage in run.stages_of("labelers") if (data := run.eval_json(stage)) is not None]
    if not found:
        return ""
    lines = ["### Labels and agreement", ""]
    for stage, data in found:
        rep, s = data["agreement"], data["settings"]
        per = {row["labeler"]: row for row in rep["labelers"]}
        lines += [f"**{md(stage)}**: {s['items']} items ({s['gold']} gold), {s['overlap']} labelers each, "
                  f"labelled through {md(s['transport'])}. Oracle: {md(s['oracle'])}.", "",
                  "| Labeler | Rule | Labels | Special | Gold accuracy | Mean τ-b with others | Agreement with "
                  "the others' consensus | Weight | Flagged | p95 submit |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---|---:|"]
        for row in data["labelers"]:
            a = per.get(row["labeler"], {})
            rule = "random" if row["random"] else f"oracle + noise σ={row['noise']:g}"
            p95 = f"{row['latency_p95_ms']:.0f} ms" if row["latency_p95_ms"] is not None else "—"
            special = sum((a.get("special") or {}).values())
            lines.append(f"| {md(row['labeler'])} | {rule} | {a.get('labels', '—')} | {special} | "
                         f"{fraction(a.get('gold_accuracy'))} | {fraction(a.get('mean_tau_b'))} | "
                         f"{fraction(a.get('loo_agreement'))} | {fraction(a.get('weight'))} | "
                         f"{'**yes**' if a.get('outlier') else 'no'} | {p95} |")
        lines += ["", f"Krippendorff's α (ordinal, over normalised ranks): {fraction(rep['alpha']['rankings'])}; "
                      f"pairwise agreement over all labeler pairs: {fraction(rep['overall']['agreement'])}. "
                      f"Outlier rule: {md(rep['settings']['outlier_rule'])}.", ""]
        random_names = {row["labeler"] for row in data["labelers"] if row["random"]}
        flagged = {name for name, a in per.items() if a.get("outlier")}
        if random_names:
            verdict = "singled out" if flagged == random_names else f"not singled out (flagged: {sorted(flagged)})"
            lines += [f"The random labeler ({', '.join(sorted(random_names))}) was {verdict} by agreement.", ""]
        plot = run.dir / "plots" / f"agreement_{stage}.png"
        agreement_plot(rep, plot)
        lines += [f"![agreement between labelers]({plot.relative_to(run.dir)})", ""]
    return "\n".join(lines)
