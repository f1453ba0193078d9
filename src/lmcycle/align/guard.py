"""Reward-hacking guard: what an RL stage logs every rollout, and the alarms that say the policy is gaming its reward.

The course's warning: a policy can learn to produce text that scores high and means nothing ("most awesome, most
incredible ..."). The signals, each logged for every rollout by the PPO stage:

- **KL to the reference** rising past its band: the policy has left the language the reference model speaks.
- **Response length** drifting far from where it started: lengthening or collapsing to score.
- **Repetition and collapse**: the share of repeated 3-grams inside a response, and distinct-2 over the rollout
  falling (every prompt getting the same few words: mode collapse, which a classifier reward invites).
- **Reward up while a held-out judge goes down**: the reward is being exploited, not earned.

:func:`check_alarms` turns the history of rollout rows into alarms; the stage logs each one and, with
``early_stop``, ends training after ``patience`` consecutive rollouts with an alarm.
"""

from __future__ import annotations

from pydantic import Field

from lmcycle.config import Config


class GuardConfig(Config):
    """Thresholds of the reward-hacking alarms (None switches an alarm off)."""

    kl_max: float | None = Field(None, gt=0, description="mean per-token KL (k1, nats); None: 2 x kl.target "
                                                         "when the KL controller is adaptive, else off")
    length_drift: float | None = Field(0.5, gt=0, description="relative change of the mean response length "
                                                              "from the first rollout")
    repetition_max: float | None = Field(0.5, gt=0, le=1, description="share of repeated 3-grams in a response")
    diversity_drop: float | None = Field(0.3, gt=0, le=1, description="relative fall of distinct-2 over the "
                                                                      "rollout from the first rollout")
    judge_window: int = Field(6, ge=2, description="rollouts compared: first half vs second half")
    judge_tolerance: float = Field(0.02, ge=0, description="a judge fall smaller than this (in the judge's units) "
                                                           "is noise, not an alarm")
    early_stop: bool = False
    patience: int = Field(2, ge=1, description="consecutive rollouts with an alarm before an early stop")


def distinct_n(responses: list[list[int]], n: int) -> float:
    """Distinct n-grams over all n-grams of a batch of token sequences (1.0: nothing repeats; 0 when none)."""
    grams = [tuple(r[i:i + n]) for r in responses for i in range(len(r) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition(responses: list[list[int]], n: int = 3) -> float:
    """Mean, over responses, of the share of a response's n-grams that repeat an earlier one of that response."""
    shares = []
    for r in responses:
        grams = [tuple(r[i:i + n]) for i in range(len(r) - n + 1)]
        shares.append(1.0 - len(set(grams)) / len(grams) if grams else 0.0)
    return sum(shares) / len(shares) if shares else 0.0


def _halves_delta(values: list[float]) -> float:
    half = len(values) // 2
    return sum(values[half:]) / (len(values) - half) - sum(values[:half]) / half


def check_alarms(history: list[dict], cfg: GuardConfig, kl_target: float | None = None) -> list[dict]:
    """Alarms raised by the newest rollout row of ``history`` (oldest first), each ``{"alarm", "message"}``.

    Rows hold ``score`` (mean reward-model score), ``kl`` (mean per-token k1), ``response_len``, ``repetition``,
    ``distinct_2`` and, when a judge is set, ``judge``.
    """
    if not history:
        return []
    now, first = history[-1], history[0]
    alarms = []
    kl_max = cfg.kl_max if cfg.kl_max is not None else (2 * kl_target if kl_target else None)
    if kl_max is not None and now["kl"] > kl_max:
        alarms.append({"alarm": "kl", "message": f"per-token KL {now['kl']:.3f} is above {kl_max:g}"})
    if cfg.length_drift is not None and first["response_len"] > 0:
        drift = now["response_len"] / first["response_len"] - 1
        if abs(drift) > cfg.length_drift:
            alarms.append({"alarm": "length", "message": f"mean response length {now['response_len']:.1f} moved "
                                                         f"{drift:+.0%} from {first['response_len']:.1f}"})
    if cfg.diversity_drop is not None and first.get("distinct_2") and now.get("distinct_2") is not None:
        fall = 1 - now["distinct_2"] / first["distinct_2"]
        if fall > cfg.diversity_drop:
            alarms.append({"alarm": "diversity", "message": f"distinct-2 fell {fall:.0%} to {now['distinct_2']:.2f}: "
                                                            "responses are collapsing onto a few phrasings"})
    if cfg.repetition_max is not None and now["repetition"] > cfg.repetition_max:
        alarms.append({"alarm": "repetition",
                       "message": f"{now['repetition']:.0%} of 3-grams repeat within a response"})
    window = history[-cfg.judge_window:]
    if len(window) == cfg.judge_window and all(row.get("judge") is not None for row in window):
        reward_delta = _halves_delta([row["score"] for row in window])
        judge_delta = _halves_delta([row["judge"] for row in window])
        if reward_delta > 0 and judge_delta < -cfg.judge_tolerance:
            alarms.append({"alarm": "judge", "message": f"reward rose by {reward_delta:.3f} while the judge fell by "
                                                        f"{-judge_delta:.3f} over the last {len(window)} rollouts"})
    return alarms


def should_stop(alarm_counts: list[int], cfg: GuardConfig) -> bool:
    """Early stop: the last ``patience`` rollouts (counts of alarms per rollout, oldest first) all raised one."""
    recent = alarm_counts[-cfg.patience:]
    return cfg.early_stop and len(recent) == cfg.patience and all(c > 0 for c in recent)
