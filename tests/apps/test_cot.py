"""Chain-of-thought: prompts, answer extraction, majority vote, self-consistency."""

from __future__ import annotations

import pytest

from lmcycle.apps.cot import (
    COT_EXEMPLARS,
    ZERO_SHOT_TRIGGER,
    cot_prompt,
    extract_cot_answer,
    gsm8k_exemplars,
    majority,
    self_consistency,
)
from lmcycle.data.examples import Example
from lmcycle.errors import LmcycleError
from lmcycle.models.generate import DecodingConfig


@pytest.mark.parametrize("text, want", [
    ("5 + 3 = 8. The answer is 8.", "8"),
    ("so 1,080 cookies. The answer is: $1,080.00", "1080"),
    ("The answer is 12.50 dollars", "12.5"),
    ("first 3, then 4 and the answer is -7 because", "-7"),
    ("steps 2 3\n#### 42\nmore 5", "42"),
    ("no marker but 3 then 9", "9"),
    ("no number at all", None),
])
def test_answer_extraction(text, want):
    assert extract_cot_answer(text) == want


def test_prompts_show_the_exemplars_then_the_question():
    prompt = cot_prompt("How many legs do 3 cats have?")
    assert prompt.startswith("Q: " + COT_EXEMPLARS[0].input)
    assert prompt.endswith("Q: How many legs do 3 cats have?\nA:")
    assert all(ex.target in prompt for ex in COT_EXEMPLARS)
    zero = cot_prompt("What is 2 + 2?", shots=[])
    assert zero == f"Q: What is 2 + 2?\nA: {ZERO_SHOT_TRIGGER}"


def test_gsm8k_solutions_become_exemplars():
    ex = Example("Q?", ["She has 3 + 4 = 7 apples.\nThen 7 * 2 = 14.\n#### 14"], id="x")
    (shot,) = gsm8k_exemplars([ex])
    assert shot.target == "She has 3 + 4 = 7 apples. Then 7 * 2 = 14. The answer is 14."
    with pytest.raises(LmcycleError, match="no '#### answer'"):
        gsm8k_exemplars([Example("Q?", ["no final line"], id="y")])


def test_majority_vote_ties_go_to_the_first_reached():
    assert majority(["3", None, "5", "5", "3"]) == ("3", {"3": 2, "5": 2})
    assert majority(["4", "5", "5"]) == ("5", {"4": 1, "5": 2})
    assert majority([None, None]) == (None, {})


def test_self_consistency_samples_n_paths_and_votes(scripted):
    llm = scripted(["... The answer is 6.", "... The answer is 7.", "garbled", "... The answer is 7."])
    cfg = DecodingConfig(do_sample=True, temperature=0.7)
    vote = self_consistency(llm, "PROMPT", 4, cfg)
    assert (vote.answer, vote.votes) == ("7", {"6": 1, "7": 2})
    assert llm.prompts == ["PROMPT"] * 4 and len(vote.samples) == 4
    with pytest.raises(LmcycleError, match="needs sampling"):
        self_consistency(llm, "PROMPT", 3, DecodingConfig())
