"""Prompt templates as data: an instruction, how an example's input is shown, and the prefix of its target.

A rendered example is ``input_format`` filled in, a newline, then ``target_prefix``; with its target it goes on
with :meth:`PromptTemplate.render_target` (a space and the target; no space when the prefix is empty), so
``render_example(ex, True) == render_example(ex, False) + render_target(ex)``. That identity is what lets
training (prompt + completion) and evaluation (prompt, then generate) agree.
"""

from __future__ import annotations

import string
from typing import Any

from pydantic import field_validator

from lmcycle.config import Config, validate
from lmcycle.data.examples import Example
from lmcycle.errors import LmcycleError


class PromptTemplate(Config):
    """``input_format`` may use ``{input}``, ``{task}``, ``{id}`` and any key of the example's ``meta``;
    literal braces are written ``{{`` and ``}}``."""

    instruction: str = ""
    input_format: str = "{input}"
    target_prefix: str
    example_separator: str = "\n\n"

    @field_validator("input_format")
    @classmethod
    def _shows_input(cls, value: str) -> str:
        try:
            fields = {name for _, name, _, _ in string.Formatter().parse(value) if name is not None}
        except ValueError as e:
            raise ValueError(f"not a valid format string ({e})") from None
        if "input" not in fields:
            raise ValueError("must contain the placeholder {input}")
        return value

    def render_example(self, ex: Example, with_target: bool) -> str:
        """One example: the filled-in input, a newline, the target prefix and (optionally) ' ' + target."""
        values: dict[str, Any] = {**ex.meta, "input": ex.input, "task": ex.task, "id": ex.id}
        try:
            text = self.input_format.format_map(values)
        except (KeyError, IndexError) as e:
            raise LmcycleError(f"placeholder {e} is not 'input', 'task', 'id' or a meta key of example "
                               f"'{ex.id}'", field="input_format") from None
        text = f"{text}\n{self.target_prefix}"
        return text + self.render_target(ex) if with_target else text

    def render_target(self, ex: Example) -> str:
        """The completion that follows a rendered prompt: ' ' + target (just the target after an empty prefix)."""
        return f" {ex.target}" if self.target_prefix else ex.target

    def render(self, query: Example, shots: list[Example]) -> str:
        """The instruction, the shots with their targets, then the query without its target."""
        parts = [self.instruction] if self.instruction else []
        parts += [self.render_example(shot, with_target=True) for shot in shots]
        parts.append(self.render_example(query, with_target=False))
        return self.example_separator.join(parts)


TEMPLATES: dict[str, PromptTemplate] = {
    # The zero-shot prompt of the course's lab 1 (dialogue summarization with FLAN-T5).
    "summarize": PromptTemplate(instruction="Summarize the following conversation.", input_format="{input}",
                                target_prefix="Summary:"),
    "dialogue_summary": PromptTemplate(instruction="Write a one-sentence summary of each dialogue.",
                                       input_format="Dialogue:\n{input}", target_prefix="Summary:"),
    "qa": PromptTemplate(instruction="Answer the question.", input_format="Question: {input}",
                         target_prefix="Answer:"),
    "instruction": PromptTemplate(input_format="### Instruction:\n{input}", target_prefix="### Response:"),
    "plain": PromptTemplate(input_format="{input}", target_prefix="", example_separator="\n"),
    # GSM8K: the target is the worked solution ending in '#### <answer>' (lmcycle.data.gsm8k), which is also
    # where lmcycle.evals.gsm8k.gsm8k_accuracy looks first for the predicted number.
    "gsm8k": PromptTemplate(
        instruction="Solve the math word problem step by step. End with '#### ' followed by the final answer.",
        input_format="Question: {input}", target_prefix="Answer:"),
    # Davidson tweets (lmcycle.data.davidson): the target is one label word, which the accuracy metric reads as
    # the prediction's first word.
    "classify_tweet": PromptTemplate(
        instruction="Classify each tweet as hate, offensive or neither.",
        input_format="Tweet: {input}", target_prefix="Label:"),
    # XQuAD/SQuAD (lmcycle.data.xquad): the input already reads "Context: ...\nQuestion: ...".
    "extractive_qa": PromptTemplate(
        instruction="Answer each question with a short span copied from its context.",
        input_format="{input}", target_prefix="Answer:"),
}


def get_template(name_or_cfg: str | PromptTemplate | dict) -> PromptTemplate:
    """A built-in template by name, or a template given as a :class:`PromptTemplate` or a dict of its fields."""
    if isinstance(name_or_cfg, PromptTemplate):
        return name_or_cfg
    if isinstance(name_or_cfg, dict):
        return validate(PromptTemplate, name_or_cfg, file="<template>")
    if name_or_cfg not in TEMPLATES:
        raise LmcycleError(f"unknown template '{name_or_cfg}' (known: {', '.join(sorted(TEMPLATES))})",
                           field="template")
    # A copy, so that a caller changing its template cannot change everyone else's.
    return TEMPLATES[name_or_cfg].model_copy()
