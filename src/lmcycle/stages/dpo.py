"""Transitional: the dpo stage still lives in lmcycle.align.dpo (moved here by issue 15)."""

from lmcycle.align.dpo import DpoStage, run_dpo  # noqa: F401
