"""Transitional: the quantize stage still lives in lmcycle.optimize.quantize (moved here by issue 15)."""

from lmcycle.optimize.quantize import QuantizeStage, run_quantize  # noqa: F401
