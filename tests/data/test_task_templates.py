"""The built-in templates of the GSM8K, tweet classification and extractive QA tasks."""

from __future__ import annotations

import pytest

from lmcycle.data.examples import Example
from lmcycle.data.templates import get_template

CASES = {
    "gsm8k": Example(input="Tom has 2 apples and buys 3. How many?", targets=["2 + 3 = 5\n#### 5"]),
    "classify_tweet": Example(input="what a lovely day", targets=["neither"]),
    "extractive_qa": Example(input="Context: The bridge opened in 1902.\nQuestion: When?", targets=["1902"]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_task_template_renders_prompt_then_target(name):
    template, ex = get_template(name), CASES[name]
    prompt = template.render(ex, [])
    assert prompt.startswith(template.instruction) and ex.input in prompt
    assert prompt.endswith(template.target_prefix) and not prompt.endswith(ex.target)
    assert template.render_example(ex, True) == template.render_example(ex, False) + " " + ex.target
    # One shot shows the target after the prefix, then the query ends on the prefix again.
    shot = Example(input="another input", targets=["neither"])
    with_shot = template.render(ex, [shot])
    assert with_shot.count(template.target_prefix) == 2 and f"{template.target_prefix} neither" in with_shot


def test_prompts_name_what_the_metrics_read():
    assert "####" in get_template("gsm8k").instruction
    assert all(w in get_template("classify_tweet").instruction for w in ("hate", "offensive", "neither"))
