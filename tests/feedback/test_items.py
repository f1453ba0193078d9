"""Completions files: each malformed line is one error naming the file, the line and the field."""

from __future__ import annotations

import pytest

from lmcycle.errors import LmcycleError
from lmcycle.feedback.items import Completion, ItemSpec, read_completions


def _bad(item_row, change):
    row = item_row("p2")
    change(row)
    return row


CASES = [
    ("missing prompt", lambda r: r.pop("prompt"), "prompt", "missing field"),
    ("missing prompt_id", lambda r: r.pop("prompt_id"), "prompt_id", "missing field"),
    ("missing completions", lambda r: r.pop("completions"), "completions", "missing field"),
    ("completion without text", lambda r: r["completions"][1].pop("text"), "completions.1.text", "missing field"),
    ("completion without model", lambda r: r["completions"][2].pop("model"), "completions.2.model", "missing field"),
    ("completion without id", lambda r: r["completions"][0].pop("id"), "completions.0.id", "missing field"),
    ("empty text", lambda r: r["completions"][1].update(text="  "), "completions.1.text", "empty text"),
    ("duplicate id", lambda r: r["completions"][2].update(id="c0"), "completions.2.id",
     "duplicate completion id 'c0'"),
    ("duplicate text", lambda r: r["completions"][1].update(text=r["completions"][0]["text"]), "completions.1.text",
     "the same text as completion 0"),
    ("k = 1", lambda r: r.update(completions=r["completions"][:1]), "completions", "at least 2 to rank"),
    ("not a list", lambda r: r.update(completions="abc"), "completions", "expected a list"),
    ("unknown key", lambda r: r.update(gold_ranking=[["c0"]]), "gold_ranking", "unknown key"),
    ("unknown completion key", lambda r: r["completions"][0].update(score=1), "completions.0.score",
     "unknown key"),
    ("gold skips one", lambda r: r.update(gold=[["c0"], ["c1"]]), "gold", "skips completion(s) c2"),
    ("gold names unknown", lambda r: r.update(gold=[["c0"], ["c1", "c2", "c9"]]), "gold", "'c9'"),
    ("overlap 0", lambda r: r.update(overlap=0), "overlap", "integer >= 1"),
    ("decoding not an object", lambda r: r["completions"][0].update(decoding=[1]), "completions.0.decoding",
     "expected an object"),
]


@pytest.mark.parametrize(("change", "field", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_bad_line_is_named_with_its_field(tmp_path, item_row, write_rows, change, field, message):
    path = write_rows(tmp_path / "items.jsonl", [item_row("p1"), _bad(item_row, change), item_row("p3")])
    with pytest.raises(LmcycleError) as err:
        read_completions(path)
    assert (err.value.file, err.value.line, err.value.field) == (str(path), 2, field)
    assert message in err.value.message
    assert str(err.value).startswith(f"{path}:2: field '{field}': ")
    assert "\n" not in str(err.value)


def test_a_prompt_id_twice_names_both_lines(tmp_path, item_row, write_rows):
    path = write_rows(tmp_path / "items.jsonl", [item_row("p1"), item_row("p2"), item_row("p1")])
    with pytest.raises(LmcycleError, match="already used on line 1") as err:
        read_completions(path)
    assert (err.value.line, err.value.field) == (3, "prompt_id")


def test_malformed_json_names_the_line(tmp_path, item_row, write_rows):
    path = write_rows(tmp_path / "items.jsonl", [item_row("p1"), '{"prompt_id": "p2", '])
    with pytest.raises(LmcycleError, match="invalid JSON") as err:
        read_completions(path)
    assert err.value.line == 2


def test_a_good_file_reads_every_field(tmp_path, item_row, write_rows):
    rows = [item_row("p1", k=4, gold=[["c3"], ["c0", "c1"], ["c2"]], overlap=5, meta={"reference": "r"}),
            item_row(7, k=2)]  # an integer prompt id is taken as its string
    items = read_completions(write_rows(tmp_path / "items.jsonl", rows))
    assert [i.prompt_id for i in items] == ["p1", "7"]
    first = items[0]
    assert [c.id for c in first.completions] == ["c0", "c1", "c2", "c3"]
    assert first.completions[2] == Completion("c2", rows[0]["completions"][2]["text"], "tiny-sft",
                                              {"do_sample": True, "top_p": 0.9, "seed": 2})
    assert (first.gold, first.overlap, first.meta, first.line) == ([["c3"], ["c0", "c1"], ["c2"]], 5,
                                                                   {"reference": "r"}, 1)
    assert (items[1].gold, items[1].overlap, items[1].line) == (None, None, 2)


def test_an_item_made_in_code_is_checked_too():
    # the completions stage builds ItemSpecs without a file: the same rules hold
    one = [Completion("a", "x", "m")]
    with pytest.raises(LmcycleError, match="at least 2") as err:
        ItemSpec("p", "prompt", one)
    assert err.value.field == "completions"
    with pytest.raises(LmcycleError, match="duplicate completion id"):
        ItemSpec("p", "prompt", [Completion("a", "x", "m"), Completion("a", "y", "m")])
    with pytest.raises(LmcycleError, match="skips completion") as err:
        ItemSpec("p", "prompt", [Completion("a", "x", "m"), Completion("b", "y", "m")], gold=[["b"]])
    assert err.value.field == "gold"
