"""The GSM8K loader: the real shared copy for counts and targets, small files in tmp for the errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmcycle.config import validate
from lmcycle.data.gsm8k import load_gsm8k, strip_calculator
from lmcycle.data.loaders import DatasetConfig, load_examples
from lmcycle.errors import LmcycleError
from lmcycle.evals.gsm8k import extract_answer

SHARED_GSM8K = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "gsm8k"
SOLUTION = "She has 3 + 4 = <<3+4=7>>7 apples.\n\nThen 7 * 2 = <<7*2=14>>14.\n#### 14"


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture
def fake_dir(tmp_path) -> Path:
    row = {"question": "How many apples?", "answer": SOLUTION}
    write_jsonl(tmp_path / "train.jsonl", [json.dumps(row)] * 3)
    write_jsonl(tmp_path / "test.first500.jsonl", [json.dumps(row | {"answer": "1,000 + 80 = 1,080\n#### 1,080"})])
    return tmp_path


def test_target_is_the_solution_without_calculator_annotations(fake_dir):
    examples = load_gsm8k(fake_dir, "train")
    assert len(examples) == 3 and all(ex.task == "gsm8k" for ex in examples)
    target = examples[0].target
    assert "<<" not in target and ">>" not in target and "\n\n" not in target
    assert target == "She has 3 + 4 = 7 apples.\nThen 7 * 2 = 14.\n#### 14"
    assert examples[0].meta["answer"] == "14" and examples[0].input == "How many apples?"
    assert len({ex.id for ex in examples}) == 3  # ids come from the line, so repeated questions stay distinct


def test_keep_calculator_option_and_test_split(fake_dir):
    kept = load_examples(DatasetConfig(format="gsm8k", path=str(fake_dir), keep_calculator=True))
    assert "<<3+4=7>>" in kept[0].target and kept[0].target.endswith("#### 14")
    test = load_examples(DatasetConfig(format="gsm8k", path=str(fake_dir), split="test"))
    assert [ex.meta["answer"] for ex in test] == ["1,080"]
    with pytest.raises(LmcycleError, match="keep_calculator"):
        validate(DatasetConfig, {"format": "jsonl", "path": "x", "keep_calculator": True})


def test_strip_calculator_removes_every_annotation():
    assert strip_calculator("a <<1+1=2>>2 b <<2*3=6>>6") == "a 2 b 6"


def test_errors_name_file_line_and_field(tmp_path):
    with pytest.raises(LmcycleError, match="not found") as err:
        load_gsm8k(tmp_path / "missing", "train")
    assert err.value.file == str(tmp_path / "missing")
    with pytest.raises(LmcycleError, match="no train split"):
        load_gsm8k(tmp_path, "train")
    with pytest.raises(LmcycleError, match="unknown GSM8K split") as err:
        load_gsm8k(tmp_path, "dev")
    assert err.value.field == "split"

    good = json.dumps({"question": "q", "answer": SOLUTION})
    bad_json = write_jsonl(tmp_path / "a.jsonl", [good, '{"question": "q", "answer": '])
    with pytest.raises(LmcycleError, match="invalid JSON") as err:
        load_gsm8k(bad_json, "train")
    assert (err.value.file, err.value.line) == (str(bad_json), 2)

    no_answer = write_jsonl(tmp_path / "b.jsonl", [good, good, json.dumps({"question": "q"})])
    with pytest.raises(LmcycleError, match="missing field") as err:
        load_gsm8k(no_answer, "train")
    assert (err.value.line, err.value.field) == (3, "answer")

    no_final = write_jsonl(tmp_path / "c.jsonl", [json.dumps({"question": "q", "answer": "just 5"})])
    with pytest.raises(LmcycleError, match="####") as err:
        load_gsm8k(no_final, "train")
    assert (err.value.line, err.value.field) == (1, "answer")


@pytest.mark.shared_data
def test_real_gsm8k_splits():
    if not SHARED_GSM8K.is_dir():
        pytest.skip(reason=f"shared GSM8K copy not found at {SHARED_GSM8K}")
    train, test = load_gsm8k(SHARED_GSM8K, "train"), load_gsm8k(SHARED_GSM8K, "test")
    assert (len(train), len(test)) == (7473, 500)
    assert not {ex.input for ex in train} & {ex.input for ex in test}
    for ex in train + test:
        assert "<<" not in ex.target and "\n\n" not in ex.target
        assert ex.target.endswith("#### " + ex.meta["answer"])
        # The metric reads the same gold number from the target as the raw final answer says.
        assert extract_answer(ex.target) == extract_answer(ex.meta["answer"]) is not None
    kept = load_gsm8k(SHARED_GSM8K, "test", keep_calculator=True)
    assert sum("<<" in ex.target for ex in kept) > 400
