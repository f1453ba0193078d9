"""A constitution for Constitutional AI (Bai et al., 2022): principles, few-shot examples and the prompts built
from them, in the paper's own format.

A :class:`Constitution` holds

- ``critiques``: (critique request, revision request) principle pairs for SL-CAI's critique → revision rounds;
- ``comparisons``: the RL-CAI feedback model's multiple-choice principles ("Please choose the response that ...
  Options:");
- few-shot demonstrations for each: worked critique/revision transcripts, labelled comparisons, and
  chain-of-thought comparisons.

:func:`load_constitution` reads the paper's files (its ``prompts/`` folder, the default: never copied into this
repository) or a user's YAML/JSON file of the same content, and checks it; :attr:`Constitution.hash` goes with
every artifact made from it. The prompt builders below are the whole of the paper's prompt format, so a test can
hold them against the paper's own worked samples.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lmcycle.config import line_for, load_yaml
from lmcycle.errors import LmcycleError

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
# The paper's RL-CAI prompt (section 4.1), as its 438 HHH evaluations spell it.
CONSIDER = "\n\nConsider the following conversation between a human and an assistant:"
ANSWER = "\n\nThe answer is:"
LETTERS = (" (A)", " (B)")
# Chain-of-thought feedback (section 4.1): the reasoning is asked for as the assistant of a dialogue, and the
# answer is then scored after this turn, as the paper's CoT few-shots end.
COT_START = "\n\nAssistant: Let's think step by step:"
COT_ANSWER = "\n\nHuman:\nSo the answer is:"

PAPER_FILES = {
    "critiques": "CritiqueRevisionInstructions.json",
    "critique_fewshot": "CritiqueRevisionFewShotPrompts.json",
    "comparisons": "RLMadisonInstructions.json",
    "feedback_fewshot": "RLMadisonFewShotPrompts.json",
    "cot_fewshot": "RLMadisonPrecogFewShotPrompts.json",
}


@dataclass(frozen=True)
class CritiquePrinciple:
    """One SL-CAI principle: the request for a critique and the request for the revision that follows it (both
    in the paper's form, ``"\\n\\nCritiqueRequest: ...\\n\\nCritique:"`` and ``"...\\n\\nRevision:"``)."""

    id: str
    critique: str
    revision: str


@dataclass(frozen=True)
class FeedbackExample:
    """A labelled comparison for the feedback model's few-shot prompt: ``prompt`` is a conversation ending in
    ``"\\n\\nAssistant:"``, ``better`` and ``worse`` its two replies."""

    prompt: str
    better: str
    worse: str


@dataclass(frozen=True)
class Constitution:
    critiques: tuple[CritiquePrinciple, ...]
    comparisons: tuple[str, ...]
    critique_fewshot: tuple[str, ...] = ()
    feedback_fewshot: tuple[FeedbackExample, ...] = ()
    cot_fewshot: tuple[str, ...] = ()
    source: str = ""  # where it was read from (not part of the hash)

    @property
    def hash(self) -> str:
        """sha256 (first 16 hex digits) of the content, not of the file: the same principles and examples hash
        alike whether read from the paper's JSON files or a user's YAML."""
        content = {k: v for k, v in asdict(self).items() if k != "source"}
        return hashlib.sha256(json.dumps(content, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]

    def principle(self, principle_id: str) -> CritiquePrinciple:
        for p in self.critiques:
            if p.id == principle_id:
                return p
        raise KeyError(principle_id)


# -- loading ---------------------------------------------------------------------------------------------------


def load_constitution(path: str | Path) -> Constitution:
    """The constitution at ``path``: the paper's folder (``constitutional_ai/`` or its ``prompts/``, holding
    :data:`PAPER_FILES`) or a YAML/JSON file::

        critiques: [{id: harm, critique: "\\n\\nCritiqueRequest: ...\\n\\nCritique:",
                     revision: "\\n\\nRevisionRequest: ...\\n\\nRevision:"}, ...]
        comparisons: ["\\nPlease choose the response that ... Options:", ...]
        critique_fewshot: ["\\n\\nHuman: ...\\n\\nAssistant: ...CritiqueRequest: ...Revision: ..."]   # optional
        feedback_fewshot: [{prompt: "\\n\\nHuman: ...\\n\\nAssistant:", better: "...", worse: "..."}]  # optional
        cot_fewshot: ["...{}...So the answer is: (A)"]                                              # optional

    Every problem is an :class:`LmcycleError` naming the file, the line (YAML) and the field.
    """
    path = Path(path)
    if path.is_dir():
        folder = path / "prompts" if (path / "prompts").is_dir() else path
        return _paper_constitution(folder)
    if not path.is_file():
        raise LmcycleError("no constitution here: give the paper's constitutional_ai folder or a YAML/JSON file",
                           file=str(path), field="constitution")
    if path.suffix == ".json":
        try:
            data, lines = json.loads(path.read_text(encoding="utf-8")), {}
        except json.JSONDecodeError as e:
            raise LmcycleError(f"invalid JSON: {e.msg}", file=str(path), line=e.lineno) from None
    else:
        data, lines = load_yaml(path)
    if not isinstance(data, dict):
        raise LmcycleError("a constitution is a mapping (critiques, comparisons, ...)", file=str(path), line=1)
    return _from_mapping(data, str(path), lines)


def _paper_constitution(folder: Path) -> Constitution:
    data: dict[str, Any] = {}
    for key, name in PAPER_FILES.items():
        file = folder / name
        if not file.is_file():
            raise LmcycleError(f"the paper's constitution folder lacks {name}", file=str(folder), field=key)
        data[key] = json.loads(file.read_text(encoding="utf-8"))
    # The paper's shapes: {id: {"prompt": [critique], "edit_request": revision}} and few-shots with
    # corrects/incorrects lists; turned into the user format so one checker reads both.
    raw = data["critiques"]
    data["critiques"] = [{"id": k, "critique": (v.get("prompt") or [None])[0] if isinstance(v, dict) else None,
                          "revision": v.get("edit_request") if isinstance(v, dict) else None}
                         for k, v in raw.items()]
    data["feedback_fewshot"] = [{"prompt": e.get("prompt"), "better": (e.get("corrects") or [None])[0],
                                 "worse": (e.get("incorrects") or [None])[0]} for e in data["feedback_fewshot"]]
    data["cot_fewshot"] = [e.get("prompt") if isinstance(e, dict) else e for e in data["cot_fewshot"]]
    return _from_mapping(data, str(folder), {})


def _from_mapping(data: dict, file: str, lines: dict) -> Constitution:
    def fail(message: str, *loc) -> LmcycleError:
        return LmcycleError(message, file=file, line=line_for(loc, lines),
                            field=".".join(str(x) for x in loc))

    unknown = sorted(set(data) - set(PAPER_FILES))
    if unknown:
        raise fail(f"unknown key (expected {', '.join(PAPER_FILES)})", unknown[0])

    def texts(key: str, required: bool) -> list[str]:
        value = data.get(key, [])
        if not isinstance(value, list):
            raise fail("expected a list", key)
        if required and not value:
            raise fail("is empty: a constitution needs at least one principle", key)
        for i, v in enumerate(value):
            if not isinstance(v, str) or not v.strip():
                raise fail("expected a non-empty string", key, i)
        return value

    raw = data.get("critiques", [])
    if not isinstance(raw, list):
        raise fail("expected a list of {id, critique, revision}", "critiques")
    if not raw:
        raise fail("is empty: a constitution needs at least one critique principle", "critiques")
    critiques = []
    for i, p in enumerate(raw):
        if not isinstance(p, dict):
            raise fail("expected a mapping {id, critique, revision}", "critiques", i)
        for key in ("id", "critique", "revision"):
            if not isinstance(p.get(key), str) or not p[key].strip():
                what = "its revision request" if key == "revision" else f"'{key}'"
                raise fail(f"a critique principle lacks {what}", "critiques", i, key)
        critiques.append(CritiquePrinciple(p["id"], p["critique"], p["revision"]))
    ids = [p.id for p in critiques]
    if len(set(ids)) < len(ids):
        dup = next(i for i, x in enumerate(ids) if ids.index(x) != i)
        raise fail(f"duplicate principle id '{ids[dup]}'", "critiques", dup, "id")
    comparisons = texts("comparisons", required=True)
    critique_fewshot = texts("critique_fewshot", required=False)
    for i, shot in enumerate(critique_fewshot):
        if not shot.lstrip("\n").startswith("Human:") or "Critique:" not in shot or "Revision:" not in shot:
            raise fail("a critique few-shot is a transcript '\\n\\nHuman: ...\\n\\nAssistant: ...' with its "
                       "'Critique:' and 'Revision:'", "critique_fewshot", i)
    feedback = []
    raw_feedback = data.get("feedback_fewshot", [])
    if not isinstance(raw_feedback, list):
        raise fail("expected a list of {prompt, better, worse}", "feedback_fewshot")
    for i, e in enumerate(raw_feedback):
        if not isinstance(e, dict):
            raise fail("expected a mapping {prompt, better, worse}", "feedback_fewshot", i)
        for key in ("prompt", "better", "worse"):
            if not isinstance(e.get(key), str) or not e[key].strip():
                raise fail("expected a non-empty string", "feedback_fewshot", i, key)
        if not e["prompt"].rstrip().endswith("Assistant:"):
            raise fail("a feedback few-shot prompt is a conversation ending in '\\n\\nAssistant:'",
                       "feedback_fewshot", i, "prompt")
        feedback.append(FeedbackExample(e["prompt"], e["better"], e["worse"]))
    cot = texts("cot_fewshot", required=False)
    for i, shot in enumerate(cot):
        if "{}" not in shot or not shot.rstrip().endswith(("(A)", "(B)")):
            raise fail("a chain-of-thought few-shot has '{}' where the principle goes and ends "
                       "'So the answer is: (A)' or '(B)'", "cot_fewshot", i)
    return Constitution(tuple(critiques), tuple(comparisons), tuple(critique_fewshot), tuple(feedback),
                        tuple(cot), source=file)


# -- SL-CAI: critique → revision -------------------------------------------------------------------------------


def conversation(prompt: str) -> str:
    """A red-team prompt as the paper's dialogue up to the assistant's turn: ``"\\n\\nHuman: ...\\n\\nAssistant:"``
    (a prompt already in that form, as HH-RLHF and the paper's samples give it, is kept)."""
    if prompt.rstrip().endswith("Assistant:") and HUMAN.strip() in prompt:
        return prompt.rstrip()
    return f"{HUMAN} {prompt.strip()}{ASSISTANT}"


def answer_prompt(constitution: Constitution, prompt: str) -> str:
    """What the model answers first: the critique few-shots (each a finished transcript, which the paper's
    files end with ``"\\n\\nHuman:"``, so they chain) and then the red-team conversation."""
    shots = "".join(s.removesuffix(HUMAN) for s in constitution.critique_fewshot)
    return shots + conversation(prompt)


def critique_prompt(constitution: Constitution, prompt: str, answer: str, principle: CritiquePrinciple) -> str:
    """The context after which the model writes its critique: ``answer`` (the latest response: the first
    answer, or the previous round's revision) followed by the principle's critique request."""
    return answer_prompt(constitution, prompt) + " " + answer.strip() + principle.critique


def revision_prompt(constitution: Constitution, prompt: str, answer: str, principle: CritiquePrinciple,
                    critique: str) -> str:
    """The context after which the model writes its revision: the critique context, the critique, and the
    principle's revision request."""
    return critique_prompt(constitution, prompt, answer, principle) + " " + critique.strip() + principle.revision


# -- RL-CAI: the feedback model's multiple choice --------------------------------------------------------------


def _dialogue(prompt: str) -> str:
    return conversation(prompt).removesuffix(ASSISTANT)


def choice_block(principle: str, first: str, second: str) -> str:
    """``principle`` and the two responses as the paper's options ``(A) [[[...]]]`` / ``(B) [[[...]]]``."""
    return f"\n\n{principle}\n (A) [[[{first.strip()}]]]\n (B) [[[{second.strip()}]]]"


def feedback_prompt(constitution: Constitution, prompt: str, first: str, second: str, principle: str) -> str:
    """The feedback model's prompt for "which of ``first`` (A) and ``second`` (B) better follows ``principle``",
    in the paper's format (section 4.1, as its 438 HHH evaluations spell it), after the labelled few-shots; the
    answer is scored as the log-likelihood of :data:`LETTERS` after it. Few-shot ``i`` puts its better reply at
    (A) when ``i`` is even, at (B) when odd, so the examples teach no position."""
    shots = []
    for i, e in enumerate(constitution.feedback_fewshot):
        a, b, letter = (e.better, e.worse, LETTERS[0]) if i % 2 == 0 else (e.worse, e.better, LETTERS[1])
        shots.append(CONSIDER + _dialogue(e.prompt) + choice_block(principle, a, b) + ANSWER + letter)
    return "".join(shots) + CONSIDER + _dialogue(prompt) + choice_block(principle, first, second) + ANSWER


def cot_prompt(constitution: Constitution, prompt: str, first: str, second: str, principle: str) -> str:
    """Chain-of-thought feedback: the paper's CoT few-shots (principle filled in at ``{}``), then the question
    with the conversation as ``H:`` / ``A:`` turns; the model continues "Let's think step by step:" up to
    ``"\\n\\nHuman:"``, and the letters are then scored after :func:`cot_answer_prompt`."""
    dialogue = _dialogue(prompt).replace(HUMAN, "\n\nH:").replace(ASSISTANT, "\n\nA:")
    shots = "".join(s.replace("{}", principle, 1) for s in constitution.cot_fewshot)
    question = (f"{HUMAN} Consider the following conversation between a human (H) and an assistant (A):"
                f"{dialogue}{choice_block(principle, first, second)}")
    return shots + question + COT_START


def cot_answer_prompt(cot_context: str, reasoning: str) -> str:
    """The chain-of-thought context with the model's reasoning, ready for the letters to be scored."""
    return cot_context + " " + reasoning.strip() + COT_ANSWER
