"""Win rate with ties and its bootstrap interval, against hand computations."""

import pytest

from lmcycle.errors import LmcycleError
from lmcycle.evals.winrate import prompt_win_rate, win_rate


def test_prompt_win_rate_counts_every_pair_and_ties_half():
    # candidate 0.5 beats 0.2, ties 0.5, loses to 0.9; candidate 0.1 loses all three: (1 + 0.5 + 0 + 0) / 6
    assert prompt_win_rate([0.5, 0.1], [0.2, 0.5, 0.9]) == pytest.approx(1.5 / 6)


def test_win_rate_weighs_prompts_equally_and_leaves_out_one_sided_prompts():
    cand = {"a": [1.0, 1.0], "b": [0.0], "only_c": [0.3]}
    base = {"a": [0.0], "b": [0.0, 1.0], "only_b": [0.1]}
    score = win_rate(cand, base, judge="test", resamples=200, seed=0)
    # a: 1.0; b: (0.5 + 0) / 2 = 0.25 -> mean 0.625
    assert score.values["win_rate"] == pytest.approx(0.625)
    assert score.values["candidate_mean"] == pytest.approx((1.0 + 0.0) / 2)
    assert score.values["baseline_mean"] == pytest.approx((0.0 + 0.5) / 2)
    assert score.settings["prompts"] == 2 and score.settings["left_out"] == 2
    assert score.settings["resamples"] == 200 and score.settings["judge"] == "test"
    assert 0.25 <= score.values["ci_low"] <= 0.625 <= score.values["ci_high"] <= 1.0
    assert [e["prompt_win_rate"] for e in score.per_example] == [1.0, 0.25]


def test_interval_is_seeded_and_narrows_with_more_prompts():
    few = {str(i): [float(i % 2)] for i in range(10)}
    many = {str(i): [float(i % 2)] for i in range(400)}
    zeros = {k: [0.5] for k in many}
    a = win_rate(few, {k: [0.5] for k in few}, judge="t", seed=3)
    assert a.values == win_rate(few, {k: [0.5] for k in few}, judge="t", seed=3).values
    b = win_rate(many, zeros, judge="t", seed=3)
    assert b.values["win_rate"] == pytest.approx(0.5)
    assert (b.values["ci_high"] - b.values["ci_low"]) < (a.values["ci_high"] - a.values["ci_low"])


def test_no_shared_prompt_is_an_error():
    with pytest.raises(LmcycleError, match="no prompt has completions on both sides"):
        win_rate({"a": [1.0]}, {"b": [1.0]}, judge="t")
