"""Transitional: the distill stage still lives in lmcycle.optimize.distill (moved here by issue 15)."""

from lmcycle.optimize.distill import DistillStage, run_distill  # noqa: F401
