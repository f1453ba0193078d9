"""ReportStage: write report.md for the run so far (:func:`write_run_report`: the page of
:func:`lmcycle.report.write_report` with the sections of every stage kind, :func:`lmcycle.stages.report_sections`).

A recipe without a ``report`` stage still gets one: the runner writes report.md after its last stage.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from lmcycle.report import write_report
from lmcycle.stages import report_sections
from lmcycle.stages.common import StageConfig
from lmcycle.stages.context import RunContext


class ReportStage(StageConfig):
    """Write report.md for the run so far (the runner also writes one at the end when no stage asks)."""

    type: Literal["report"] = "report"
    title: str | None = None


def write_run_report(run_dir: str | os.PathLike, title: str | None = None,
                     artifacts: dict[str, dict[str, str]] | None = None) -> Path:
    """Write ``run_dir/report.md`` (and its plots) with every stage kind's section; return its path.

    ``artifacts`` defaults to the run's artifacts.json. This is ``lmcycle report RUN_DIR`` and ``lmcycle.write_report``.
    """
    return write_report(run_dir, title, artifacts=artifacts, sections=report_sections())


def run_report(cfg: ReportStage, ctx: RunContext) -> dict[str, str]:
    # The in-memory artifacts are current even if artifacts.json lags behind this stage.
    return {"report": str(write_run_report(ctx.run_dir, cfg.title, artifacts=ctx.artifacts))}
