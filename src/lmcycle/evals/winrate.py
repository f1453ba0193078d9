"""Win rate of one set of completions against another under a judge's scores, with a bootstrap interval.

For each prompt both sides completed, every (candidate, baseline) completion pair is a game: a win when the
candidate's score is higher, half a win when equal. The prompt's win rate is the mean over its games (k x k'
games for k and k' completions), the corpus's the mean over prompts, so each prompt weighs the same. The 95%
interval resamples prompts with replacement (percentile bootstrap), since prompts, not completions, are the
independent draws.
"""

from __future__ import annotations

import numpy as np

from lmcycle.errors import LmcycleError
from lmcycle.evals.score import Score


def prompt_win_rate(candidate: list[float], baseline: list[float]) -> float:
    """The share of (candidate, baseline) pairs the candidate wins, ties counting half."""
    c, b = np.asarray(candidate, dtype=float)[:, None], np.asarray(baseline, dtype=float)[None, :]
    return float(((c > b) + 0.5 * (c == b)).mean())


def win_rate(candidate: dict[str, list[float]], baseline: dict[str, list[float]], *, judge: str,
             resamples: int = 1000, seed: int = 0) -> Score:
    """``candidate[prompt_id]`` and ``baseline[prompt_id]`` are the judge's scores of each side's completions;
    prompts on one side only are left out (counted). Values: ``win_rate``, ``ci_low``, ``ci_high`` (95%),
    ``candidate_mean``, ``baseline_mean`` (mean score over prompts); per example, each prompt's win rate."""
    shared = [pid for pid in candidate if pid in baseline and candidate[pid] and baseline[pid]]
    if not shared:
        raise LmcycleError("no prompt has completions on both sides to compare", field="baseline")
    rates = np.array([prompt_win_rate(candidate[pid], baseline[pid]) for pid in shared])
    rng = np.random.default_rng(seed)
    boot = rates[rng.integers(0, len(rates), size=(resamples, len(rates)))].mean(axis=1)
    values = {"win_rate": float(rates.mean()), "ci_low": float(np.percentile(boot, 2.5)),
              "ci_high": float(np.percentile(boot, 97.5)),
              "candidate_mean": float(np.mean([np.mean(candidate[pid]) for pid in shared])),
              "baseline_mean": float(np.mean([np.mean(baseline[pid]) for pid in shared]))}
    settings = {"judge": judge, "prompts": len(shared), "left_out": len(set(candidate) ^ set(baseline)),
                "ties": "count half", "games": "every candidate x baseline completion pair of a prompt",
                "interval": "95% percentile bootstrap over prompts", "resamples": resamples, "seed": seed}
    return Score(values, settings, per_example=[{"prompt_win_rate": float(r)} for r in rates])
