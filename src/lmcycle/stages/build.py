"""Transitional: the build stage still lives in lmcycle.models.build (moved here by issue 15)."""

from lmcycle.models.build import BuildStage, run_build  # noqa: F401
