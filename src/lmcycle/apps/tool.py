"""Tools: typed Python functions an agent may call, with the JSON schema derived from the signature.

    @tool
    def lookup(term: str, limit: int = 3) -> str:
        '''Look a term up in the glossary.

        Args:
            term: the word to look up
            limit: how many entries to return
        '''

``lookup.schema()`` is the OpenAI function-tool object (name, the docstring's first paragraph as description,
the parameters as JSON Schema with each ``Args:`` line as a description); ``lookup.call({"term": "x"})`` (or a
JSON string, or for a one-parameter tool a plain string) validates the arguments with pydantic — ``"3"`` for an
int is coerced, ``"three"`` is refused — and returns the result as text. A bad call raises :class:`ToolError`
with a message meant to be shown to the model, never a traceback.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, get_type_hints

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from lmcycle.errors import LmcycleError


class ToolError(Exception):
    """A tool call that cannot run: unknown tool, bad arguments, or the tool itself failed (message for the model)."""


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    fn: Callable[..., Any]
    arguments: type[BaseModel]

    def schema(self) -> dict:
        """OpenAI's function-tool object: ``{"type": "function", "function": {name, description, parameters}}``."""
        parameters = self.arguments.model_json_schema()
        parameters.pop("title", None)
        for prop in parameters.get("properties", {}).values():
            prop.pop("title", None)
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": parameters}}

    def call(self, arguments: dict | str) -> str:
        """Validate ``arguments`` against the signature, run the function, return its result as text."""
        args = self._parse(arguments)
        try:
            values = self.arguments.model_validate(args)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'arguments'}: {err['msg']}" for err in e.errors())
            raise ToolError(f"bad arguments for {self.name}: {problems}") from None
        try:
            result = self.fn(**values.model_dump())
        except ToolError:
            raise
        except Exception as e:  # the model sees what went wrong and may try again
            raise ToolError(f"{self.name} failed: {type(e).__name__}: {e}") from None
        return result if isinstance(result, str) else json.dumps(result, ensure_ascii=False, default=str)

    def _parse(self, arguments: dict | str) -> dict:
        if isinstance(arguments, dict):
            return arguments
        text = arguments.strip()
        if text.startswith("{"):
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError as e:
                raise ToolError(f"arguments for {self.name} are not valid JSON: {e.msg}") from None
            if isinstance(parsed, dict):
                return parsed
        fields = list(self.arguments.model_fields)
        if len(fields) == 1:  # a one-parameter tool takes its argument as plain text too
            return {fields[0]: _unquote(text)}
        raise ToolError(f"{self.name} takes a JSON object with {fields}")


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        return text[1:-1]
    return text


def tool(fn: Callable[..., Any] | None = None, *, name: str | None = None):
    """Make a :class:`Tool` of a fully annotated function (usable as ``@tool`` or ``@tool(name=...)``)."""
    if fn is None:
        return lambda f: tool(f, name=name)
    hints = get_type_hints(fn)
    descriptions = _arg_descriptions(inspect.getdoc(fn) or "")
    fields: dict[str, Any] = {}
    for param in inspect.signature(fn).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise LmcycleError(f"tool {fn.__name__}: *args/**kwargs have no schema", field="tool")
        if param.name not in hints:
            raise LmcycleError(f"tool {fn.__name__}: parameter '{param.name}' needs a type annotation",
                               field="tool")
        default = ... if param.default is param.empty else param.default
        fields[param.name] = (hints[param.name], Field(default, description=descriptions.get(param.name)))
    model = create_model(f"{fn.__name__}_arguments", __config__=ConfigDict(extra="forbid"), **fields)
    doc = (inspect.getdoc(fn) or "").split("\n\n")[0].strip()
    return Tool(name=name or fn.__name__, description=doc, fn=fn, arguments=model)


def _arg_descriptions(doc: str) -> dict[str, str]:
    """``name: text`` lines of a Google-style ``Args:`` section."""
    section = re.search(r"^Args:\n((?:[ \t]+.*\n?)+)", doc, re.MULTILINE)
    if not section:
        return {}
    return {m.group(1): m.group(2).strip()
            for m in re.finditer(r"^[ \t]+(\w+)(?: \([^)]*\))?:\s*(.+)$", section.group(1), re.MULTILINE)}


def run_tool(tools: dict[str, Tool], name: str, arguments: dict | str) -> str:
    """Call tool ``name``; an unknown name is a :class:`ToolError` listing the known ones."""
    if name not in tools:
        raise ToolError(f"unknown tool '{name}'; the tools are: {', '.join(sorted(tools))}")
    return tools[name].call(arguments)
