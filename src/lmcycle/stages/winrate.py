"""WinrateStage: how often one completions stage's outputs beat another's under the labelers' oracle.

The last step of the closed loop: the policy after RL completes the same prompts as the policy the labels were
collected on, and the known preference rule (:func:`lmcycle.feedback.simulate.oracle_score`: ROUGE-L F1
against the reference) judges every pair (:func:`lmcycle.evals.winrate.win_rate`, with a bootstrap 95%
interval over prompts). Writes ``<stage>/eval.json``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from lmcycle.config import StageName
from lmcycle.evals.winrate import win_rate
from lmcycle.feedback.items import read_completions
from lmcycle.feedback.simulate import oracle_score
from lmcycle.report.markdown import fixed, md
from lmcycle.report.rundir import Run
from lmcycle.stages.common import StageConfig, write_eval
from lmcycle.stages.context import RunContext

JUDGE = "oracle: ROUGE-L F1 (stemmed) against the reference"


class WinrateStage(StageConfig):
    """Win rate of a completions stage against another, by the oracle."""

    type: Literal["winrate"] = "winrate"
    candidate: StageName = Field(description="the completions stage under test (e.g. after RL)")
    baseline: StageName = Field(description="the completions stage it is compared with (e.g. the one labelled)")
    resamples: int = Field(1000, ge=100, description="bootstrap resamples of the prompts")
    seed: int | None = None


def run_winrate(cfg: WinrateStage, ctx: RunContext) -> dict[str, str]:
    """Score both stages' completions by the oracle; write the win rate to ``eval.json``; return ``{"eval"}``."""
    scores = {side: _oracle_scores(ctx.artifact(stage, "completions"))
              for side, stage in (("candidate", cfg.candidate), ("baseline", cfg.baseline))}
    score = win_rate(scores["candidate"], scores["baseline"], judge=JUDGE, resamples=cfg.resamples,
                     seed=ctx.seed_for(cfg.seed))
    ctx.log(cfg.stage_name, **score.values)
    payload = {"kind": "winrate", "metrics": score.values,
               "settings": {**score.settings, "candidate": cfg.candidate, "baseline": cfg.baseline}}
    return {"eval": write_eval(ctx.stage_dir(cfg.stage_name), payload)}


def _oracle_scores(path: str) -> dict[str, list[float]]:
    return {item.prompt_id: [oracle_score(c.text, item.meta.get("reference", "")) for c in item.completions]
            for item in read_completions(path)}


def section(run: Run) -> str:
    """The closed loop's verdict: each win rate with its interval, and both sides' mean oracle score."""
    found = [(stage, data) for stage in run.stages_of("winrate") if (data := run.eval_json(stage)) is not None]
    if not found:
        return ""
    lines = ["### Win rate after the loop", "",
             "| Stage | Candidate | Baseline | Prompts | Win rate [95% CI] | Oracle score: candidate | baseline |",
             "|---|---|---|---:|---:|---:|---:|"]
    for stage, data in found:
        m, s = data["metrics"], data["settings"]
        verdict = (" (the interval holds 0.50: no difference shown)" if m["ci_low"] <= 0.5 <= m["ci_high"] else
                   " (worse: the candidate loses)" if m["ci_high"] < 0.5 else "")
        lines.append(f"| {md(stage)} | {md(s['candidate'])} | {md(s['baseline'])} | {s['prompts']} | "
                     f"{fixed(m['win_rate'], 3)} [{fixed(m['ci_low'], 3)}, {fixed(m['ci_high'], 3)}]{verdict} | "
                     f"{fixed(m['candidate_mean'], 3)} | {fixed(m['baseline_mean'], 3)} |")
    s = found[0][1]["settings"]
    lines += ["", f"Judge: {md(s['judge'])}; ties count half; {md(s['interval'])}, {s['resamples']} resamples."]
    return "\n".join(lines) + "\n"
