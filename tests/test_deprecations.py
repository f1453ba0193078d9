"""The suite's deprecation guard (deprecations.py): a deprecation that lmcycle's code triggers fails the test,
however transformers attributes it; the same deprecation caused by a test directly does not."""

from __future__ import annotations

from pathlib import Path

pytest_plugins = ["pytester"]

TESTS = Path(__file__).resolve().parent

CONFTEST = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
from deprecations import pytest_runtest_call, pytest_runtest_setup, pytest_runtest_teardown  # noqa: F401
"""

# A real tiny model whose forward carries transformers' own deprecation machinery, as 5.24's models do.
INNER = """
import functools
import warnings

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging
from transformers.utils.deprecation import deprecate_kwarg

from lmcycle.models.generate import logit_stream


def tiny():
    cfg = LlamaConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                      num_key_value_heads=1, intermediate_size=16, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()


def deprecating_use_cache():
    model = tiny()
    model.forward = deprecate_kwarg("use_cache", "99.0.0")(model.forward)
    return model


def with_side_effect(effect):
    model = tiny()
    forward = model.forward

    @functools.wraps(forward)
    def noisy(*args, **kwargs):
        effect()
        return forward(*args, **kwargs)

    model.forward = noisy
    return model


def test_warned_through_lmcycle():
    next(logit_stream(deprecating_use_cache(), [[1, 2, 3]], 0))


def test_logged_through_lmcycle():
    log = lambda: logging.get_logger("transformers.utils.generic").warning_once("`old_name` is deprecated. Use `new`.")
    next(logit_stream(with_side_effect(log), [[1, 2, 3]], 0))


def test_warned_by_the_test_itself():
    deprecating_use_cache()(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True)


def test_other_warnings_through_lmcycle():
    next(logit_stream(with_side_effect(lambda: warnings.warn("just a note", UserWarning)), [[1, 2, 3]], 0))
"""


def test_deprecations_through_lmcycle_fail_the_test(pytester):
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_inner=INNER)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=2, passed=2)
    result.stdout.fnmatch_lines([
        "FAILED test_inner.py::test_warned_through_lmcycle - Failed: deprecated API*",
        "FAILED test_inner.py::test_logged_through_lmcycle - Failed: deprecated API*",
    ])
    result.stdout.fnmatch_lines(["*FutureWarning attributed to *`use_cache` is deprecated and will be removed*"])
    result.stdout.fnmatch_lines(["*logged by transformers.utils.generic: `old_name` is deprecated. Use `new`.*"])
