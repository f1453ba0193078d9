"""Transitional: the prune stage still lives in lmcycle.optimize.prune (moved here by issue 15)."""

from lmcycle.optimize.prune import PruneStage, run_prune  # noqa: F401
