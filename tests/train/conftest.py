"""Fixtures for the training tests: tiny tokenizers trained here (session-wide; they take ~1 s)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tiny_lm, also for tests/adapt

import tiny_lm  # noqa: E402

tok, t5_tok = tiny_lm.tok, tiny_lm.t5_tok  # session fixtures
