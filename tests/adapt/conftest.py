"""Fixtures for the adaptation tests: the tiny tokenizers and models of tests/train/tiny_lm.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))

import tiny_lm  # noqa: E402


@pytest.fixture(scope="session")
def tok():
    return tiny_lm.make_tokenizer()


@pytest.fixture(scope="session")
def t5_tok():
    return tiny_lm.make_tokenizer(seq2seq=True)
