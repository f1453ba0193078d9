"""Transitional: the report stage still lives in lmcycle.report (moved here by issue 15)."""

from lmcycle.report import ReportStage, run_report  # noqa: F401
