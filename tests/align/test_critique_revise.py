"""SL-CAI's critique → revision rounds: the prompts of every round, with a scripted model (the plumbing)."""

from __future__ import annotations

import random

from lmcycle.align.constitution import Constitution, CritiquePrinciple, critique_prompt, revision_prompt
from lmcycle.stages.critique_revise import STOPS, critique_and_revise

C = Constitution(
    critiques=tuple(CritiquePrinciple(f"p{i}", f"\n\nCritiqueRequest: request {i}?\n\nCritique:",
                                      f"\n\nRevisionRequest: rewrite {i}.\n\nRevision:") for i in range(3)),
    comparisons=("\nPick. Options:",))


class Turns:
    """Answers by turn: the first answer, then critique k / revision k, counting calls; records everything."""

    def __init__(self, blank_revision_at: int | None = None):
        self.calls, self.name, self.blank_at = [], "turns", blank_revision_at

    def complete(self, prompts, cfg):
        self.calls.append((list(prompts), cfg))
        turn = next(t for t, stops in STOPS.items() if stops == cfg.stop)
        n = len(self.calls)
        if turn == "revision" and n == self.blank_at:
            return ["  " for _ in prompts]
        return [f"{turn}{n}-{i}" for i, _ in enumerate(prompts)]


def test_every_round_critiques_the_latest_revision_with_a_drawn_principle():
    from lmcycle.models.generate import DecodingConfig

    llm = Turns()
    prompts = ["How do I do a bad thing?", "Say something rude."]
    traces, finals, counts = critique_and_revise(llm, C, prompts, 2, DecodingConfig(do_sample=True), seed=7)
    rng = random.Random(7)
    drawn = [[rng.choice(C.critiques) for _ in prompts] for _ in range(2)]
    # calls: answer, then (critique, revision) per round
    assert len(llm.calls) == 5 and [c[1].stop for c in llm.calls] == [STOPS["answer"]] + [
        STOPS["critique"], STOPS["revision"]] * 2
    assert llm.calls[1][0] == [critique_prompt(C, p, f"answer1-{i}", drawn[0][i]) for i, p in enumerate(prompts)]
    assert llm.calls[2][0] == [revision_prompt(C, p, f"answer1-{i}", drawn[0][i], f"critique2-{i}")
                               for i, p in enumerate(prompts)]
    # round 2 critiques round 1's revision
    assert llm.calls[3][0] == [critique_prompt(C, p, f"revision3-{i}", drawn[1][i]) for i, p in enumerate(prompts)]
    assert finals == ["revision5-0", "revision5-1"]
    assert [(t["prompt"], t["round"], t["principle"], t["answer"], t["critique"], t["revision"]) for t in traces] == [
        (prompts[0], 0, drawn[0][0].id, "answer1-0", "critique2-0", "revision3-0"),
        (prompts[0], 1, drawn[1][0].id, "revision3-0", "critique4-0", "revision5-0"),
        (prompts[1], 0, drawn[0][1].id, "answer1-1", "critique2-1", "revision3-1"),
        (prompts[1], 1, drawn[1][1].id, "revision3-1", "critique4-1", "revision5-1")]
    assert counts["changed"] == 1.0 and counts["blank_revisions_kept"] == 0
    # every call samples with its own seed
    assert len({c[1].seed for c in llm.calls}) == 5


def test_a_blank_revision_keeps_the_previous_response():
    from lmcycle.models.generate import DecodingConfig

    llm = Turns(blank_revision_at=3)
    _, finals, counts = critique_and_revise(llm, C, ["q"], 1, DecodingConfig(do_sample=True), seed=0)
    assert finals == ["answer1-0"] and counts["blank_revisions_kept"] == 1 and counts["changed"] == 0.0
