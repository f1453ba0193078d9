"""Preference data: rankings to pairs, prompt-grouped splits, labeler agreement, the loaders.

The HH-RLHF texts are offensive: these tests only assert on counts and structure, never print texts.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from lmcycle.data.preferences import (
    PreferencePair,
    Ranking,
    labeler_agreement,
    load_hh_rlhf,
    load_rankings,
    pairing_summary,
    rankings_to_pairs,
    split_by_prompt,
)
from lmcycle.errors import LmcycleError

SHARED_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
HH_FILE = SHARED_DATA / "hh_rlhf" / "harmless-base.test.shared.jsonl.gz"
COMPLETIONS = ["a", "b", "c", "d"]


def ranking(ranks, pid="p1", labeler="", special=None, completions=COMPLETIONS):
    return Ranking(pid, f"prompt {pid}", list(completions), list(ranks), labeler, special)


def test_four_completions_without_ties_give_six_pairs():
    assert len(rankings_to_pairs([ranking([1, 2, 3, 4])])) == 6


def test_one_tie_removes_one_pair_and_all_tied_give_none():
    assert len(rankings_to_pairs([ranking([1, 2, 2, 3])])) == 5
    assert rankings_to_pairs([ranking([1, 1, 1, 1])]) == []


def test_unranked_completion_takes_no_part():
    pairs = rankings_to_pairs([ranking([1, None, 2, 3])])
    assert len(pairs) == 3
    assert all("b" not in (p.chosen, p.rejected) for p in pairs)


def test_chosen_has_the_better_rank_and_margin_is_rank_difference():
    ranks = [3, 1, 4, 2]
    rank_of = dict(zip(COMPLETIONS, ranks, strict=True))
    pairs = rankings_to_pairs([ranking(ranks)])
    for p in pairs:
        assert rank_of[p.chosen] < rank_of[p.rejected]
        assert p.margin == rank_of[p.rejected] - rank_of[p.chosen]
    assert {(p.chosen, p.rejected) for p in pairs} >= {("b", "d"), ("d", "a"), ("a", "c")}


def test_special_rankings_give_no_pairs_and_are_counted():
    rankings = [ranking([1, 2, 3, 4], "p1"), ranking([None] * 4, "p2", special="unsafe"),
                ranking([1, 2, 3, 4], "p3", special="not_rankable"), ranking([1, 1, 2, 3], "p4")]
    pairs = rankings_to_pairs(rankings)
    assert {p.prompt_id for p in pairs} == {"p1", "p4"}
    summary = pairing_summary(rankings)
    assert summary["special"] == {"unsafe": 1, "not_rankable": 1}
    assert summary["special_total"] == 2
    assert summary["pairs"] == len(pairs) == 6 + 5
    assert summary["tied_pairs"] == 1
    assert summary["prompts"] == 4


def test_each_labeler_gives_its_own_pair_set():
    rankings = [ranking([1, 2, 3, 4], labeler="x"), ranking([4, 3, 2, 1], labeler="y")]
    pairs = rankings_to_pairs(rankings)
    assert len(pairs) == 12
    assert {p.labeler for p in pairs} == {"x", "y"}
    x = {(p.chosen, p.rejected) for p in pairs if p.labeler == "x"}
    y = {(p.rejected, p.chosen) for p in pairs if p.labeler == "y"}
    assert x == y  # y ranked in reverse, so every pair appears both ways


def test_pairs_of_one_prompt_are_consecutive():
    rankings = [ranking([1, 2, 3, 4], "p1", "x"), ranking([1, 2, 3, 4], "p2", "x"),
                ranking([2, 1, 3, 4], "p1", "y"), ranking([1, 2, 2, 4], "p3", "x"),
                ranking([1, 3, 2, 4], "p2", "y")]
    ids = [p.prompt_id for p in rankings_to_pairs(rankings)]
    blocks = [pid for i, pid in enumerate(ids) if i == 0 or ids[i - 1] != pid]
    assert blocks == ["p1", "p2", "p3"]
    assert ids.count("p1") == 12 and ids.count("p2") == 12 and ids.count("p3") == 5


def many_pairs(n_prompts=40):
    return rankings_to_pairs([ranking([1, 2, 3, 3], f"q{i}", lab) for i in range(n_prompts) for lab in "xy"])


def test_split_never_puts_one_prompt_on_both_sides():
    pairs = many_pairs()
    train, dev = split_by_prompt(pairs, 0.25, seed=3)
    train_ids, dev_ids = {p.prompt_id for p in train}, {p.prompt_id for p in dev}
    assert not train_ids & dev_ids
    assert len(dev_ids) == 10 and len(train_ids) == 30
    assert len(train) + len(dev) == len(pairs)


def test_split_is_deterministic_and_moves_with_seed():
    pairs = many_pairs()
    ids = [{p.prompt_id for p in split_by_prompt(pairs, 0.25, seed=s)[1]} for s in (1, 1, 2)]
    assert ids[0] == ids[1]
    assert ids[0] != ids[2]


def test_split_rejects_bad_fraction():
    with pytest.raises(LmcycleError, match="dev_fraction"):
        split_by_prompt(many_pairs(2), 1.0)


def test_identical_rankings_agree_fully():
    rankings = [ranking([1, 2, 3, 4], pid, lab) for pid in ("p1", "p2") for lab in ("x", "y")]
    report = labeler_agreement(rankings)
    (row,) = report["labeler_pairs"]
    assert row["shared_prompts"] == 2 and row["compared"] == 12
    assert row["agreement"] == 1.0 and row["kendall_tau_b"] == pytest.approx(1.0)


def test_reversed_rankings_never_agree():
    report = labeler_agreement([ranking([1, 2, 3, 4], labeler="x"), ranking([4, 3, 2, 1], labeler="y")])
    assert report["agreement"] == 0.0
    assert report["labeler_pairs"][0]["kendall_tau_b"] == pytest.approx(-1.0)


def test_agreement_matches_completions_by_text_and_skips_ties():
    # y sees the completions in another order; same preferences except one swap and one tie.
    x = ranking([1, 2, 3, 4], labeler="x")
    y = Ranking("p1", "prompt p1", ["d", "c", "b", "a"], [4, 3, 1, 1], "y")
    row = labeler_agreement([x, y])["labeler_pairs"][0]
    # a-b is tied by y (not compared); the other 5 pairs are strict in both and ordered alike
    assert row["compared"] == 5 and row["agreed"] == 5
    assert 0 < row["kendall_tau_b"] < 1  # the tie lowers tau-b below 1


def test_agreement_leaves_out_special_and_unnamed_and_unshared():
    rankings = [ranking([1, 2, 3, 4], "p1", "x"), ranking([1, 2, 3, 4], "p1", "y", special="unsafe"),
                ranking([1, 2, 3, 4], "p1"), ranking([2, 1, 3, 4], "p2", "y")]
    report = labeler_agreement(rankings)
    assert report["skipped_special"] == 1 and report["skipped_unnamed"] == 1
    assert report["compared"] == 0 and report["agreement"] is None
    assert report["labeler_pairs"][0]["shared_prompts"] == 0


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


GOOD = {"prompt_id": "p1", "prompt": "Say hi", "completions": ["hi", "hello", "hey"], "ranks": [1, 2, 2],
        "labeler": "x"}


def test_load_rankings_reads_good_rows(tmp_path):
    rows = [GOOD, {**GOOD, "labeler": "y", "ranks": [3, 1, 2]},
            {**GOOD, "prompt_id": "p2", "labeler": "x", "ranks": None, "special": "unsafe"}]
    rankings = load_rankings(write_jsonl(tmp_path / "r.jsonl", rows))
    assert [r.labeler for r in rankings] == ["x", "y", "x"]
    assert rankings[2].special == "unsafe" and rankings[2].ranks == [None, None, None]
    assert len(rankings_to_pairs(rankings)) == 2 + 3


@pytest.mark.parametrize(("change", "field"), [
    ({"prompt_id": None}, "prompt_id"),
    ({"prompt": ""}, "prompt"),
    ({"completions": ["only one"]}, "completions"),
    ({"completions": ["hi", "hi", "hey"]}, "completions"),
    ({"completions": ["hi", "  ", "hey"]}, "completions"),
    ({"ranks": [1, 2]}, "ranks"),
    ({"ranks": [1, 0, 2]}, "ranks"),
    ({"ranks": [1, 2.5, 2]}, "ranks"),
    ({"ranks": [1, "2", 3]}, "ranks"),
    ({"ranks": [True, 2, 3]}, "ranks"),
    ({"special": ""}, "special"),
    ({"labeler": 7}, "labeler"),
])
def test_load_rankings_errors_name_file_line_and_field(tmp_path, change, field):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, {**GOOD, "labeler": "y", **change}])
    with pytest.raises(LmcycleError) as err:
        load_rankings(path)
    assert err.value.file == str(path) and err.value.line == 2 and err.value.field == field
    assert str(err.value).startswith(f"{path}:2: field '{field}'")


def test_load_rankings_missing_fields(tmp_path):
    for name in ("prompt_id", "prompt", "completions", "ranks"):
        row = {k: v for k, v in GOOD.items() if k != name}
        path = write_jsonl(tmp_path / f"missing_{name}.jsonl", [row])
        with pytest.raises(LmcycleError, match="missing field") as err:
            load_rankings(path)
        assert (err.value.line, err.value.field) == (1, name)


def test_load_rankings_rejects_reused_prompt_id_and_repeated_labeler(tmp_path):
    with pytest.raises(LmcycleError) as err:
        load_rankings(write_jsonl(tmp_path / "a.jsonl", [GOOD, {**GOOD, "labeler": "y", "prompt": "other"}]))
    assert (err.value.line, err.value.field) == (2, "prompt_id")
    with pytest.raises(LmcycleError) as err:
        load_rankings(write_jsonl(tmp_path / "b.jsonl", [GOOD, "", {**GOOD, "ranks": [2, 1, 3]}]))
    assert (err.value.line, err.value.field) == (3, "labeler")


def test_load_rankings_bad_json_names_line(tmp_path):
    with pytest.raises(LmcycleError) as err:
        load_rankings(write_jsonl(tmp_path / "j.jsonl", [GOOD, "{not json"]))
    assert err.value.line == 2


def hh_row(context: str, chosen: str, rejected: str) -> dict:
    return {"chosen": f"{context}\n\nAssistant: {chosen}", "rejected": f"{context}\n\nAssistant: {rejected}"}


def test_load_hh_rlhf_splits_at_last_assistant_turn(tmp_path):
    ctx = "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Tell me a fact"
    rows = [hh_row(ctx, "Water is wet.", "No."), hh_row(ctx, "Cats purr.", "Go away.")]
    path = tmp_path / "hh.jsonl.gz"
    path.write_bytes(gzip.compress("\n".join(map(json.dumps, rows)).encode()))
    pairs = load_hh_rlhf(path)
    assert len(pairs) == 2
    for row, p in zip(rows, pairs, strict=True):
        assert p.prompt == ctx + "\n\nAssistant:"
        assert p.prompt + p.chosen == row["chosen"] and p.prompt + p.rejected == row["rejected"]
    assert pairs[0].prompt_id == pairs[1].prompt_id  # same prompt, same group


def test_load_hh_rlhf_diverging_transcripts_use_shared_context(tmp_path):
    row = {"chosen": "\n\nHuman: Q\n\nAssistant: A1\n\nHuman: more\n\nAssistant: B",
           "rejected": "\n\nHuman: Q\n\nAssistant: A2\n\nHuman: more\n\nAssistant: C"}
    (p,) = load_hh_rlhf(write_jsonl(tmp_path / "d.jsonl", [row]))
    assert p.prompt == "\n\nHuman: Q\n\nAssistant:"
    assert p.prompt + p.chosen == row["chosen"] and p.prompt + p.rejected == row["rejected"]


def test_load_hh_rlhf_keeps_an_empty_preferred_reply(tmp_path):
    row = {"chosen": "\n\nHuman: Q\n\nAssistant:", "rejected": "\n\nHuman: Q\n\nAssistant: B"}
    (p,) = load_hh_rlhf(write_jsonl(tmp_path / "s.jsonl", [row]))
    assert (p.prompt, p.chosen, p.rejected) == ("\n\nHuman: Q\n\nAssistant:", "", " B")


def test_load_hh_rlhf_errors(tmp_path):
    cases = [({"chosen": "\n\nHuman: Q\n\nAssistant: A"}, "rejected"),
             ({"chosen": "no turns here", "rejected": "none either"}, "chosen"),
             ({"chosen": "\n\nHuman: Q\n\nAssistant: A", "rejected": ""}, "rejected")]
    for i, (row, field) in enumerate(cases):
        path = write_jsonl(tmp_path / f"e{i}.jsonl", [hh_row("\n\nHuman: ok", "a", "b"), row])
        with pytest.raises(LmcycleError) as err:
            load_hh_rlhf(path)
        assert (err.value.file, err.value.line, err.value.field) == (str(path), 2, field)


@pytest.mark.shared_data
def test_real_hh_rlhf_file_parses_every_row():
    if not HH_FILE.is_file():
        pytest.skip(reason=f"shared HH-RLHF data not found at {HH_FILE}")
    pairs = load_hh_rlhf(HH_FILE)
    assert len(pairs) == 1312
    assert all(isinstance(p, PreferencePair) for p in pairs)
    assert all(p.prompt.strip() and p.rejected.strip() for p in pairs)
    # Counted independently (raw text after the last Assistant tag): 4 preferred replies are empty.
    assert sum(not p.chosen.strip() for p in pairs) == 4
    assert all(p.prompt.endswith("Assistant:") and p.prompt.startswith("\n\nHuman:") for p in pairs)
    assert sum(p.chosen != p.rejected for p in pairs) > 1200
    train, dev = split_by_prompt(pairs, 0.1, seed=0)
    assert not {p.prompt_id for p in train} & {p.prompt_id for p in dev}
    assert len(train) + len(dev) == 1312
