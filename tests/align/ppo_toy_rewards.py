"""Reward functions the PPO stage tests name as ``ppo_toy_rewards:<name>`` (a stage imports its reward by name)."""

from __future__ import annotations

CALLS = {"n": 0, "fail_at": None}


def vowel_a_or_e(prompts: list[str], responses: list[str]) -> list[float]:
    """1 when the response contains an 'a' or an 'e': half the tiny vocabulary, learnable in a few rollouts."""
    return [float(any(c in r for c in "ae")) for r in responses]


def length(prompts: list[str], responses: list[str]) -> list[float]:
    """Longer is better: the textbook reward to hack."""
    return [float(len(r)) for r in responses]


def negative_length(prompts: list[str], responses: list[str]) -> list[float]:
    return [-float(len(r)) for r in responses]


def flaky(prompts: list[str], responses: list[str]) -> list[float]:
    """Like vowel_a_or_e, but raises once on call number ``CALLS['fail_at']`` (a crash in the middle of a run)."""
    CALLS["n"] += 1
    if CALLS["n"] == CALLS["fail_at"]:
        raise RuntimeError("simulated crash")
    return vowel_a_or_e(prompts, responses)


def nan_reward(prompts: list[str], responses: list[str]) -> list[float]:
    return [float("nan")] * len(responses)


def one_too_few(prompts: list[str], responses: list[str]) -> list[float]:
    return [0.0] * (len(responses) - 1)
