"""Transitional: the compare stage still lives in lmcycle.optimize.compare (moved here by issue 15)."""

from lmcycle.optimize.compare import CompareStage, run_compare  # noqa: F401
