"""Transitional: the explore stage still lives in lmcycle.models.explore (moved here by issue 15)."""

from lmcycle.models.explore import ExploreStage, run_explore  # noqa: F401
