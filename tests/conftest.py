"""Suite-wide settings.

Tests use tiny models, where torch's intra-op threading costs more than it gives (on 2 busy cores, 2 threads
made tiny-model tests ~25x slower than 1). Library code never sets threads; only the tests do.
"""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
