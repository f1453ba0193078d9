"""Fixtures for the alignment tests: the tiny tokenizers and models of tests/train/tiny_lm.py."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))

import tiny_lm  # noqa: E402

tok, t5_tok = tiny_lm.tok, tiny_lm.t5_tok  # session fixtures
