"""Preference pairs as recipe datasets: formats hh_rlhf and rankings, the by-prompt split, empty replies, the
Example <-> PreferencePair mapping. The HH-RLHF texts are offensive: only counts and ids are asserted."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import pytest

from lmcycle.data.examples import Example
from lmcycle.data.loaders import DatasetConfig, load_examples
from lmcycle.data.preferences import (
    PREFERENCE_TEST_FRACTION,
    PreferencePair,
    examples_from_pairs,
    load_hh_rlhf,
    pairs_from_examples,
    preference_split,
)
from lmcycle.errors import LmcycleError

HH_FILE = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "hh_rlhf" / \
    "harmless-base.test.shared.jsonl.gz"


def hh_row(i: int, chosen: str = "yes", rejected: str = "no") -> dict:
    context = f"\n\nHuman: question {i // 2}?\n\nAssistant:"  # two rows per prompt
    return {"chosen": f"{context} {chosen}" if chosen else context,
            "rejected": f"{context} {rejected}" if rejected else context}


def write_hh(path: Path, rows: list[dict]) -> Path:
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    return path


def load(fmt: str, path: Path, split: str) -> list[Example]:
    return load_examples(DatasetConfig(format=fmt, path=str(path), split=split))


def test_hh_split_is_by_prompt_disjoint_and_covers_everything(tmp_path):
    f = write_hh(tmp_path / "hh.jsonl.gz", [hh_row(i) for i in range(200)])  # 100 prompts, 2 pairs each
    train, test, every = (load("hh_rlhf", f, s) for s in ("train", "test", "all"))
    assert len(every) == 200 and len(train) + len(test) == 200
    assert not {e.id for e in train} & {e.id for e in test}
    assert len({e.id for e in test}) == round(PREFERENCE_TEST_FRACTION * 100)
    assert sorted(e.input for e in train + test) == sorted(e.input for e in every)
    # the split is fixed (not the recipe seed's): a second load gives the same test prompts
    assert [e.id for e in load("hh_rlhf", f, "test")] == [e.id for e in test]


def test_a_folder_with_one_file_works_and_a_bad_split_is_an_error(tmp_path):
    write_hh(tmp_path / "hh.jsonl.gz", [hh_row(i) for i in range(20)])
    assert len(load("hh_rlhf", tmp_path, "all")) == 20
    with pytest.raises(LmcycleError, match="unknown split 'dev'"):
        load("hh_rlhf", tmp_path, "dev")
    write_hh(tmp_path / "more.jsonl.gz", [hh_row(0)])
    with pytest.raises(LmcycleError, match="exactly one") as err:
        load("hh_rlhf", tmp_path, "all")
    assert err.value.file == str(tmp_path)


def test_pairs_with_an_empty_reply_are_dropped_and_counted(tmp_path, caplog):
    rows = [hh_row(i) for i in range(10)] + [hh_row(20, chosen=""), hh_row(22, rejected="")]
    f = write_hh(tmp_path / "hh.jsonl.gz", rows)
    assert len(load_hh_rlhf(f)) == 12  # the pair reader keeps them ...
    with caplog.at_level(logging.WARNING, logger="lmcycle.data.preferences"):
        examples = load("hh_rlhf", f, "all")
    assert len(examples) == 10 and all(e.target.strip() and e.meta["rejected"].strip() for e in examples)
    assert "left out 2 preference pair(s) with an empty reply" in caplog.text  # ... the dataset drops them


def test_an_hh_example_is_prompt_chosen_and_rejected(tmp_path):
    f = write_hh(tmp_path / "hh.jsonl.gz", [hh_row(0, "good", "bad")])
    (ex,) = load("hh_rlhf", f, "all")
    assert ex.input.endswith("\n\nAssistant:") and ex.targets == [" good"]
    assert ex.meta == {"rejected": " bad", "margin": 1.0, "labeler": ""}
    assert ex.id.startswith("hh-")


def test_rankings_dataset_gives_every_strict_pair(tmp_path):
    f = tmp_path / "r.jsonl"
    rows = [{"prompt_id": f"q{i}", "prompt": f"prompt {i}", "completions": ["a", "b", "c"], "ranks": [1, 2, 3],
             "labeler": "ann"} for i in range(40)]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    every = load("rankings", f, "all")
    assert len(every) == 40 * 3
    assert {(e.target, e.meta["rejected"], e.meta["margin"]) for e in every if e.id == "q0"} == \
        {("a", "b", 1.0), ("a", "c", 2.0), ("b", "c", 1.0)}
    train, test = load("rankings", f, "train"), load("rankings", f, "test")
    assert len(train) + len(test) == 120 and not {e.id for e in train} & {e.id for e in test}
    assert all(e.meta["labeler"] == "ann" for e in every)


def test_a_bad_rankings_file_names_file_line_and_field(tmp_path):
    f = tmp_path / "r.jsonl"
    good = {"prompt_id": "q1", "prompt": "p", "completions": ["a", "b"], "ranks": [1, 2]}
    f.write_text(json.dumps(good) + "\n" + json.dumps({**good, "prompt_id": "q2", "ranks": [1, "x"]}) + "\n")
    with pytest.raises(LmcycleError) as err:
        load("rankings", f, "all")
    assert (err.value.file, err.value.line, err.value.field) == (str(f), 2, "ranks")


def test_examples_and_pairs_convert_both_ways():
    pairs = [PreferencePair("p1", "prompt", "good", "bad", "ann", 2.0), PreferencePair("p2", "q", "x", "y")]
    assert pairs_from_examples(examples_from_pairs(pairs)) == pairs


def test_a_dataset_without_rejected_replies_is_not_preference_data():
    with pytest.raises(LmcycleError, match="dataset 'train' is not preference data") as err:
        pairs_from_examples([Example(input="a", targets=["b"], id="e1")], "train")
    assert err.value.field == "data"
    with pytest.raises(LmcycleError, match="has no examples"):
        pairs_from_examples([], "train")


def test_preference_split_keeps_order_and_rejects_unknown_splits():
    pairs = [PreferencePair(f"p{i % 7}", "x", "a", "b") for i in range(21)]
    train, test = preference_split(pairs, "train"), preference_split(pairs, "test")
    assert [p for p in pairs if p in train or p in test] == pairs
    with pytest.raises(LmcycleError, match="unknown split"):
        preference_split(pairs, "validation")


def test_real_hh_file_split_counts():
    if not HH_FILE.is_file():
        pytest.skip(reason=f"the shared HH-RLHF file is not here ({HH_FILE})")
    train, test, every = (load("hh_rlhf", HH_FILE, s) for s in ("train", "test", "all"))
    # 1,312 pairs (1,311 prompts), 4 with an empty chosen reply left out
    assert len(every) == 1308 and len(train) + len(test) == 1308
    assert not {e.id for e in train} & {e.id for e in test}
    n_prompts = len({e.id for e in every})
    assert abs(len({e.id for e in test}) - PREFERENCE_TEST_FRACTION * n_prompts) <= 2


def test_rankings_that_form_no_pair_name_the_file(tmp_path):
    f = tmp_path / "r.jsonl"
    rows = [{"prompt_id": "q1", "prompt": "p", "completions": ["a", "b", "c"], "ranks": [1, 1, 1]},
            {"prompt_id": "q2", "prompt": "p2", "completions": ["a", "b"], "ranks": [None, 2]},
            {"prompt_id": "q3", "prompt": "p3", "completions": ["a", "b"], "special": "unsafe prompt"}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(LmcycleError, match="no preference pair can be formed") as err:
        load("rankings", f, "all")
    assert (err.value.file, err.value.field) == (str(f), "ranks")
    rows[0]["ranks"] = [1, 2, 2]  # one strict pair is enough
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(load("rankings", f, "all")) == 2


def test_a_split_left_without_examples_names_the_file_and_split(tmp_path):
    f = write_hh(tmp_path / "hh.jsonl.gz", [hh_row(i, chosen="") for i in range(6)])  # every pair dropped
    with pytest.raises(LmcycleError) as err:
        load("hh_rlhf", f, "all")
    assert (err.value.file, err.value.field) == (str(f), "split") and "no examples in split 'all'" in str(err.value)
