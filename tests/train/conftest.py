"""Fixtures for the training tests: tiny tokenizers trained here (session-wide; they take ~1 s)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tiny_lm, also for tests/adapt

import tiny_lm  # noqa: E402


@pytest.fixture(scope="session")
def tok():
    """Decoder tokenizer (adds no special tokens itself)."""
    return tiny_lm.make_tokenizer()


@pytest.fixture(scope="session")
def t5_tok():
    """T5-style tokenizer: appends <eos>, has <extra_id_*> sentinels."""
    return tiny_lm.make_tokenizer(seq2seq=True)
