"""Transitional: the harness stage still lives in lmcycle.apps.stages (moved here by issue 15)."""

from lmcycle.apps.stages import HarnessStage, run_harness  # noqa: F401
