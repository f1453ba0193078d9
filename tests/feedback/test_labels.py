"""Labels on their own: rankings with ties, special labels, ratings, and the pairs lmcycle makes of them."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmcycle.data.preferences import Ranking, rankings_to_pairs
from lmcycle.errors import LmcycleError
from lmcycle.feedback.labels import Label, RatingScale, check_label, check_ranking, gold_agreement, ranks_of

IDS = ["a", "b", "c", "d"]
TOX = RatingScale("toxicity", 0.0, 1.0)


@pytest.mark.parametrize(("ranking", "message"), [
    ([["a"], ["b", "c"]], "skips completion(s) d"),
    ([["a", "b"], ["c", "d", "e"]], "'e', which is not a completion"),
    ([["a", "b"], ["c", "a"], ["d"]], "completion 'a' is ranked twice"),
    ([["a", "b"], [], ["c", "d"]], "group 1 is not a non-empty list"),
    ([], "non-empty list of groups"),
    ([["a", "b", "c", 4]], "4, which is not a completion"),
])
def test_a_ranking_must_name_every_completion_once(ranking, message):
    with pytest.raises(LmcycleError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        check_ranking(ranking, IDS)
    assert err.value.field == "ranking"


@pytest.mark.parametrize(("label", "field", "message"), [
    (Label(), "special", "either a ranking or a special label"),
    (Label(ranking=[IDS], special="unsafe", reason="x"), "ranking", "not both"),
    (Label(special="boring", reason="x"), "special", "unknown special label"),
    (Label(special="unsafe"), "reason", "needs a reason"),
    (Label(special="not_rankable", reason="   "), "reason", "needs a reason"),
    (Label(ranking=[IDS], ratings={"a": 1.5}), "ratings.a", "outside [0.0, 1.0]"),
    (Label(ranking=[IDS], ratings={"a": math.nan}), "ratings.a", "outside"),
    (Label(ranking=[IDS], ratings={"z": 0.5}), "ratings", "not a completion"),
    (Label(ranking=[IDS], comment="x" * 10_001), "comment", "longer than"),
])
def test_check_label_names_the_broken_rule(label, field, message):
    with pytest.raises(LmcycleError, match=message.replace("[", r"\[").replace("]", r"\]")) as err:
        check_label(label, IDS, TOX)
    assert err.value.field == field


def test_ratings_need_a_scale_and_good_labels_pass():
    with pytest.raises(LmcycleError, match="no rating scale"):
        check_label(Label(ranking=[IDS], ratings={"a": 0.5}), IDS, None)
    check_label(Label(ranking=[["b"], ["a", "c"], ["d"]], ratings={"a": 0.0, "d": 1.0}, comment="ok"), IDS, TOX)
    check_label(Label(special="unsafe", reason="threatens someone", ratings={"c": 1.0}), IDS, TOX)


def test_label_from_json_checks_types():
    label = Label.from_dict({"ranking": [["b"], ["a"]], "ratings": {"a": 1}, "comment": "fine"})
    assert label == Label(ranking=[["b"], ["a"]], ratings={"a": 1.0}, comment="fine")
    assert Label.from_dict({"special": "unsafe", "reason": "r"}).special == "unsafe"
    for data, field in [({"ranking": "a>b"}, "ranking"), ({"ranking": [["a", 2]]}, "ranking"),
                        ({"special": 3}, "special"), ({"ratings": {"a": True}}, "ratings.a"),
                        ({"ratings": [0.5]}, "ratings"), ({"rank": [["a"]]}, "rank"), ([1], "label")]:
        with pytest.raises(LmcycleError) as err:
            Label.from_dict(data)
        assert err.value.field == field, data


def test_ranks_are_dense_and_gold_agreement_counts_strict_pairs():
    assert ranks_of([["b"], ["a", "c"], ["d"]]) == {"b": 1, "a": 2, "c": 2, "d": 3}
    gold = [["a"], ["b"], ["c", "d"]]  # strict pairs: ab ac ad bc bd (cd is tied, not counted)
    assert gold_agreement(gold, gold) == (5, 5)
    assert gold_agreement(gold, [["d", "c"], ["b"], ["a"]]) == (0, 5)
    assert gold_agreement(gold, [["a", "b"], ["c"], ["d"]]) == (4, 5)  # the a-b tie is a miss


@st.composite
def groupings(draw):
    ids = draw(st.permutations(IDS + ["e", "f"]))
    cuts = sorted(draw(st.sets(st.integers(1, len(ids) - 1))))
    bounds = [0, *cuts, len(ids)]
    return [list(ids[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]


@given(groupings())
def test_groups_become_the_pairs_lmcycle_trains_on(groups):
    """The dense ranks of a grouping, read by lmcycle's own pairing, give exactly the pairs across groups, each
    with the better group chosen and the group distance as its margin."""
    ids = check_ranking(groups, sorted(IDS + ["e", "f"]))
    ranks = ranks_of(ids)
    completions = sorted(ranks)
    pairs = rankings_to_pairs([Ranking("p", "prompt", completions, [ranks[c] for c in completions])])
    got = {(p.chosen, p.rejected): p.margin for p in pairs}
    want = {(a, b): float(j - i) for i, ga in enumerate(groups) for j, gb in enumerate(groups) if i < j
            for a in ga for b in gb}
    assert got == want
