"""Completions files: the items a labeling project imports, one prompt and its k completions per line.

A JSON Lines file (``.gz`` too), one object per line, named like the ``rankings`` format that lmcycle reads
back (:func:`lmcycle.data.preferences.load_rankings`)::

    {"prompt_id": "p1", "prompt": "Summarize: ...",
     "completions": [{"id": "a", "text": "...", "model": "sft", "decoding": {"do_sample": true, "top_p": 0.9}},
                     {"id": "b", "text": "...", "model": "sft", "decoding": {"do_sample": true, "top_p": 0.9}}],
     "gold": [["b"], ["a"]],      # optional: the known ranking of a gold item (ties allowed)
     "overlap": 3,                # optional: how many labelers see it (default: the project's)
     "meta": {"reference": "..."}}  # optional: anything else to keep with the item

``prompt_id`` is a non-empty string (an integer is taken as its string), unique in the file; each completion
has a non-empty ``id`` unique in its item, a non-empty ``text`` different from the item's other texts (two
equal texts are no preference, and the rankings format refuses them), a non-empty ``model`` and an optional
``decoding`` object. There are at least 2 completions (1 is nothing to rank). Any other key is an error, so a
misspelt ``gold`` is not silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmcycle.data.records import SourceRecord, check_text, id_field, read_records, text_field
from lmcycle.errors import LmcycleError
from lmcycle.feedback.labels import check_ranking

ITEM_KEYS = ("prompt_id", "prompt", "completions", "gold", "overlap", "meta")
COMPLETION_KEYS = ("id", "text", "model", "decoding")


@dataclass(frozen=True)
class Completion:
    """One completion of an item: its id within the item, the text, and the model and settings that wrote it."""

    id: str
    text: str
    model: str
    decoding: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ItemSpec:
    """An item to import: a prompt and its completions; ``gold`` is a gold item's known ranking; ``overlap``
    None takes the project's. ``file`` and ``line`` say where it was read, for errors.

    Made here, it is checked: at least 2 completions, ids and texts unique within the item, ``gold`` a ranking
    of exactly its completions, ``overlap`` >= 1 (an :class:`LmcycleError` naming file, line and field)."""

    prompt_id: str
    prompt: str
    completions: list[Completion]
    gold: list[list[str]] | None = None
    overlap: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    file: str | None = None
    line: int | None = None

    def __post_init__(self):
        def bad(where: str, message: str) -> LmcycleError:
            return LmcycleError(message, file=self.file, line=self.line, field=where)

        if len(self.completions) < 2:
            raise bad("completions", f"{len(self.completions)} completion(s): an item needs at least 2 to rank")
        ids, texts = [c.id for c in self.completions], [c.text for c in self.completions]
        for i, c in enumerate(self.completions):
            if ids.index(c.id) != i:
                raise bad(f"completions.{i}.id", f"duplicate completion id '{c.id}' (also completion {ids.index(c.id)})")
            if texts.index(c.text) != i:
                raise bad(f"completions.{i}.text", f"the same text as completion {texts.index(c.text)}: equal "
                          "texts have no preference; keep one")
        if self.gold is not None:
            check_ranking(self.gold, ids, field="gold", file=self.file, line=self.line)
        if self.overlap is not None and (isinstance(self.overlap, bool) or not isinstance(self.overlap, int)
                                         or self.overlap < 1):
            raise bad("overlap", f"expected an integer >= 1 (labelers per item), got {self.overlap!r:.20}")


def read_completions(path: str | Path) -> list[ItemSpec]:
    """Every item of a completions file, each checked (see the module docstring); the first problem is an
    :class:`LmcycleError` naming the file, line and field, and nothing is returned."""
    items: list[ItemSpec] = []
    seen: dict[str, int | None] = {}
    for rec in read_records(path, "jsonl"):
        item = _item(rec)
        if item.prompt_id in seen:
            raise _err(rec, "prompt_id", f"prompt id '{item.prompt_id}' is already used on line {seen[item.prompt_id]}")
        seen[item.prompt_id] = rec.line
        items.append(item)
    return items


def _item(rec: SourceRecord) -> ItemSpec:
    d = rec.data
    unknown = [k for k in d if k not in ITEM_KEYS]
    if unknown:
        raise _err(rec, str(unknown[0]), f"unknown key (known: {', '.join(ITEM_KEYS)})")
    prompt_id = id_field(rec, "prompt_id")
    prompt = text_field(rec, "prompt")
    raw = d.get("completions")
    if not isinstance(raw, list):
        raise _err(rec, "completions", "missing field" if "completions" not in d
                   else f"expected a list of completion objects, got {type(raw).__name__}")
    completions = [_completion(rec, i, c) for i, c in enumerate(raw)]
    meta = d.get("meta", {})
    if not isinstance(meta, dict):
        raise _err(rec, "meta", f"expected an object, got {type(meta).__name__}")
    return ItemSpec(prompt_id, prompt, completions, d.get("gold"), d.get("overlap"), meta, rec.file, rec.line)


def _completion(rec: SourceRecord, i: int, c: Any) -> Completion:
    where = f"completions.{i}"
    if not isinstance(c, dict):
        raise _err(rec, where, f"expected an object with {', '.join(COMPLETION_KEYS)}, got {type(c).__name__}")
    unknown = [k for k in c if k not in COMPLETION_KEYS]
    if unknown:
        raise _err(rec, f"{where}.{unknown[0]}", f"unknown key (known: {', '.join(COMPLETION_KEYS)})")
    values = {}
    for key in ("id", "text", "model"):
        if key not in c:
            raise _err(rec, f"{where}.{key}", "missing field")
        values[key] = check_text(c[key], rec, f"{where}.{key}")
    decoding = c.get("decoding", {})
    if not isinstance(decoding, dict):
        raise _err(rec, f"{where}.decoding", f"expected an object of settings, got {type(decoding).__name__}")
    return Completion(values["id"], values["text"], values["model"], decoding)


def _err(rec: SourceRecord, field: str, message: str) -> LmcycleError:
    return LmcycleError(f"{rec.where()}{message}", file=rec.file, line=rec.line, field=field)
