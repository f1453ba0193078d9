"""AI feedback for RL-CAI (Bai et al., 2022, section 4): a feedback model says which of two responses better
follows a comparison principle, as multiple choice scored by the log-likelihood of ``" (A)"`` vs ``" (B)"``.

Each pair is asked in both orders and the two answers averaged, which cancels the feedback model's preference
for a position (measured: :func:`position_bias`); with chain-of-thought feedback the probabilities are clamped
to [0.4, 0.6], as the paper does, because reasoning makes them near 0 or 1 and a preference model trained on
such targets is overconfident. The result is a soft label: the probability that the first response is better.

A backend without log-probs (an endpoint that returns none) falls back to generating the answer and parsing its
letter (:func:`parse_choice`), each order giving 0 or 1; the labels then say ``scoring: letter``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from lmcycle.align.constitution import LETTERS, Constitution, cot_answer_prompt, cot_prompt, feedback_prompt
from lmcycle.errors import LmcycleError
from lmcycle.evals.score import Score
from lmcycle.models.generate import DecodingConfig

COT_CLAMP = (0.4, 0.6)


# -- the arithmetic --------------------------------------------------------------------------------------------


def choice_probability(logp_a: torch.Tensor, logp_b: torch.Tensor) -> torch.Tensor:
    """P(answer (A)) with the two options' log-likelihoods renormalised between them: ``softmax([a, b])[0]``.

    logp_a, logp_b: (N,) summed log-probabilities of ``" (A)"`` and ``" (B)"``. Returns (N,).
    """
    return torch.sigmoid(logp_a - logp_b)


def both_orders(p_a_forward: torch.Tensor, p_a_swapped: torch.Tensor) -> torch.Tensor:
    """P(the first response is better), averaging the question asked with it at (A) and asked with it at (B).

    p_a_forward: (N,) P(A) with the first response at (A); p_a_swapped: (N,) P(A) with the second at (A).
    Returns (N,): ``(p_a_forward + 1 - p_a_swapped) / 2``.
    """
    return (p_a_forward + 1 - p_a_swapped) / 2


def position_bias(p_a_forward: torch.Tensor, p_a_swapped: torch.Tensor) -> float:
    """Mean P(A) over every question asked, minus 0.5: 0 for a model indifferent to position, > 0 when it
    favours whatever comes first. Both orders of each pair hold the same responses, so content cancels."""
    return float(torch.cat([p_a_forward, p_a_swapped]).mean() - 0.5)


def clamp_cot(p: torch.Tensor, bounds: tuple[float, float] = COT_CLAMP) -> torch.Tensor:
    """Chain-of-thought probabilities clamped into ``bounds`` (the paper's 40-60%)."""
    return p.clamp(*bounds)


def parse_choice(text: str) -> int | None:
    """0 for (A), 1 for (B), from the first option letter of a generated answer; None when there is none."""
    m = re.search(r"\(([AB])\)", text) or re.match(r"\s*([AB])\b", text)
    return None if m is None else "AB".index(m.group(1))


# -- one pair, through a backend -------------------------------------------------------------------------------


@dataclass
class Judgement:
    """The feedback model on one pair: the soft label and everything that made it."""

    p_first: float  # P(the first response is better), both orders averaged (clamped with CoT)
    p_a_forward: float
    p_a_swapped: float
    scoring: str  # "likelihood" or "letter"
    reasoning: tuple[str, str] = ("", "")  # chain-of-thought text, forward and swapped


def judge(llm, constitution: Constitution, prompt: str, first: str, second: str, principle: str, *,
          cot: bool = False, cot_decoding: DecodingConfig | None = None, letters_only: bool = False) -> Judgement:
    """Ask ``llm`` (anything with ``continuation_logprobs``, else ``complete``: :mod:`lmcycle.apps.llm`) which
    of ``first`` and ``second`` better follows ``principle``, in both orders. ``letters_only`` (or a backend
    without ``continuation_logprobs``) generates the answer and parses its letter instead of scoring both."""
    orders = ((first, second), (second, first))
    if cot:
        contexts = [cot_prompt(constitution, prompt, a, b, principle) for a, b in orders]
        decoding = cot_decoding or DecodingConfig(max_new_tokens=128, stop=["\n\nHuman:"])
        reasoning = tuple(llm.complete(contexts, decoding))
        contexts = [cot_answer_prompt(c, r) for c, r in zip(contexts, reasoning, strict=True)]
    else:
        contexts = [feedback_prompt(constitution, prompt, a, b, principle) for a, b in orders]
        reasoning = ("", "")
    if letters_only or not hasattr(llm, "continuation_logprobs"):
        picks = [parse_choice(t) for t in llm.complete(contexts, DecodingConfig(max_new_tokens=4))]
        # An unparsable answer is no preference: 0.5 for that order.
        pa = torch.tensor([0.5 if p is None else float(p == 0) for p in picks])
        scoring = "letter"
    else:
        logps = torch.tensor([llm.continuation_logprobs(c, list(LETTERS)) for c in contexts])  # (2, 2)
        pa = choice_probability(logps[:, 0], logps[:, 1])
        scoring = "likelihood"
    p_first = both_orders(pa[:1], pa[1:])
    if cot:
        p_first = clamp_cot(p_first)
    return Judgement(float(p_first), float(pa[0]), float(pa[1]), scoring, reasoning)


# -- agreement with human choices ------------------------------------------------------------------------------


def human_agreement(p_chosen: list[float], *, resamples: int = 1000, seed: int = 0) -> Score:
    """How often the AI labels agree with human choices: ``p_chosen[i]`` is the feedback model's P(the human's
    chosen reply is better) on pair ``i``. Values: ``agreement`` (share above 0.5, exactly 0.5 counting half),
    ``ci_low`` / ``ci_high`` (95% percentile bootstrap over pairs), ``mean_p_chosen``; per example, each pair's
    probability (what the report's calibration plot bins)."""
    if not p_chosen:
        raise LmcycleError("no human pairs to compare the AI labels with", field="human_pairs")
    p = np.asarray(p_chosen, dtype=float)
    hits = (p > 0.5) + 0.5 * (p == 0.5)
    rng = np.random.default_rng(seed)
    boot = hits[rng.integers(0, len(hits), size=(resamples, len(hits)))].mean(axis=1)
    values = {"agreement": float(hits.mean()), "ci_low": float(np.percentile(boot, 2.5)),
              "ci_high": float(np.percentile(boot, 97.5)), "mean_p_chosen": float(p.mean())}
    settings = {"pairs": len(p), "ties": "p = 0.5 counts half", "interval": "95% percentile bootstrap over pairs",
                "resamples": resamples, "seed": seed}
    return Score(values, settings, per_example=[{"p_chosen": float(x)} for x in p])
