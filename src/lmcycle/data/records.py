"""Records as read from their source (JSON Lines, also gzipped; CSV; Parquet; a Hugging Face dataset), each
with the file and line it came from, so that every problem in the data is one
:class:`~lmcycle.errors.LmcycleError` naming the file, the line (1-based; in a CSV the header is line 1, so the
first record is line 2) and the field. The named dataset readers (:mod:`lmcycle.data.dialogsum`, ...) and
:mod:`lmcycle.data.loaders` build on these.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmcycle.errors import LmcycleError

FILE_FORMATS = ("jsonl", "csv", "parquet")


SUFFIXES = {"jsonl": (".jsonl", ".jsonl.gz", ".json", ".json.gz"), "csv": (".csv", ".csv.gz"),
            "parquet": (".parquet",)}


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


def text_field(rec: SourceRecord, name: str) -> str:
    """The non-empty string in field ``name`` of ``rec``; otherwise an error naming file, line and field."""
    if name not in rec.data:
        raise LmcycleError(f"{rec.where()}missing field (the record has: {', '.join(map(str, rec.data)) or 'nothing'})",
                           file=rec.file, line=rec.line, field=name)
    return check_text(rec.data[name], rec, name)


def id_field(rec: SourceRecord, name: str) -> str:
    """The id in field ``name`` of ``rec``: a non-empty string, or an integer taken as its string; otherwise an
    error naming file, line and field."""
    value = rec.data.get(name)
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise LmcycleError(f"{rec.where()}" + ("missing field" if name not in rec.data else
                                                "expected a non-empty string id"),
                           file=rec.file, line=rec.line, field=name)
    return value


def check_text(value: Any, rec: SourceRecord, name: str) -> str:
    if not isinstance(value, str):
        raise LmcycleError(f"{rec.where()}expected a string, got {type(value).__name__}",
                           file=rec.file, line=rec.line, field=name)
    if not value.strip():
        raise LmcycleError(f"{rec.where()}empty text", file=rec.file, line=rec.line, field=name)
    return value


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
