"""Transitional: the generate stage still lives in lmcycle.models.generate (moved here by issue 15)."""

from lmcycle.models.generate import GenerateStage, run_generate  # noqa: F401
