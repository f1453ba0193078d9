"""Transitional: the retrieval stage still lives in lmcycle.apps.stages (moved here by issue 15)."""

from lmcycle.apps.stages import RetrievalStage, run_retrieval  # noqa: F401
