"""Transitional: the eval stage still lives in lmcycle.evals.evaluate (moved here by issue 15)."""

from lmcycle.evals.evaluate import EvalStage, run_eval  # noqa: F401
