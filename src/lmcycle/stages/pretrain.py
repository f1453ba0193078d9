"""Transitional: the pretrain stage still lives in lmcycle.train.pretrain (moved here by issue 15)."""

from lmcycle.train.pretrain import PretrainStage, run_pretrain  # noqa: F401
