"""``lmcycle --help`` stays fast: parsing the command line imports neither torch, transformers nor matplotlib
(each command imports what it needs when it runs)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "matplotlib")
PROBE = """
import json, sys
from lmcycle.cli import main
try:
    main({argv!r})
except SystemExit:
    pass
print(json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)), file=sys.stderr)
"""


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["sft", "--help"], ["plan", "--help"],
                                  ["rag", "query", "--help"]])
def test_help_imports_no_heavy_module(argv):
    # a fresh interpreter: this test process may have imported torch already
    done = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv, heavy=HEAVY)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage: lmcycle" in done.stdout
    assert json.loads(done.stderr.strip().splitlines()[-1]) == []


def test_python_dash_m_runs_the_cli():
    """``python -m lmcycle.cli`` is how torchrun starts it."""
    done = subprocess.run([sys.executable, "-m", "lmcycle.cli", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: lmcycle")
