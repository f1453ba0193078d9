"""Transitional: the reward stage still lives in lmcycle.align.reward (moved here by issue 15)."""

from lmcycle.align.reward import RewardStage, run_reward  # noqa: F401
