"""Reward-hacking guard: the signals (distinct-n, repetition) and when each alarm fires."""

from __future__ import annotations

import pytest

from lmcycle.align.guard import GuardConfig, check_alarms, distinct_n, repetition, should_stop


def row(score=0.0, kl=0.01, length=10.0, rep=0.0, judge=None, distinct=0.9) -> dict:
    return {"score": score, "kl": kl, "response_len": length, "repetition": rep, "judge": judge,
            "distinct_2": distinct}


def test_distinct_n_and_repetition():
    assert distinct_n([[1, 2, 3], [1, 2, 4]], 1) == pytest.approx(4 / 6)
    assert distinct_n([[1, 2, 3], [1, 2, 4]], 2) == pytest.approx(3 / 4)
    assert repetition([[5, 6, 7, 5, 6, 7, 5, 6, 7]]) == pytest.approx(4 / 7)  # 7 trigrams, 3 distinct
    assert repetition([[1, 2, 3, 4]]) == 0.0 and repetition([[1]]) == 0.0


def test_quiet_history_raises_nothing():
    history = [row(score=0.1 * i, judge=0.1 * i) for i in range(6)]
    assert check_alarms(history, GuardConfig(kl_max=0.5)) == []


def test_kl_alarm_uses_kl_max_or_twice_the_target():
    assert [a["alarm"] for a in check_alarms([row(kl=0.6)], GuardConfig(kl_max=0.5))] == ["kl"]
    assert check_alarms([row(kl=0.15)], GuardConfig(), kl_target=0.1) == []
    assert [a["alarm"] for a in check_alarms([row(kl=0.25)], GuardConfig(), kl_target=0.1)] == ["kl"]
    assert check_alarms([row(kl=5.0)], GuardConfig()) == []  # no kl_max, fixed β: no KL alarm


def test_length_drift_both_ways_and_repetition():
    cfg = GuardConfig(length_drift=0.5)
    assert [a["alarm"] for a in check_alarms([row(length=10), row(length=16)], cfg)] == ["length"]
    assert [a["alarm"] for a in check_alarms([row(length=10), row(length=4)], cfg)] == ["length"]
    assert check_alarms([row(length=10), row(length=14)], cfg) == []
    assert [a["alarm"] for a in check_alarms([row(rep=0.7)], cfg)] == ["repetition"]


def test_reward_up_while_judge_down_is_reward_hacking():
    hacked = [row(score=0.1 * i, judge=1.0 - 0.1 * i) for i in range(6)]
    alarms = check_alarms(hacked, GuardConfig(judge_window=6))
    assert [a["alarm"] for a in alarms] == ["judge"] and "judge fell" in alarms[0]["message"]
    assert check_alarms(hacked[:5], GuardConfig(judge_window=6)) == []  # window not full yet
    noise = [row(score=0.1 * i, judge=0.5 - 0.002 * i) for i in range(6)]  # the judge barely moves
    assert check_alarms(noise, GuardConfig(judge_window=6, judge_tolerance=0.02)) == []
    no_judge = [row(score=0.1 * i) for i in range(6)]
    assert check_alarms(no_judge, GuardConfig(judge_window=6)) == []


def test_early_stop_needs_patience_consecutive_alarms():
    cfg = GuardConfig(early_stop=True, patience=2)
    assert not should_stop([1, 0, 1], cfg) and should_stop([0, 1, 2], cfg)
    assert not should_stop([3, 3], GuardConfig(early_stop=False, patience=2))


def test_collapse_onto_few_phrasings_is_a_diversity_alarm():
    cfg = GuardConfig(diversity_drop=0.3)
    assert check_alarms([row(distinct=0.9), row(distinct=0.7)], cfg) == []
    alarms = check_alarms([row(distinct=0.9), row(distinct=0.4)], cfg)
    assert [a["alarm"] for a in alarms] == ["diversity"] and "56%" in alarms[0]["message"]
