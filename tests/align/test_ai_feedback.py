"""The feedback model's A/B arithmetic and its questions, with a scripted backend (the plumbing), and one real
in-process model (the path the recipe runs)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lmcycle.align.ai_feedback import (
    both_orders,
    choice_probability,
    clamp_cot,
    judge,
    parse_choice,
    position_bias,
)
from lmcycle.align.constitution import COT_ANSWER, Constitution, CritiquePrinciple, feedback_prompt

C = Constitution(critiques=(CritiquePrinciple("p", "\n\nCritiqueRequest: x\n\nCritique:",
                                              "\n\nRevisionRequest: y\n\nRevision:"),),
                 comparisons=("\nPlease choose the kinder response. Options:",),
                 cot_fewshot=("\n\nHuman: Consider ...\n\n{}\n (A) [[[a]]]\n (B) [[[b]]]\n\nAssistant: Let's think "
                              "step by step: (A) is kind.\n\nHuman:\nSo the answer is: (A)",))
PRINCIPLE = C.comparisons[0]


class LogprobScript:
    """A feedback model whose log-likelihood of each letter is a function of the prompt; records the asks."""

    def __init__(self, logps, reasoning="(B) seems kinder."):
        self.logps, self.reasoning, self.asked, self.completed = logps, reasoning, [], []
        self.name = "script"

    def continuation_logprobs(self, prompt, continuations):
        self.asked.append((prompt, tuple(continuations)))
        return list(self.logps(prompt))

    def complete(self, prompts, cfg):
        self.completed.extend(prompts)
        return [self.reasoning for _ in prompts]


def test_the_ab_arithmetic_against_a_hand_computation():
    la, lb = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -0.5])
    p = choice_probability(la, lb)
    hand = [math.exp(-1) / (math.exp(-1) + math.exp(-2)), math.exp(-3) / (math.exp(-3) + math.exp(-0.5))]
    assert p.tolist() == pytest.approx(hand)
    fwd, swp = torch.tensor([0.9, 0.6]), torch.tensor([0.3, 0.6])
    assert both_orders(fwd, swp).tolist() == pytest.approx([(0.9 + 0.7) / 2, (0.6 + 0.4) / 2])
    assert position_bias(fwd, swp) == pytest.approx((0.9 + 0.6 + 0.3 + 0.6) / 4 - 0.5)
    assert clamp_cot(torch.tensor([0.01, 0.55, 0.99])).tolist() == pytest.approx([0.4, 0.55, 0.6])


def test_judge_asks_both_orders_and_averages():
    # The model prefers whichever option holds "kind", and also leans to (A) by 0.5 nats.
    def logps(prompt):
        tail = prompt.rsplit("Options:", 1)[1]
        a_kind = tail.index("kind") < tail.index("(B)")
        return (0.5 + (0.0 if a_kind else -2.0), 0.0 if not a_kind else -2.0)

    fb = LogprobScript(logps)
    j = judge(fb, C, "Say hi", "kind words", "rude words", PRINCIPLE)
    assert [a[0] for a in fb.asked] == [feedback_prompt(C, "Say hi", "kind words", "rude words", PRINCIPLE),
                                        feedback_prompt(C, "Say hi", "rude words", "kind words", PRINCIPLE)]
    assert all(a[1] == (" (A)", " (B)") for a in fb.asked)
    fwd, swp = 1 / (1 + math.exp(-2.5)), 1 / (1 + math.exp(-(0.5 - 2.0) + 0.0))
    assert (j.p_a_forward, j.p_a_swapped) == pytest.approx((fwd, 1 / (1 + math.exp(1.5))))
    assert j.p_first == pytest.approx((fwd + 1 - swp) / 2) and j.scoring == "likelihood"
    assert j.p_first > 0.5


def test_chain_of_thought_reasons_first_then_scores_and_clamps():
    fb = LogprobScript(lambda prompt: (-10.0, -0.01))  # always sure of (B)
    j = judge(fb, C, "Say hi", "one", "two", PRINCIPLE, cot=True)
    assert len(fb.completed) == 2 and all(p.endswith("Let's think step by step:") for p in fb.completed)
    assert fb.completed[0].startswith("\n\nHuman: Consider ...\n\n" + PRINCIPLE)  # principle filled in at {}
    assert all(a[0].endswith(" (B) seems kinder." + COT_ANSWER) for a in fb.asked)
    # (B) wins both orders: the first response is better once of two asks: 0.5, inside the clamp
    assert j.p_first == pytest.approx(0.5) and j.reasoning == ("(B) seems kinder.", "(B) seems kinder.")
    fb2 = LogprobScript(lambda prompt: (-10.0, -0.01) if "[[[two]]]\n (B)" in prompt else (-0.01, -10.0))
    assert judge(fb2, C, "Say hi", "one", "two", PRINCIPLE, cot=True).p_first == pytest.approx(0.6)


def test_letter_fallback_parses_the_answer_when_there_are_no_logprobs():
    class LettersOnly:
        name = "letters"

        def __init__(self):
            self.prompts = []

        def complete(self, prompts, cfg):
            self.prompts.extend(prompts)
            return [" (A)", " B, because"]

    j = judge(LettersOnly(), C, "q", "x", "y", PRINCIPLE)
    # forward picked (A) = first; swapped picked (B) = first again
    assert (j.p_first, j.scoring) == (1.0, "letter")
    assert [parse_choice(t) for t in (" (B) yes", "A.", "neither", "The answer is (A)")] == [1, 0, None, 0]


def test_a_real_model_judges_with_finite_probabilities(tok):
    from tiny_lm import tiny_llama

    from lmcycle.apps.llm import LocalLLM

    j = judge(LocalLLM(tiny_llama(tok), tok), C, "Say hi", "hello there", "go away", PRINCIPLE)
    assert 0 < j.p_a_forward < 1 and 0 < j.p_a_swapped < 1 and 0 < j.p_first < 1


class Flaky(LogprobScript):
    """Fails its first ``failures`` calls as a dropped connection would."""

    def __init__(self, failures):
        super().__init__(lambda prompt: (-1.0, -2.0))
        self.failures = failures

    def continuation_logprobs(self, prompt, continuations):
        if self.failures:
            self.failures -= 1
            raise ConnectionError("connection reset")
        return super().continuation_logprobs(prompt, continuations)


def _stage_cfg(retries):
    from lmcycle.stages.ai_feedback import AiFeedbackStage

    return AiFeedbackStage(prompts="p", constitution="c.yaml", retries=retries)


def test_a_failing_endpoint_is_retried_then_stops_keeping_what_was_judged(tmp_path, monkeypatch):
    from lmcycle.errors import LmcycleError
    from lmcycle.stages import ai_feedback as stage

    monkeypatch.setattr(stage.time, "sleep", lambda s: None)
    journal = stage.Journal(tmp_path / "journal.jsonl", "fp1")
    j, scoring = stage._judge_with_retries(Flaky(2), C, "q", "x", "y", PRINCIPLE, _stage_cfg(2), "auto", journal)
    assert scoring == "auto" and j.p_a_forward == pytest.approx(1 / (1 + math.exp(-1)))
    journal.add("policy:a", j)
    with pytest.raises(LmcycleError, match="failed 3 times.*1 judgements made so far are kept") as e:
        stage._judge_with_retries(Flaky(5), C, "q", "x", "y", PRINCIPLE, _stage_cfg(2), "auto", journal)
    assert e.value.field == "feedback_model"
    # the next run with the same settings resumes from the journal; a torn last line and other settings are not read
    with (tmp_path / "journal.jsonl").open("a") as f:
        f.write('{"fingerprint": "fp1", "key": "policy:b", "judg')
    assert stage.Journal(tmp_path / "journal.jsonl", "fp1").done == {"policy:a": j}
    assert len(stage.Journal(tmp_path / "journal.jsonl", "other")) == 0


def test_auto_scoring_falls_back_to_letters_when_the_endpoint_has_no_logprobs():
    from lmcycle.apps.llm import NoLogprobs
    from lmcycle.errors import LmcycleError
    from lmcycle.stages import ai_feedback as stage

    class LettersOnly(LogprobScript):
        def continuation_logprobs(self, prompt, continuations):
            raise NoLogprobs("the endpoint returned no log-probs", field="backend")

        def complete(self, prompts, cfg):
            return [" (B)" for _ in prompts]

    j, scoring = stage._judge_with_retries(LettersOnly(None), C, "q", "x", "y", PRINCIPLE, _stage_cfg(0), "auto",
                                           stage.Journal(Path("/nonexistent/j"), "fp"))
    assert (scoring, j.scoring, j.p_first) == ("letter", "letter", 0.5)
    assert stage._scoring_said([j], "auto").startswith("letter (the endpoint gives no log-probs")
    with pytest.raises(LmcycleError, match="no log-probs"):
        stage._judge_with_retries(LettersOnly(None), C, "q", "x", "y", PRINCIPLE, _stage_cfg(0), "likelihood",
                                  stage.Journal(Path("/nonexistent/j"), "fp"))


def test_human_agreement_counts_ties_half_and_brackets_its_estimate():
    from lmcycle.align.ai_feedback import human_agreement

    s = human_agreement([0.9, 0.2, 0.5, 0.7], resamples=500, seed=1)
    assert s.values["agreement"] == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert s.values["mean_p_chosen"] == pytest.approx(0.575)
    assert s.values["ci_low"] <= s.values["agreement"] <= s.values["ci_high"]
    assert s.settings["resamples"] == 500 and len(s.per_example) == 4
