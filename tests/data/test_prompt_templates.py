"""Prompt templates: rendering, the prompt + completion identity, built-ins and lookup errors."""

from __future__ import annotations

import pytest

from lmcycle.config import validate
from lmcycle.data.examples import Example
from lmcycle.data.templates import TEMPLATES, PromptTemplate, get_template
from lmcycle.errors import LmcycleError

Q = Example(input="#Person1#: Hi.\n#Person2#: Hello.", targets=["They greet.", "A greeting."], id="q",
            meta={"topic": "greeting"})
S1 = Example(input="#Person1#: Bye.", targets=["One leaves."], id="s1")
S2 = Example(input="#Person1#: Thanks {braces}.", targets=["Thanks."], id="s2")


def test_render_example_with_and_without_target():
    t = PromptTemplate(input_format="Dialogue: {input}", target_prefix="Summary:")
    assert t.render_example(Q, with_target=False) == f"Dialogue: {Q.input}\nSummary:"
    assert t.render_example(Q, with_target=True) == f"Dialogue: {Q.input}\nSummary: They greet."
    assert t.render_example(Q, True) == t.render_example(Q, False) + t.render_target(Q)


def test_empty_prefix_has_no_stray_space():
    t = PromptTemplate(target_prefix="")
    assert t.render_example(S1, True) == "#Person1#: Bye.\nOne leaves."
    assert t.render_example(S1, True) == t.render_example(S1, False) + t.render_target(S1)


def test_render_orders_instruction_shots_query():
    t = PromptTemplate(instruction="Do it.", target_prefix="A:", example_separator="\n---\n")
    text = t.render(Q, [S1, S2])
    parts = text.split("\n---\n")
    assert parts == ["Do it.", t.render_example(S1, True), t.render_example(S2, True), t.render_example(Q, False)]
    assert "Thanks {braces}." in text  # braces inside the data are not format fields
    assert "They greet." not in text  # the query's answer never leaks into its prompt


def test_no_instruction_means_no_leading_separator():
    t = PromptTemplate(target_prefix="A:")
    assert t.render(Q, []) == t.render_example(Q, False)


def test_summarize_is_the_lab_style_prompt():
    t = get_template("summarize")
    text = t.render(Q, [])
    assert text == f"Summarize the following conversation.\n\n{Q.input}\nSummary:"


def test_every_builtin_renders_the_input():
    assert {"summarize", "dialogue_summary"} <= set(TEMPLATES)
    for name in TEMPLATES:
        text = get_template(name).render(Q, [S1])
        assert Q.input in text and S1.target in text and Q.target not in text


def test_meta_task_and_id_placeholders():
    t = PromptTemplate(input_format="[{task}/{id}] ({topic}) {input}", target_prefix=">")
    assert t.render_example(Q, False).startswith("[default/q] (greeting) #Person1#")
    with pytest.raises(LmcycleError) as e:
        t.render_example(S1, False)  # S1 has no 'topic' in meta
    assert e.value.field == "input_format" and "topic" in e.value.message


def test_input_format_must_show_the_input():
    with pytest.raises(LmcycleError) as e:
        validate(PromptTemplate, {"input_format": "Dialogue:", "target_prefix": "S:"}, file="r.yaml")
    assert e.value.field == "input_format" and "{input}" in str(e.value)
    with pytest.raises(LmcycleError):
        validate(PromptTemplate, {"input_format": "{input", "target_prefix": "S:"}, file="r.yaml")


def test_get_template_forms_and_errors():
    custom = PromptTemplate(target_prefix="Out:")
    assert get_template(custom) is custom
    from_dict = get_template({"instruction": "X", "target_prefix": "Y:"})
    assert (from_dict.instruction, from_dict.input_format) == ("X", "{input}")
    with pytest.raises(LmcycleError) as e:
        get_template({"target_prefix": "Y:", "colour": 1})
    assert e.value.field == "colour"
    with pytest.raises(LmcycleError) as e:
        get_template("no-such-template")
    assert "summarize" in e.value.message and "dialogue_summary" in e.value.message


def test_get_template_returns_a_copy():
    t = get_template("summarize")
    t.instruction = "changed"
    assert get_template("summarize").instruction == "Summarize the following conversation."
