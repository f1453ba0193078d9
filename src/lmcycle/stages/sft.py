"""Transitional: the sft stage still lives in lmcycle.adapt.sft (moved here by issue 15)."""

from lmcycle.adapt.sft import SftStage, run_sft  # noqa: F401
