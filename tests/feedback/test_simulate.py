"""Simulated labelers' rankings: the oracle's order through noise, ties, not-rankable, random labelers."""

import random

import pytest

from lmcycle.feedback.simulate import SimulatedLabeler, oracle_score, simulated_label

REF = "Tom will buy the tickets for the concert on Friday."
TASK = {"completions": [{"id": "far", "text": "The weather is nice."},
                        {"id": "close", "text": "Tom will buy the concert tickets on Friday."},
                        {"id": "mid", "text": "Tom buys something."},
                        {"id": "far2", "text": "The weather is nice!"}]}


def test_oracle_is_rouge_l_against_the_reference():
    assert oracle_score(REF, REF) == pytest.approx(1.0)
    assert oracle_score("nothing shared here", REF) == 0.0
    assert 0 < oracle_score("Tom buys something.", REF) < oracle_score("Tom will buy the concert tickets.", REF)


def test_noise_free_labeler_ranks_by_the_oracle_with_ties():
    label = simulated_label(SimulatedLabeler("a", "pw"), TASK, REF, random.Random(0))
    # "far" and "far2" score the same (punctuation is not a token): one tie group, last
    assert label == {"ranking": [["close"], ["mid"], ["far", "far2"]], "special": None, "reason": ""}


def test_all_equal_completions_are_not_rankable_with_a_reason():
    task = {"completions": [{"id": "x", "text": "The weather is nice."}, {"id": "y", "text": "The weather is nice!"}]}
    label = simulated_label(SimulatedLabeler("a", "pw"), task, REF, random.Random(0))
    assert label["ranking"] is None and label["special"] == "not_rankable" and label["reason"]


def test_noise_reorders_sometimes_and_random_labeler_ignores_the_text():
    noisy = SimulatedLabeler("n", "pw", noise=0.3)
    orders = {str(simulated_label(noisy, TASK, REF, random.Random(s))["ranking"]) for s in range(30)}
    assert len(orders) > 1  # noise changes the order
    rnd = SimulatedLabeler("r", "pw", random=True)
    firsts = [simulated_label(rnd, TASK, REF, random.Random(s)) for s in range(60)]
    tops = {cid for lab in firsts if lab["ranking"] for cid in lab["ranking"][0]}
    assert tops == {"far", "close", "mid", "far2"}  # every completion comes first at times
    for lab in firsts:
        if lab["ranking"]:
            assert sorted(c for g in lab["ranking"] for c in g) == sorted(c["id"] for c in TASK["completions"])
    again = [simulated_label(rnd, TASK, REF, random.Random(s)) for s in range(60)]
    assert again == firsts  # seeded
