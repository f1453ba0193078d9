"""report.md: one page that shows what every stage of a run did, rebuilt from the run directory alone.

The page has its own parts (the header, the stages' wall times, the training loss curves, example predictions and
the settings of every score) and, between them, the stage sections it is handed: ``section(run) -> str``
functions that live with their stage kinds (``lmcycle.stages.report_sections()`` gives them in page order), so
this package never imports the stages. Output: ``report.md`` plus ``plots/*.png`` (matplotlib, Agg; no pyplot
global state).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from lmcycle.atomic import atomic_write_text
from lmcycle.report.markdown import (
    duration,
    excerpt,
    figure,
    filename,
    inline,
    is_number,
    md,
    plain,
    save_png,
)
from lmcycle.report.rundir import N_EXAMPLES, Run

Section = Callable[[Run], str]  # a part of the page; "" when the run has nothing for it


def write_report(run_dir: str | os.PathLike, title: str | None = None,
                 artifacts: dict[str, dict[str, str]] | None = None, sections: Iterable[Section] = ()) -> Path:
    """Build ``run_dir/report.md`` (and ``run_dir/plots/*.png``) from the run directory; return its path.

    ``artifacts`` (the runner's, in memory) replace artifacts.json; ``sections`` come after the stage times, in
    the order given. The parts are joined by a blank line, leaving out the empty ones."""
    run = Run.read(run_dir, artifacts)
    parts = [header(run, title), stage_times(run), *(section(run) for section in sections), examples(run),
             settings(run)]
    path = run.dir / "report.md"
    atomic_write_text(path, "\n".join(p for p in parts if p).rstrip() + "\n")
    return path


def chapter(heading: str, *sections: Section) -> Section:
    """One ``## heading`` over several sections (e.g. the tables of related stage kinds), shown when any of
    them has something to say."""

    def part(run: Run) -> str:
        found = [text for text in (section(run) for section in sections) if text]
        return "\n".join([f"## {heading}", "", *found]) if found else ""

    return part


# -- the page's own parts ----------------------------------------------------------------------------------

def header(run: Run, title: str | None) -> str:
    """Title, description, whether the run finished, when it ran, its seed and device."""
    config = run.config
    name = config.get("name") or run.dir.name
    lines = [f"# {title or f'lmcycle run: {name}'}", ""]
    if config.get("description"):
        lines += [str(config["description"]), ""]
    times = [r["time"] for r in run.rows if isinstance(r.get("time"), int | float)]
    status = ("finished" if (run.dir / "DONE").exists() or not _pending_stages(run) else
              "failed: " + (run.dir / "FAILED").read_text(encoding="utf-8").strip()
              if (run.dir / "FAILED").exists() else "not finished when this report was written")
    lines.append(f"- Recipe: **{md(str(name))}**, run directory `{run.dir.name}` ({status})")
    if times:
        start, end = min(times), max(times)
        lines.append(f"- Ran {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(start))} → "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(end))} "
                     f"({duration(end - start)})")
    if "seed" in config:
        lines.append(f"- Seed {config['seed']}, device {md(_device(run))}")
    return "\n".join(lines) + "\n"


def _device(run: Run) -> str:
    """The recipe's device as written, and what it resolved to where that differs (``auto: cuda:0 (NVIDIA
    H200)``); every stage logs the device it ran on, and a resumed run may have run on more than one."""
    asked = str(run.config.get("device", "cpu"))
    used = list(dict.fromkeys(str(r["device"]) for r in run.rows if r.get("event") == "stage_start" and r.get("device")))
    if not used or used == [asked]:
        return asked
    return f"{asked}: {', '.join(used)}"


def _pending_stages(run: Run) -> list[str]:
    """Stages of the recipe, other than reports, that artifacts.json does not record yet."""
    names = [s.get("name") or s.get("type") for s in run.config.get("stages") or [] if s.get("type") != "report"]
    return [n for n in names if n not in run.finished]


def stage_times(run: Run) -> str:
    """Every finished stage's wall time, and their total."""
    ends = [r for r in run.rows if r.get("event") == "stage_end" and "seconds" in r]
    if not ends:
        return ""
    lines = ["## Stages", "", "| Stage | Type | Wall time |", "|---|---|---:|"]
    for r in ends:
        lines.append(f"| {md(str(r.get('stage')))} | {md(str(r.get('type', '')))} | {duration(r['seconds'])} |")
    total = sum(float(r["seconds"]) for r in ends)
    lines.append(f"| **total** | | **{duration(total)}** |")
    return "\n".join(lines) + "\n"


def training(run: Run) -> str:
    """The loss curves of every stage that logged training steps (pretrain, sft, reward, ...), one plot each.

    A part of the page, not of one kind; the stage registry places it among the sections (before the decoding
    explorer)."""
    stages: dict[str, list[dict]] = {}
    for r in run.rows:
        if r.get("kind") != "eval" and "step" in r and ("loss" in r or "eval_loss" in r):
            stages.setdefault(str(r.get("stage")), []).append(r)
    if not stages:
        return ""
    lines = ["## Training", ""]
    for stage, stage_rows in stages.items():
        # One point per step: a run resumed before this version logged the steps it re-ran twice (last wins).
        train = list({r["step"]: r["loss"] for r in stage_rows if is_number(r.get("loss"))}.items())
        evals = list({r["step"]: r["eval_loss"] for r in stage_rows if is_number(r.get("eval_loss"))}.items())
        facts = []
        if train:
            facts.append(f"{len(train)} logged steps, last train loss {train[-1][1]:.4f} at step {train[-1][0]}")
        if evals:
            facts.append(f"last eval loss {evals[-1][1]:.4f} at step {evals[-1][0]}")
        lines += [f"### {md(stage)}", "", "; ".join(facts) + ".", ""]
        plot = _loss_plot(run.dir, stage, train, evals)
        lines += [f"![loss curves of {md(stage)}]({plot})", ""]
    return "\n".join(lines)


def _loss_plot(run_dir: Path, stage: str, train: list[tuple], evals: list[tuple]) -> str:
    fig = figure(6, 3.6)
    ax = fig.subplots()
    if train:
        ax.plot([s for s, _ in train], [v for _, v in train], label="train loss", linewidth=1)
    if evals:
        ax.plot([s for s, _ in evals], [v for _, v in evals], "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"{stage}: loss")
    ax.legend()
    name = f"loss_{filename(stage)}.png"
    save_png(fig, run_dir / "plots" / name)
    return f"plots/{name}"


def examples(run: Run) -> str:
    """The first predictions of every generation eval, next to their first reference."""
    blocks = []
    for e in run.generation_evals():
        if not e.examples:
            continue
        blocks += [f"### {md(e.stage)}", ""]
        if "toxicity" in e.metrics:  # completions scored for toxicity are offensive by design: files only
            blocks += ["Not shown: these completions were scored for toxicity and can be offensive; they are in "
                       "the stage's `predictions.jsonl`.", ""]
            continue
        for ex in e.examples:
            refs = ex.get("references") or []
            blocks.append(f"- **{md(str(ex.get('id', '')))}** — prediction: {excerpt(ex.get('prediction', ''))}")
            if refs:
                blocks.append(f"  <br>reference: {excerpt(refs[0])}")
        blocks.append("")
    heading = f"## Example predictions (first {N_EXAMPLES} per eval stage)"
    return "\n".join([heading, "", *blocks]) if blocks else ""


# The scores whose settings have a line of their own below; any other score shows its signature alone.
OWN_LINES = ("rouge", "bleu", "perplexity")


def settings(run: Run) -> str:
    """What produced every generation eval's numbers: model, data, prompt, decoding and each score's options
    (with its signature, where the score records one)."""
    blocks: list[str] = []
    shown_rouge: tuple[str, dict] = ("", {})  # the last ROUGE options written out in full
    for e in run.generation_evals():
        s = e.settings
        if not s:
            continue
        blocks += [f"### {md(e.stage)}", ""]
        for key in ("model", "baseline", "data", "n", "template", "shots", "shot_pool", "shots_used_mean",
                    "context_window", "prompts_truncated", "seed"):
            if s.get(key) is not None:
                blocks.append(f"- {key}: `{inline(s[key])}`")
        if s.get("decoding"):
            blocks.append(f"- decoding: `{inline(s['decoding'])}`")
        rouge = {k: v for k, v in (s.get("rouge") or {}).items() if k != "n"}
        if rouge and rouge == shown_rouge[1]:
            blocks.append(f"- ROUGE: same options as {md(shown_rouge[0])}")
        elif rouge:
            blocks.append("- ROUGE: " + _options(rouge))
            shown_rouge = (e.stage, rouge)
        bleu = s.get("bleu") or {}
        if bleu.get("signature"):
            blocks.append(f"- BLEU: sacrebleu signature `{bleu['signature']}`; "
                          f"{md(plain(bleu.get('multi_ref', '')))}")
        ppl = s.get("perplexity") or {}
        if ppl:
            blocks.append("- Perplexity: " + _options(ppl))
        blocks += [f"- {md(name)}: signature `{inline(score['signature'])}`" for name, score in s.items()
                   if name not in OWN_LINES and _signature(score)]
        blocks.append("")
    return "\n".join(["## Settings", "", *blocks]) if blocks else ""


def _signature(score: object) -> bool:
    return isinstance(score, dict) and isinstance(score.get("signature"), str)


def _options(score: dict) -> str:
    """``signature `...`; key: value; ...``: a score's signature first, where it has one, then its options."""
    head = [f"signature `{inline(score['signature'])}`"] if _signature(score) else []
    # "keys" is the signature again, as a dict for programs: the page shows the string once.
    shown = {k: v for k, v in score.items() if not (head and k in ("signature", "keys"))}
    return "; ".join(head + [f"{k}: {md(plain(v))}" for k, v in shown.items()])
