"""Transitional: the classifier stage still lives in lmcycle.evals.toxicity (moved here by issue 15)."""

from lmcycle.evals.toxicity import ClassifierStage, run_classifier  # noqa: F401
