"""Typed configuration: YAML files with line numbers, ``key=value`` overrides, pydantic validation.

Every config class derives from :class:`Config`, which forbids unknown keys. :func:`load_yaml` keeps the line of
every key so that :func:`validate` can turn a pydantic error into one :class:`~lmcycle.errors.LmcycleError` that
names the file, the line and the dotted key (``recipes/x.yaml:12: field 'stages.1.lr': Input should be a valid
number``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar, get_args

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from lmcycle.errors import LmcycleError

Lines = dict[tuple, int]
T = TypeVar("T", bound=BaseModel)


class Config(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


@dataclass(frozen=True)
class Refers:
    """Marks a string field whose value names another part of the recipe, so that the recipe can check it
    before anything runs: ``"dataset"`` (a key of the recipe's ``data`` section), ``"model"`` (``latest``, an
    earlier stage, a path or a Hub id) or ``"stage"`` (an earlier stage)."""

    to: str


DatasetName = Annotated[str, Refers("dataset")]
ModelRef = Annotated[str, Refers("model")]
StageName = Annotated[str, Refers("stage")]  # an earlier stage of the recipe, whose artifacts this one reads


def references(cfg: BaseModel, path: tuple = ()) -> Iterator[tuple[str, tuple, str]]:
    """``(what it refers to, key path, value)`` for every :data:`DatasetName` / :data:`ModelRef` value set in
    ``cfg``, nested configs and lists included."""
    for name, info in type(cfg).model_fields.items():
        kind = refers_to(info.annotation, info.metadata)
        yield from _walk(getattr(cfg, name), kind, (*path, name))


def _walk(value: Any, kind: str | None, path: tuple) -> Iterator[tuple[str, tuple, str]]:
    if isinstance(value, BaseModel):
        yield from references(value, path)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _walk(item, kind, (*path, i))
    elif isinstance(value, str) and kind:
        yield kind, path, value


def refers_to(annotation: Any, metadata: list | tuple = ()) -> str | None:
    """The ``Refers`` kind anywhere in a type (``list[DatasetName]``, ``ModelRef | None``), else None."""
    for m in (*metadata, *getattr(annotation, "__metadata__", ())):
        if isinstance(m, Refers):
            return m.to
    return next((kind for arg in get_args(annotation) if (kind := refers_to(arg))), None)


def _construct(node: yaml.Node, path: tuple, lines: Lines, file: str) -> Any:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        # YAML merge keys (`<<: *anchor`) give defaults that the mapping's own keys override, whatever the order.
        merged: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                for source in value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]:
                    value = _construct(source, path, {}, file)
                    if not isinstance(value, dict):
                        raise LmcycleError("'<<' must merge a mapping", file=file,
                                           line=key_node.start_mark.line + 1, field=".".join(map(str, path)))
                    merged = {**value, **merged}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = key_node.value
            if key in out:
                raise LmcycleError("duplicate key", file=file, line=key_node.start_mark.line + 1,
                                   field=".".join(map(str, (*path, key))))
            lines[(*path, key)] = key_node.start_mark.line + 1
            out[key] = _construct(value_node, (*path, key), lines, file)
        return {**merged, **out}
    if isinstance(node, yaml.SequenceNode):
        return [_construct(v, (*path, i), lines, file) for i, v in enumerate(node.value)]
    # Scalars: let the safe constructor decide the type (int, float, bool, null, str).
    return yaml.SafeLoader("").construct_object(node, deep=True)


def load_yaml(path: str | os.PathLike) -> tuple[dict, Lines]:
    """Read a YAML mapping and the line number of every key path in it."""
    path = str(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise LmcycleError("file not found", file=path) from None
    except UnicodeDecodeError as e:
        raise LmcycleError(f"not valid UTF-8 ({e.reason} at byte {e.start})", file=path) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise LmcycleError(f"invalid YAML: {getattr(e, 'problem', e)}", file=path,
                           line=mark.line + 1 if mark else None) from None
    if node is None:
        return {}, {}
    lines: Lines = {}
    data = _construct(node, (), lines, path)
    if not isinstance(data, dict):
        raise LmcycleError("a recipe must be a YAML mapping at the top level", file=path, line=1)
    return data, lines


def apply_overrides(data: dict, overrides: list[str], source: str = "command line") -> dict:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML; list indices are numbers) to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise LmcycleError(f"override '{item}' must look like key=value", file=source)
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        parts = key.strip().split(".")
        node: Any = data
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise LmcycleError(f"no list item {part} in override '{item}'", file=source, field=key)
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
            else:
                raise LmcycleError(f"'{'.'.join(parts[:i])}' is not a mapping", file=source, field=key)
    return data


def line_for(loc: tuple, lines: Lines) -> int | None:
    """The line of key path ``loc``, or of its nearest enclosing key that has one (a default has no line)."""
    for n in range(len(loc), -1, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return None


def validate(cls: type[T], data: Any, *, file: str | os.PathLike = "<config>", lines: Lines | None = None,
             prefix: tuple = ()) -> T:
    """Validate ``data`` as ``cls``; the first error becomes one LmcycleError naming file, line and key."""
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        # pydantic puts the discriminator tag of a tagged union in the location; it is not a key of the file.
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        loc = _drop_union_tags(loc, data)
        if err["type"] == "union_tag_invalid":
            loc = (*loc, *_tag_key(data, loc, err["ctx"]["tag"]))
        full = (*prefix, *loc)
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required field is missing"
        elif err["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        elif err["type"] == "union_tag_invalid":
            msg = f"unknown value {err['ctx']['tag']!r} (expected one of {err['ctx']['expected_tags']})"
        line = line_for(full, lines or {})
        field = ".".join(map(str, full)) or None
        raise LmcycleError(msg, file=file, line=line, field=field) from None


def _tag_key(data: Any, loc: tuple, tag: str) -> tuple:
    """The key holding a tagged union's unknown tag (e.g. ``method``), so that the error names that field."""
    node = data
    for part in loc:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return ()
    keys = [k for k, v in node.items() if v == tag] if isinstance(node, dict) else []
    return (keys[0],) if len(keys) == 1 else ()


def _drop_union_tags(loc: tuple, data: Any) -> tuple:
    """Remove the tag segments pydantic inserts for discriminated unions (they are not keys in the data)."""
    out: list = []
    node = data
    for i, part in enumerate(loc):
        if i == len(loc) - 1:
            out.append(part)
        elif isinstance(node, dict) and part in node:
            node = node[part]
            out.append(part)
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
            out.append(part)
        elif isinstance(node, dict | list):
            continue  # a union tag such as 'pretrain' in ('stages', 1, 'pretrain', 'lr')
        else:
            out.append(part)
            node = None
    return tuple(out)


def load_config(cls: type[T], path: str | os.PathLike, overrides: list[str] | None = None) -> T:
    data, lines = load_yaml(path)
    apply_overrides(data, overrides or [])
    return validate(cls, data, file=Path(path), lines=lines)


def dump_config(cfg: BaseModel) -> str:
    """The resolved config as YAML (defaults filled in), for the run directory."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
