"""Fail a test phase when lmcycle's own code triggers a deprecation, wherever the warning is attributed.

A pytest filter such as ``error::FutureWarning:lmcycle`` only matches the module a warning is attributed to, and
transformers attributes its deprecations (``stacklevel=2``) to its own or torch's modules, so no filter sees
that our call caused them. Some deprecations are not warnings at all but ``logger.warning_once`` lines of the
``transformers`` logger (reading ``out.past_key_values`` in 5.24). Both are caught while they are raised, when
the frames that led to them can still be read: a deprecation counts when any of those frames is in lmcycle's
source. One that a test or a third-party library causes without lmcycle on the stack is left to pytest.

conftest.py imports the three hook wrappers at the end of this file; :data:`ALLOWED` lists deprecations raised
inside third-party code that lmcycle cannot avoid.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import pytest
import transformers.utils.logging as hf_logging

import lmcycle

# Unresolved, as code objects spell their file names.
SOURCE = str(Path(lmcycle.__file__).parent) + os.sep
CATEGORIES = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
# transformers words its logged deprecations "... is deprecated ...", "... deprecated and will be removed ...".
LOGGED = re.compile(r"deprecat", re.IGNORECASE)
# (category, message regex) of deprecations that third-party code raises inside itself, whatever lmcycle calls;
# logged deprecations match FutureWarning entries.
ALLOWED: list[tuple[type[Warning], re.Pattern[str]]] = [
    # torch 2.13's own torch/utils/mkldnn.py decorates its classes with torch.jit.script_method when
    # torch.compile first imports it; lmcycle calls only torch.compile.
    (DeprecationWarning, re.compile(r"^`torch\.jit\.script_method` is deprecated")),
]


def _through_lmcycle(frame: FrameType | None) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith(SOURCE):
            return True
        frame = frame.f_back
    return False


def _allowed(category: type[Warning], message: str, filename: str) -> bool:
    # Attributed to lmcycle's own file, an allowed message is still ours (we called the deprecated API directly).
    return not filename.startswith(SOURCE) and any(
        issubclass(category, c) and pattern.search(message) for c, pattern in ALLOWED)


class _LoggedDeprecations(logging.Handler):
    def __init__(self, found: list[str]):
        super().__init__(logging.WARNING)
        self.found = found

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if LOGGED.search(message) and not _allowed(FutureWarning, message, record.pathname) and _through_lmcycle(sys._getframe(1)):
            self.found.append(f"logged by {record.name}: {message}")


@contextlib.contextmanager
def deprecations_from_lmcycle() -> Iterator[list[str]]:
    """Collect, while the block runs, every deprecation raised with lmcycle's source on the stack."""
    found: list[str] = []
    handler = _LoggedDeprecations(found)
    logger = logging.getLogger("transformers")
    with warnings.catch_warnings():
        # Seen every time, also where an ini filter ignores them or the registry saw them already this test.
        for category in CATEGORIES:
            warnings.simplefilter("always", category)
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            text = str(message)
            deprecation = issubclass(category, CATEGORIES)
            if deprecation and _allowed(category, text, filename):
                return  # known noise: kept out of pytest's summary, as the ini's torch filter did
            if deprecation and _through_lmcycle(sys._getframe(1)):
                found.append(f"{category.__name__} attributed to {filename}:{lineno}: {text}")
            shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        # warning_once remembers messages for the whole process; forget them so every test can see its own.
        hf_logging.warning_once.cache_clear()
        logger.addHandler(handler)
        try:
            yield found
        finally:
            logger.removeHandler(handler)


def fail_on_lmcycle_deprecations():
    """Body of a ``wrapper=True`` hook around one test phase: run it, then fail it if lmcycle caused a deprecation."""
    with deprecations_from_lmcycle() as found:
        result = yield
    if found:
        pytest.fail("deprecated API used through lmcycle's code:\n  " + "\n  ".join(dict.fromkeys(found)),
                    pytrace=False)
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    return (yield from fail_on_lmcycle_deprecations())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    return (yield from fail_on_lmcycle_deprecations())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    return (yield from fail_on_lmcycle_deprecations())
