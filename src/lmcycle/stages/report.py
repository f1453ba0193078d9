"""ReportStage: write report.md for the run so far (:func:`lmcycle.report.write_report`).

A recipe without a ``report`` stage still gets one: the runner writes report.md after its last stage.
"""

from __future__ import annotations

from typing import Literal

from lmcycle.report import write_report
from lmcycle.stages.common import StageConfig
from lmcycle.stages.context import RunContext


class ReportStage(StageConfig):
    """Write report.md for the run so far (the runner also writes one at the end when no stage asks)."""

    type: Literal["report"] = "report"
    title: str | None = None


def run_report(cfg: ReportStage, ctx: RunContext) -> dict[str, str]:
    # The in-memory artifacts are current even if artifacts.json lags behind this stage.
    return {"report": str(write_report(ctx.run_dir, cfg.title, artifacts=ctx.artifacts))}
