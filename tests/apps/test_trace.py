"""Traces and chains: left-to-right composition with a JSON trace of every step."""

from __future__ import annotations

import json

import pytest

from lmcycle.apps.trace import Trace, chain


def test_chain_composes_in_order_and_traces_each_step(tmp_path):
    run = chain(("double", lambda x: x * 2), ("describe", lambda x: f"got {x}"))
    trace = Trace()
    assert run(4, trace=trace) == "got 8"
    assert [(s["step"], s["input"], s["output"]) for s in trace.steps] == [("double", 4, 8), ("describe", 8, "got 8")]
    saved = json.loads(trace.save(tmp_path / "t.json").read_text())
    assert saved["steps"][1]["output"] == "got 8" and saved["steps"][0]["seconds"] >= 0
    assert run(1) == "got 2"  # no trace needed


def test_a_failing_step_raises_its_own_error_with_the_earlier_steps_traced():
    run = chain(("ok", str.strip), ("fail", int))
    trace = Trace()
    with pytest.raises(ValueError):
        run(" x ", trace=trace)
    assert [s["step"] for s in trace.steps] == ["ok"]
