"""PAL: the prompt, taking the program out of model output, running it in the sandbox (never in-process)."""

from __future__ import annotations

import pytest

from lmcycle.apps.pal import PAL_EXEMPLARS, answer_with_program, extract_program, format_value, pal_prompt

PROGRAM = "def solution():\n    apples = 3\n    eaten = 1\n    return (apples - eaten) * 2.5\n"


def test_prompt_ends_where_the_model_writes_the_program():
    prompt = pal_prompt("Tom has 3 apples. How many?")
    assert prompt.endswith("Q: Tom has 3 apples. How many?\n\n# solution in Python:\n\n")
    assert all(code in prompt for _, code in PAL_EXEMPLARS)


@pytest.mark.parametrize("text, want", [
    (PROGRAM + "\n\n\nQ: next question", PROGRAM),
    ("Here is the code:\n```python\n" + PROGRAM + "```\nDone.", PROGRAM),
    ("```\n" + PROGRAM, PROGRAM),  # an unclosed fence
    ("I think the answer is 5.", None),
])
def test_program_extraction(text, want):
    assert extract_program(text) == want


@pytest.mark.parametrize("value, want", [(5.0, "5"), (2.5, "2.5"), (0.1 + 0.2, "0.3"), (7, "7"), (None, None),
                                         (1234567.5, "1234567.5"), ("x", "x")])
def test_values_become_answers(value, want):
    assert format_value(value) == want


def test_the_program_runs_in_the_sandbox(scripted):
    llm = scripted([PROGRAM])
    result = answer_with_program(llm, "Tom has 3 apples and eats one. Twice and a half?")
    assert result.answer == "5" and result.result.ok and result.result.pid is not None
    assert llm.configs[0].stop == ["\nQ:", "\n\n\n\n"]


def test_malicious_or_missing_programs_give_no_answer(scripted, tmp_path):
    target = tmp_path / "pwned"
    evil = f"def solution():\n    open({str(target)!r}, 'w').write('x')\n    return 1\n"
    result = answer_with_program(scripted([evil]), "q")
    assert result.answer is None and result.result.error.kind == "violation" and not target.exists()
    result = answer_with_program(scripted(["I refuse to write code."]), "q")
    assert (result.answer, result.program, result.result) == (None, None, None)
