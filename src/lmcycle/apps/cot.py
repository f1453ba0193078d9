"""Chain-of-thought prompting: few-shot reasoning exemplars, answer extraction, self-consistency.

- The prompt (Wei et al., 2022) shows worked examples ``Q: ... A: <reasoning> The answer is N.`` before the
  question; :data:`COT_EXEMPLARS` are four of the paper's GSM8K exemplars, and :func:`gsm8k_exemplars` makes
  exemplars from GSM8K training solutions. ``shots=0`` is zero-shot CoT ("Let's think step by step.").
- :func:`extract_cot_answer` reads ``The answer is N`` first, then GSM8K's ``#### N``, then the last number.
- :func:`self_consistency` (Wang et al., 2023) samples ``n`` reasoning paths and majority-votes their answers
  (ties: the answer reached first); paths without an answer do not vote.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from lmcycle.data.examples import Example
from lmcycle.data.templates import PromptTemplate
from lmcycle.errors import LmcycleError
from lmcycle.evals.gsm8k import extract_answer
from lmcycle.models.generate import DecodingConfig

COT_TEMPLATE = PromptTemplate(input_format="Q: {input}", target_prefix="A:")
ZERO_SHOT_TRIGGER = "Let's think step by step."
STOP = ["\nQ:", "\n\nQ:"]

COT_EXEMPLARS = [
    Example("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are "
            "done, there will be 21 trees. How many trees did the grove workers plant today?",
            ["There are 15 trees originally. Then there were 21 trees after some more were planted. So there "
             "must have been 21 - 15 = 6. The answer is 6."]),
    Example("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
            ["There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5."]),
    Example("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in "
            "total?", ["Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. "
                       "After eating 35, they had 74 - 35 = 39. The answer is 39."]),
    Example("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
            ["Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has "
             "23 - 15 dollars left. 23 - 15 is 8. The answer is 8."]),
]

_ANSWER_IS = re.compile(r"answer is[:\s]*\$?\s*(-?\d[\d,]*(?:\.\d+)?)", re.IGNORECASE)


def gsm8k_exemplars(examples: list[Example]) -> list[Example]:
    """CoT exemplars from GSM8K examples (:func:`lmcycle.data.gsm8k.load_gsm8k`): the worked solution, its
    ``#### N`` line rewritten as ``The answer is N.``"""
    out = []
    for ex in examples:
        reasoning, sep, answer = ex.target.rpartition("####")
        if not sep:
            raise LmcycleError(f"GSM8K example '{ex.id}' has no '#### answer' line", field="targets")
        text = " ".join(reasoning.split())
        out.append(Example(ex.input, [f"{text} The answer is {answer.strip()}."], id=ex.id))
    return out


def cot_prompt(question: str, shots: list[Example] | None = None) -> str:
    """A few-shot CoT prompt ending in ``A:`` (default: :data:`COT_EXEMPLARS`); ``shots=[]``: zero-shot CoT."""
    shots = COT_EXEMPLARS if shots is None else shots
    prompt = COT_TEMPLATE.render(Example(question, [""]), shots)
    return prompt if shots else f"{prompt} {ZERO_SHOT_TRIGGER}"


def extract_cot_answer(text: str) -> str | None:
    """The answer number as a string (commas removed): ``The answer is N``, else ``#### N``, else the last number."""
    found = _ANSWER_IS.search(text)
    if found:
        return _canonical(found.group(1))
    number = extract_answer(text)
    return None if number is None else _canonical(str(number))


def _canonical(number: str) -> str:
    number = number.replace(",", "")
    if "." in number:
        number = number.rstrip("0").rstrip(".")
    return number


@dataclass(frozen=True)
class Vote:
    answer: str | None
    votes: dict[str, int]
    samples: list[str]


def majority(answers: list[str | None]) -> tuple[str | None, dict[str, int]]:
    """The most frequent non-None answer (ties: the one that appears first) and every answer's count."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None, {}
    best = max(counts.values())
    winner = next(a for a in answers if a is not None and counts[a] == best)
    return winner, dict(counts)


def check_self_consistency(n: int, cfg: DecodingConfig) -> None:
    if n < 1:
        raise LmcycleError(f"self-consistency needs n >= 1, got {n}", field="n")
    if n > 1 and not cfg.do_sample:
        raise LmcycleError("self-consistency with n > 1 needs sampling (do_sample: true); greedy paths are all "
                           "the same", field="do_sample")


def self_consistency(llm, prompt: str, n: int, cfg: DecodingConfig,
                     extract: Callable[[str], str | None] = extract_cot_answer) -> Vote:
    """Sample ``n`` completions of ``prompt`` (``cfg.do_sample`` must be on) and majority-vote their answers."""
    check_self_consistency(n, cfg)
    samples = llm.complete([prompt] * n, cfg)  # prompt j samples with its own generator: n different paths
    answer, votes = majority([extract(s) for s in samples])
    return Vote(answer, votes, samples)
