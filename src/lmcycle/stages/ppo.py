"""Transitional: the ppo stage still lives in lmcycle.align.ppo_stage (moved here by issue 15)."""

from lmcycle.align.ppo_stage import PpoStage, run_ppo  # noqa: F401
