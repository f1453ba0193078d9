"""Loading datasets from jsonl / csv / parquet / HF datasets, and the errors that name file, line and field."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import pytest

from lmcycle.config import validate
from lmcycle.data.loaders import DatasetConfig, load_examples
from lmcycle.data.records import load_records
from lmcycle.errors import LmcycleError

ROWS = [
    {"input": "first input", "target": "first target", "key": "a"},
    {"input": "second input\nwith two lines", "target": "second target", "key": "b"},
    {"input": "third input é", "target": "third target", "key": "c"},
]


def write_jsonl(path: Path, rows: list, gz: bool = False) -> Path:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def cfg(path, fmt="jsonl", **kw) -> DatasetConfig:
    return DatasetConfig(format=fmt, path=str(path), **kw)


def assert_names(err: LmcycleError, file, line: int | None, field: str | None):
    """The one-line message points at the file, the line and the field."""
    text = str(err)
    assert "\n" not in text
    assert err.file == str(file) and err.line == line and err.field == field
    assert text.startswith(f"{file}:{line}: " if line is not None else f"{file}: ")
    if field:
        assert f"field '{field}'" in text


# -- formats ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_jsonl_plain_and_gzipped(tmp_path, gz):
    path = write_jsonl(tmp_path / ("d.jsonl.gz" if gz else "d.jsonl"), ROWS, gz=gz)
    assert load_records(path, "jsonl") == ROWS
    examples = load_examples(cfg(path, task="t"))
    assert [e.input for e in examples] == [r["input"] for r in ROWS]
    assert [e.targets for e in examples] == [[r["target"]] for r in ROWS]
    assert all(e.task == "t" for e in examples)
    assert examples[1].meta == {"key": "b"}
    assert len({e.id for e in examples}) == 3


def test_jsonl_skips_blank_lines_and_keeps_line_numbers(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n   \n" + json.dumps({"input": "x"}) + "\n", encoding="utf-8")
    assert len(load_records(path, "jsonl")) == 2
    with pytest.raises(LmcycleError) as e:
        load_examples(cfg(path))
    assert_names(e.value, path, 4, "target")


def test_csv_with_quoted_newlines(tmp_path):
    path = write_csv(tmp_path / "d.csv", ROWS)
    assert load_records(path, "csv") == ROWS
    examples = load_examples(cfg(path, "csv", id_field="key"))
    assert [e.id for e in examples] == ["a", "b", "c"]
    assert examples[1].input == "second input\nwith two lines"


def test_csv_line_numbers_count_the_header_and_multiline_records(tmp_path):
    rows = [*ROWS, {"input": "fourth", "target": "   ", "key": "d"}]
    path = write_csv(tmp_path / "d.csv", rows)
    # header = line 1, records start at lines 2, 3 (spans 2 lines), 5, 6
    with pytest.raises(LmcycleError) as e:
        load_examples(cfg(path, "csv"))
    assert_names(e.value, path, 6, "target")
    assert "empty" in e.value.message


def test_csv_first_record_is_line_2(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("input,answer\nhello,world\n", encoding="utf-8")
    with pytest.raises(LmcycleError) as e:
        load_examples(cfg(path, "csv"))
    assert_names(e.value, path, 2, "target")
    assert "answer" in e.value.message  # says which fields the record does have


def test_csv_wrong_number_of_values(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("input,target\na,b\nc,d,e\n", encoding="utf-8")
    with pytest.raises(LmcycleError) as e:
        load_records(path, "csv")
    assert_names(e.value, path, 3, None)


def test_csv_with_byte_order_mark(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes("input,target\nhi,there\n".encode("utf-8-sig"))
    assert load_records(path, "csv") == [{"input": "hi", "target": "there"}]


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    assert load_records(path, "parquet") == ROWS
    assert [e.target for e in load_examples(cfg(path, "parquet"))] == [r["target"] for r in ROWS]


def test_parquet_error_names_record(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"input": "a", "target": "b"}, {"input": "c", "target": None}]), path)
    with pytest.raises(LmcycleError) as e:
        load_examples(cfg(path, "parquet"))
    assert_names(e.value, path, None, "target")
    assert "record 2" in str(e.value)


def test_hf_saved_dataset_and_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(ROWS)
    ds.save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": ds, "test": ds.select([2])}).save_to_disk(str(tmp_path / "dict"))

    assert load_records(tmp_path / "single", "hf") == ROWS
    test = load_examples(cfg(tmp_path / "dict", "hf", split="test"))
    assert [e.input for e in test] == [ROWS[2]["input"]]
    with pytest.raises(LmcycleError) as e:
        load_examples(cfg(tmp_path / "dict", "hf", split="validation"))
    assert e.value.field == "split" and "train" in e.value.message and "test" in e.value.message


def test_hf_relative_path_resolves_against_base_dir(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    examples = load_examples(DatasetConfig(format="hf", path="saved"), base_dir=tmp_path)
    assert len(examples) == 3


def test_directory_with_split_files(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", ROWS)
    write_jsonl(tmp_path / "test.jsonl.gz", ROWS[:1], gz=True)
    assert len(load_examples(cfg(tmp_path, split="train"))) == 3
    assert len(load_examples(cfg(tmp_path, split="test"))) == 1
    with pytest.raises(LmcycleError) as e:
        load_examples(cfg(tmp_path, split="dev"))
    assert e.value.file == str(tmp_path) and "dev.jsonl" in e.value.message


def test_relative_path_limit_and_several_targets(tmp_path):
    rows = [{"q": f"question {i}", "a1": f"answer {i}", "a2": [f"alt {i}", f"other {i}"]} for i in range(5)]
    write_jsonl(tmp_path / "qa.jsonl", rows)
    c = DatasetConfig(format="jsonl", path="qa.jsonl", input_field="q", target_fields=["a1", "a2"], limit=2)
    examples = load_examples(c, base_dir=tmp_path)
    assert len(examples) == 2
    assert examples[1].targets == ["answer 1", "alt 1", "other 1"]
    assert examples[1].target == "answer 1"


def test_synthetic_and_dialogsum_delegation(tmp_path):
    assert len(load_examples(DatasetConfig(format="synthetic", n=7, seed=3))) == 7
    assert len(load_examples(DatasetConfig(format="synthetic", n=7, limit=4))) == 4
    assert load_examples(DatasetConfig(format="synthetic", n=2))[0].task == "dialogue_summary"
    row = {"fname": "dev_0", "dialogue": "#Person1#: Hi.\n#Person2#: Hello.", "summary": "They greet.", "topic": "hi"}
    write_jsonl(tmp_path / "dialogsum.dev.jsonl", [row])
    [ex] = load_examples(DatasetConfig(format="dialogsum", path=str(tmp_path), split="dev"))
    assert (ex.id, ex.task, ex.targets) == ("dev_0", "dialogsum", ["They greet."])
    [ex] = load_examples(DatasetConfig(format="dialogsum", path=str(tmp_path), split="dev", task="mine"))
    assert ex.task == "mine"


# -- errors ----------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(LmcycleError) as e:
        load_examples(cfg(tmp_path / "nope.jsonl"))
    assert_names(e.value, tmp_path / "nope.jsonl", None, None)
    assert "not found" in e.value.message


def test_malformed_json_names_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + "\n{\"input\": \"x\",\n", encoding="utf-8")
    with pytest.raises(LmcycleError) as e:
        load_records(path, "jsonl")
    assert_names(e.value, path, 3, None)
    assert "invalid JSON" in e.value.message


def test_line_that_is_not_an_object(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], ["a", "list"]])
    with pytest.raises(LmcycleError) as e:
        load_records(path, "jsonl")
    assert_names(e.value, path, 2, None)
    assert "object" in e.value.message


@pytest.mark.parametrize("gz", [False, True])
def test_non_utf8_names_line(tmp_path, gz):
    path = tmp_path / ("d.jsonl.gz" if gz else "d.jsonl")
    data = (json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + "\n").encode() + b'{"input": "caf\xe9"}\n'
    path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(LmcycleError) as e:
        load_records(path, "jsonl")
    assert_names(e.value, path, 3, None)
    assert "UTF-8" in e.value.message


def test_non_utf8_csv_names_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"input,target\nok,fine\nbad,\xff\xfe\n")
    with pytest.raises(LmcycleError) as e:
        load_records(path, "csv")
    assert_names(e.value, path, 3, None)


def test_broken_gzip(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    path.write_bytes(b"this is not gzip")
    with pytest.raises(LmcycleError) as e:
        load_records(path, "jsonl")
    assert e.value.file == str(path) and "gzip" in e.value.message


@pytest.mark.parametrize(
    ("bad", "field", "words"),
    [
        ({"target": "t"}, "input", "missing"),
        ({"input": 5, "target": "t"}, "input", "string"),
        ({"input": "i", "target": ["ok", 3]}, "target", "string"),
        ({"input": "i", "target": None}, "target", "string"),
        ({"input": "", "target": "t"}, "input", "empty"),
        ({"input": "i", "target": " \n\t "}, "target", "empty"),
        ({"input": "i", "target": []}, "target", "string"),
    ],
)
def test_field_errors_name_file_line_field(tmp_path, bad, field, words):
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], ROWS[1], bad])
    with pytest.raises(LmcycleError) as e:
        load_examples(cfg(path))
    assert_names(e.value, path, 3, field)
    assert words in e.value.message


def test_id_field_errors(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{**ROWS[0], "key": 7}, {**ROWS[1], "key": {"no": 1}}])
    with pytest.raises(LmcycleError) as e:
        load_examples(cfg(path, id_field="key"))
    assert_names(e.value, path, 2, "key")
    ok = load_examples(cfg(path, id_field="key", limit=1))
    assert ok[0].id == "7"


def test_config_validation(tmp_path):
    with pytest.raises(LmcycleError) as e:
        validate(DatasetConfig, {"format": "jsonl"}, file="recipe.yaml")
    assert "path" in str(e.value) and e.value.file == "recipe.yaml"
    with pytest.raises(LmcycleError) as e:
        validate(DatasetConfig, {"format": "xml", "path": "x"}, file="recipe.yaml")
    assert e.value.field == "format"
    with pytest.raises(LmcycleError) as e:
        validate(DatasetConfig, {"format": "synthetic", "limit": 0}, file="recipe.yaml")
    assert e.value.field == "limit"
    with pytest.raises(LmcycleError) as e:
        validate(DatasetConfig, {"format": "synthetic", "colour": "red"}, file="recipe.yaml")
    assert e.value.field == "colour"
    assert validate(DatasetConfig, {"format": "synthetic"}).n == 200


def test_prompt_words_cuts_each_input_to_a_continuation_prompt(tmp_path):
    from lmcycle.data.loaders import DatasetConfig, load_examples

    (tmp_path / "train.jsonl").write_text('{"input": "one two three four five", "target": "t"}\n'
                                          '{"input": "short", "target": "u"}\n')
    cfg = DatasetConfig(format="jsonl", path=str(tmp_path), prompt_words=3)
    assert [ex.input for ex in load_examples(cfg)] == ["one two three", "short"]
    assert [ex.targets for ex in load_examples(cfg)] == [["t"], ["u"]]


@pytest.mark.parametrize("name, content, words", [
    ("d.jsonl", b"", "no records: the file is empty"),
    ("d.jsonl", b"\n  \n", "no records: the file is empty"),
    ("d.jsonl.gz", gzip.compress(b""), "no records: the file is empty"),
    ("d.csv", b"", "no records: the file is empty"),
    ("d.csv", b"input,target\n", "no records after the header"),
], ids=["jsonl", "blank-lines", "gzip", "csv", "csv-header-only"])
def test_a_file_without_records_is_an_error_naming_it(tmp_path, name, content, words):
    path = tmp_path / name
    path.write_bytes(content)
    fmt = "csv" if ".csv" in name else "jsonl"
    with pytest.raises(LmcycleError) as e:
        load_examples(cfg(path, fmt))
    assert str(e.value) == f"{path}:1: {words}"


def test_a_parquet_file_without_rows_is_an_error_naming_it(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([], schema=pa.schema([("input", pa.string()), ("target", pa.string())])),
                   path)
    with pytest.raises(LmcycleError) as e:
        load_examples(cfg(path, "parquet"))
    assert str(e.value) == f"{path}: the file has no rows"
