"""Tools: the JSON schema comes from the signature and docstring; calls are validated; failures are messages."""

from __future__ import annotations

import json

import pytest

from lmcycle.apps.tool import ToolError, run_tool, tool
from lmcycle.errors import LmcycleError


@tool
def lookup(term: str, limit: int = 3, exact: bool = False) -> list[str]:
    """Look a term up in the glossary.

    More text that is not the description.

    Args:
        term: the word to look up
        limit: how many entries to return
    """
    return [f"{term}:{i}:{exact}" for i in range(limit)]


def test_schema_is_derived_from_signature_and_docstring():
    fn = lookup.schema()["function"]
    assert fn["name"] == "lookup" and fn["description"] == "Look a term up in the glossary."
    params = fn["parameters"]
    assert params["required"] == ["term"]
    assert params["properties"]["term"] == {"type": "string", "description": "the word to look up"}
    assert params["properties"]["limit"] == {"type": "integer", "default": 3, "description": "how many entries to return"}
    assert params["properties"]["exact"]["type"] == "boolean"
    assert params["additionalProperties"] is False


def test_calls_validate_and_coerce_arguments():
    assert json.loads(lookup.call({"term": "x", "limit": "2"})) == ["x:0:False", "x:1:False"]
    assert json.loads(lookup.call('{"term": "y", "limit": 1, "exact": true}')) == ["y:0:True"]
    for bad, message in (({"limit": 2}, "term: Field required"), ({"term": "x", "limit": "two"}, "limit"),
                         ({"term": "x", "colour": 1}, "colour"), ('{"term": ', "not valid JSON"),
                         ("plain text", "takes a JSON object")):
        with pytest.raises(ToolError, match=message):
            lookup.call(bad)


def test_one_parameter_tool_takes_plain_text_and_failures_are_messages():
    @tool(name="shout")
    def loud(text: str) -> str:
        """Upper-case a text."""
        if text == "boom":
            raise ValueError("no booms")
        return text.upper()

    assert loud.name == "shout"
    assert loud.call("hello there") == "HELLO THERE"
    assert loud.call('"quoted"') == "QUOTED"
    with pytest.raises(ToolError, match="shout failed: ValueError: no booms"):
        loud.call("boom")
    with pytest.raises(ToolError, match="unknown tool 'nope'; the tools are: shout"):
        run_tool({"shout": loud}, "nope", "x")


def test_unannotated_or_variadic_functions_are_refused():
    def untyped(x):
        return x

    def variadic(*args: int) -> int:
        return 0

    with pytest.raises(LmcycleError, match="parameter 'x' needs a type annotation"):
        tool(untyped)
    with pytest.raises(LmcycleError, match=r"\*args/\*\*kwargs"):
        tool(variadic)
