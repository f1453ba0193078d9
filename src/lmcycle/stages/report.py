"""ReportStage: write report.md for the run so far (:func:`lmcycle.report.write_report`, with the sections of
:func:`lmcycle.stages.report_sections`).

A recipe without a ``report`` stage still gets one: the runner writes report.md after its last stage.
"""

from __future__ import annotations

from typing import Literal

from lmcycle.config import Config
from lmcycle.report import write_report
from lmcycle.stages import report_sections
from lmcycle.stages.context import RunContext


class ReportStage(Config):
    """Write report.md for the run so far (the runner also writes one at the end when no stage asks)."""

    type: Literal["report"] = "report"
    name: str | None = None
    title: str | None = None


def run_report(cfg: ReportStage, ctx: RunContext) -> dict[str, str]:
    # The in-memory artifacts are current even if artifacts.json lags behind this stage.
    path = write_report(ctx.run_dir, cfg.title, artifacts=ctx.artifacts, sections=report_sections())
    return {"report": str(path)}
