"""Suite-wide settings.

Tests use tiny models, where torch's intra-op threading costs more than it gives (on 2 busy cores, 2 threads
made tiny-model tests ~25x slower than 1). Library code never sets threads; only the tests do.

A deprecation that lmcycle's code triggers (in any library, however the warning is attributed) fails the test
phase it happens in: see deprecations.py.
"""

import sys
from pathlib import Path

import pytest
import torch

# tests/train/tiny_lm.py: the tiny tokenizers and models that the train, adapt and align tests share.
sys.path.insert(0, str(Path(__file__).resolve().parent / "train"))

import tiny_lm  # noqa: E402
from deprecations import (  # noqa: E402, F401  (hooks, found by name: see deprecations.py)
    pytest_runtest_call,
    pytest_runtest_setup,
    pytest_runtest_teardown,
)

tok, t5_tok = tiny_lm.tok, tiny_lm.t5_tok  # session fixtures


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

