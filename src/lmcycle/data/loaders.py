"""Datasets from files (JSON Lines, CSV, Parquet), Hugging Face ``datasets``, the named datasets (DialogSum,
GSM8K, the Davidson tweets, XQuAD-en) or the built-in task.

:class:`DatasetConfig` is the recipe's ``data.<name>`` section; :func:`load_examples` turns it into
:class:`~lmcycle.data.examples.Example` objects. Every problem in the data is one
:class:`~lmcycle.errors.LmcycleError` that names the file, the line (1-based; in a CSV the header is line 1, so
the first record is line 2) and the field.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from lmcycle.config import Config
from lmcycle.data.examples import Example
from lmcycle.errors import LmcycleError

Format = Literal["jsonl", "csv", "parquet", "hf", "dialogsum", "gsm8k", "davidson", "dynahate", "xquad",
                 "hh_rlhf", "rankings", "synthetic", "synthetic_preferences"]
FILE_FORMATS = ("jsonl", "csv", "parquet")
SUFFIXES = {"jsonl": (".jsonl", ".jsonl.gz", ".json", ".json.gz"), "csv": (".csv", ".csv.gz"),
            "parquet": (".parquet",)}


class DatasetConfig(Config):
    """Where a dataset comes from and which fields hold the input and the reference targets.

    ``path`` is a file, a directory (holding ``<split>.<ext>`` for file formats, the dataset's own files for
    ``dialogsum``, ``gsm8k``, ``davidson`` and ``xquad``, or a ``save_to_disk`` dataset for ``hf``) or, for
    ``hf``, a dataset name on the Hub. Relative paths resolve against the recipe's directory. ``n`` and ``seed``
    only apply to ``synthetic`` and ``synthetic_preferences`` (the built-in dialogues, and preference pairs over
    them: :func:`lmcycle.data.synthetic.synthetic_preferences`) (the Davidson and XQuAD splits use fixed seeds of their own, so that no recipe
    seed can move a test example into training). ``keep_calculator`` only applies to ``gsm8k``: keep the
    ``<<expr=value>>`` annotations in the training target. ``hh_rlhf`` and ``rankings`` are preference pairs
    (a file, or a folder with one ``.jsonl[.gz]``), split ``train``/``test``/``all`` by prompt with 15% of the
    prompts in test (:func:`lmcycle.data.preferences.load_preference_examples`).
    """

    format: Format
    path: str | None = None
    split: str = "train"
    input_field: str = "input"
    target_fields: list[str] = Field(default_factory=lambda: ["target"])
    task: str = "default"
    id_field: str | None = None
    limit: int | None = Field(default=None, ge=1)
    n: int = Field(default=200, ge=1)
    seed: int = 0
    keep_calculator: bool = False
    prompt_words: int | None = Field(default=None, ge=1, description="keep only the first N words of each "
                                     "input: continuation prompts, as RealToxicityPrompts cuts texts")

    @model_validator(mode="after")
    def _path_given(self) -> DatasetConfig:
        if not self.format.startswith("synthetic") and not self.path:
            raise ValueError(f"'path' is required for format '{self.format}'")
        if self.keep_calculator and self.format != "gsm8k":
            raise ValueError("'keep_calculator' only applies to format 'gsm8k'")
        return self


@dataclass
class SourceRecord:
    """One record as read from its source, with where it came from (for error messages)."""

    data: dict[str, Any]
    file: str
    line: int | None  # 1-based line of the record's start in a text file; None for parquet / HF rows
    index: int  # 0-based position in the source

    def where(self) -> str:
        """Text to put in front of a message when there is no line number to point to."""
        return "" if self.line is not None else f"record {self.index + 1}: "


def load_records(path: str | Path, format: str, split: str = "train") -> list[dict]:
    """Read every record of a jsonl (also ``.gz``), csv, parquet file or HF dataset as a plain dict."""
    return [r.data for r in read_records(path, format, split)]


def read_records(path: str | Path, format: str, split: str = "train") -> list[SourceRecord]:
    """Like :func:`load_records`, but each record keeps its file and line for error messages."""
    if format == "hf":
        return _nonempty(_read_hf(str(path), split), path, "the dataset has no rows")
    if format not in FILE_FORMATS:
        raise LmcycleError(f"unknown file format '{format}' (known: {', '.join((*FILE_FORMATS, 'hf'))})",
                           field="format")
    file = _resolve_split_file(Path(path), format, split)
    if format == "parquet":
        return _nonempty(_read_parquet(file), file, "the file has no rows")
    text = _read_text(file)
    if format == "jsonl":
        return _nonempty(_parse_jsonl(text, str(file)), file, "no records: the file is empty", line=1)
    what = "no records after the header" if text.strip() else "no records: the file is empty"
    return _nonempty(_parse_csv(text, str(file)), file, what, line=1)


def _nonempty(records: list[SourceRecord], file: str | Path, message: str, line: int | None = None
              ) -> list[SourceRecord]:
    # An empty source would otherwise train or evaluate on nothing, or fail far from the file that caused it.
    if not records:
        raise LmcycleError(message, file=file, line=line)
    return records


def load_examples(cfg: DatasetConfig, base_dir: Path = Path(".")) -> list[Example]:
    """Load the examples ``cfg`` describes; the first ``cfg.limit`` of them when a limit is set; with
    ``prompt_words``, each input cut to its first words."""
    examples = _load_examples(cfg, base_dir)
    if not examples:
        where = _resolve(cfg.path, base_dir) if cfg.path else None
        raise LmcycleError(f"no examples in split '{cfg.split}'", file=where, field="split")
    if cfg.prompt_words:
        examples = [replace(ex, input=" ".join(ex.input.split()[: cfg.prompt_words])) for ex in examples]
    return examples


def _load_examples(cfg: DatasetConfig, base_dir: Path) -> list[Example]:
    if cfg.format.startswith("synthetic"):
        from lmcycle.data.synthetic import synthetic_dialogues, synthetic_preferences

        make = synthetic_preferences if cfg.format == "synthetic_preferences" else synthetic_dialogues
        examples = make(min(cfg.n, cfg.limit or cfg.n), cfg.seed)
        return _with_task(examples, cfg.task)
    path = _resolve(cfg.path, base_dir)
    if cfg.format in NAMED_LOADERS:
        return _with_task(_load_named(cfg, path)[: cfg.limit], cfg.task)
    if cfg.format == "hf" and not Path(path).exists():
        path = cfg.path  # not a local directory: a dataset name on the Hub
    records = read_records(path, cfg.format, cfg.split)[: cfg.limit]
    return [_to_example(rec, cfg) for rec in records]


NAMED_LOADERS = ("dialogsum", "gsm8k", "davidson", "dynahate", "xquad", "hh_rlhf", "rankings")


def _load_named(cfg: DatasetConfig, path: Path) -> list[Example]:
    # Imported here: each named loader imports this module for its record reader.
    if cfg.format == "dialogsum":
        from lmcycle.data.dialogsum import load_dialogsum

        return load_dialogsum(path, cfg.split)
    if cfg.format == "gsm8k":
        from lmcycle.data.gsm8k import load_gsm8k

        return load_gsm8k(path, cfg.split, keep_calculator=cfg.keep_calculator)
    if cfg.format == "davidson":
        from lmcycle.data.davidson import load_davidson

        return load_davidson(path, cfg.split)
    if cfg.format == "dynahate":
        from lmcycle.data.dynahate import load_dynahate

        return load_dynahate(path, cfg.split)
    if cfg.format in ("hh_rlhf", "rankings"):
        from lmcycle.data.preferences import load_preference_examples

        return load_preference_examples(path, cfg.format, cfg.split)
    from lmcycle.data.xquad import load_xquad

    return load_xquad(path, cfg.split)


def text_field(rec: SourceRecord, name: str) -> str:
    """The non-empty string in field ``name`` of ``rec``; otherwise an error naming file, line and field."""
    if name not in rec.data:
        raise LmcycleError(f"{rec.where()}missing field (the record has: {', '.join(map(str, rec.data)) or 'nothing'})",
                           file=rec.file, line=rec.line, field=name)
    return _check_text(rec.data[name], rec, name)


def _check_text(value: Any, rec: SourceRecord, name: str) -> str:
    if not isinstance(value, str):
        raise LmcycleError(f"{rec.where()}expected a string, got {type(value).__name__}",
                           file=rec.file, line=rec.line, field=name)
    if not value.strip():
        raise LmcycleError(f"{rec.where()}empty text", file=rec.file, line=rec.line, field=name)
    return value


def _to_example(rec: SourceRecord, cfg: DatasetConfig) -> Example:
    text = text_field(rec, cfg.input_field)
    targets: list[str] = []
    for name in cfg.target_fields:
        value = rec.data.get(name)
        # A field holding a list of strings (several references in one column) is allowed.
        if isinstance(value, list) and value:
            targets.extend(_check_text(v, rec, name) for v in value)
        else:
            targets.append(text_field(rec, name))
    ex_id = _example_id(rec, cfg.id_field)
    used = {cfg.input_field, *cfg.target_fields, cfg.id_field}
    meta = {k: v for k, v in rec.data.items() if k not in used}
    return Example(input=text, targets=targets, task=cfg.task, id=ex_id, meta=meta)


def _example_id(rec: SourceRecord, id_field: str | None) -> str:
    if id_field is None:
        # Unique across files, so a few-shot pool from one file never mistakes a query from another for itself.
        return f"{Path(rec.file).name}:{rec.line if rec.line is not None else rec.index + 1}"
    if id_field not in rec.data:
        raise LmcycleError(f"{rec.where()}missing field", file=rec.file, line=rec.line, field=id_field)
    value = rec.data[id_field]
    if isinstance(value, bool) or not isinstance(value, str | int) or str(value).strip() == "":
        raise LmcycleError(f"{rec.where()}expected a non-empty string or an integer id, got {value!r:.40}",
                           file=rec.file, line=rec.line, field=id_field)
    return str(value)


def _with_task(examples: list[Example], task: str) -> list[Example]:
    """Keep each loader's own task name unless the recipe set one."""
    if task != "default":
        for ex in examples:
            ex.task = task
    return examples


def _resolve(path: str | None, base_dir: Path) -> Path:
    p = Path(path or "").expanduser()
    return p if p.is_absolute() else Path(base_dir) / p


def _resolve_split_file(path: Path, format: str, split: str) -> Path:
    if path.is_dir():
        for suffix in SUFFIXES[format]:
            if (path / f"{split}{suffix}").is_file():
                return path / f"{split}{suffix}"
        names = " or ".join(f"{split}{s}" for s in SUFFIXES[format])
        raise LmcycleError(f"directory has no file for split '{split}' (looked for {names})", file=path)
    if not path.is_file():
        raise LmcycleError("file not found", file=path)
    return path


def _read_text(file: Path) -> str:
    data = file.read_bytes()
    if file.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise LmcycleError(f"not a valid gzip file ({e})", file=file) from None
    try:
        return data.decode("utf-8-sig")  # -sig: spreadsheet programs often write a byte-order mark
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise LmcycleError(f"not valid UTF-8 ({e.reason} at byte {e.start})", file=file, line=line) from None


def _parse_jsonl(text: str, file: str) -> list[SourceRecord]:
    records = []
    # split("\n"), not splitlines(): JSON strings may legally hold U+2028 and other line-like characters.
    for i, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as e:
            raise LmcycleError(f"invalid JSON: {e.msg} (column {e.colno})", file=file, line=i) from None
        if not isinstance(data, dict):
            raise LmcycleError(f"expected a JSON object, got {type(data).__name__}", file=file, line=i)
        records.append(SourceRecord(data, file, i, len(records)))
    return records


def _parse_csv(text: str, file: str) -> list[SourceRecord]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        return []
    except csv.Error as e:
        raise LmcycleError(f"invalid CSV: {e}", file=file, line=1) from None
    records = []
    while True:
        start = reader.line_num + 1  # a quoted value may span lines; a record's line is where it starts
        try:
            row = next(reader)
        except StopIteration:
            return records
        except csv.Error as e:
            raise LmcycleError(f"invalid CSV: {e}", file=file, line=start) from None
        if not row:
            continue
        if len(row) != len(header):
            raise LmcycleError(f"row has {len(row)} values but the header has {len(header)} columns",
                               file=file, line=start)
        records.append(SourceRecord(dict(zip(header, row, strict=True)), file, start, len(records)))


def _read_parquet(file: Path) -> list[SourceRecord]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise LmcycleError("reading parquet needs pyarrow: pip install 'lmcycle[data]'", file=file) from None
    try:
        rows = pq.read_table(file).to_pylist()
    except Exception as e:  # pyarrow raises several unrelated types for a damaged file
        raise LmcycleError(f"cannot read parquet: {e}", file=file) from None
    return [SourceRecord(row, str(file), None, i) for i, row in enumerate(rows)]


def _read_hf(path: str, split: str) -> list[SourceRecord]:
    try:
        import datasets
    except ImportError:
        raise LmcycleError("format 'hf' needs the datasets library: pip install 'lmcycle[data]'",
                           file=path) from None
    local = Path(path)
    try:
        if (local / "dataset_dict.json").is_file() or (local / "state.json").is_file():
            ds = datasets.load_from_disk(str(local))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise LmcycleError(f"no split '{split}' (it has: {', '.join(ds)})", file=path, field="split")
                ds = ds[split]
        else:
            ds = datasets.load_dataset(path, split=split)
    except LmcycleError:
        raise
    except Exception as e:  # the Hub, the network and the cache each raise their own types
        raise LmcycleError(f"cannot load dataset: {type(e).__name__}: {e}", file=path) from None
    return [SourceRecord(row, path, None, i) for i, row in enumerate(ds.to_list())]
