"""Agreement between labelers: tau-b, Krippendorff's alpha, Borda consensus, leave-one-out agreement, gold
accuracy, outliers and weights, each against a hand computation or a simulation with known labelers; the
ratings field of rankings; rankings out of the label store; ``lmcycle label stats`` with agreement."""

from __future__ import annotations

import json
import random

import pytest

from lmcycle.cli.main import main
from lmcycle.data.preferences import Ranking, labeler_agreement, load_rankings, rank_concordance
from lmcycle.errors import LmcycleError
from lmcycle.feedback.agreement import (
    agreement_plot,
    agreement_report,
    consensus,
    labeler_weights,
    normalised_ranks,
)
from lmcycle.feedback.export import rankings_from_snapshot, write_export
from lmcycle.feedback.labels import Label, RatingScale
from lmcycle.feedback.store import LabelStore

ABC = ["a", "b", "c"]


def rk(labeler, ranks, pid="p1", completions=ABC, special=None, ratings=None):
    return Ranking(pid, f"prompt {pid}", list(completions), list(ranks), labeler, special, ratings)


# -- the pieces ------------------------------------------------------------------------------------------------


def test_tau_b_and_pairwise_agreement_by_hand():
    # x strict; y ties a-b and swaps c-d. Pairs: a-b tied by y only; a-c, a-d, b-c, b-d concordant; c-d discordant.
    # C = 4, D = 1, x orders 6 pairs strictly, y 5: tau-b = 3 / sqrt(30).
    x = dict(zip("abcd", [1, 2, 3, 4], strict=True))
    y = dict(zip("abcd", [1, 1, 3, 2], strict=True))
    agreed, compared, tau = rank_concordance(x, y)
    assert (agreed, compared) == (4, 5)
    assert tau == pytest.approx(3 / 30 ** 0.5)
    assert rank_concordance(x, {c: 1 for c in "abcd"})[2] is None  # a side that ties everything has no tau-b


def test_tau_b_equals_scipy_on_random_rankings_with_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = random.Random(3)
    for _ in range(50):
        k = rng.randint(3, 7)
        a, b = [rng.randint(1, 3) for _ in range(k)], [rng.randint(1, 4) for _ in range(k)]
        tau = rank_concordance(dict(enumerate(a)), dict(enumerate(b)))[2]
        want = stats.kendalltau(a, b, variant="b").statistic
        assert (tau is None) == (want != want) and (tau is None or tau == pytest.approx(want))


def test_normalised_ranks_use_mid_ranks():
    assert normalised_ranks({"a": 1, "b": 2, "c": 2}) == {"a": 0.0, "b": 0.75, "c": 0.75}
    assert normalised_ranks({"a": 1, "b": 1, "c": 2}) == {"a": 0.25, "b": 0.25, "c": 1.0}
    assert normalised_ranks({"a": 2, "b": None, "c": 5}) == {"a": 0.0, "c": 1.0}
    assert normalised_ranks({"a": 1, "b": None}) == {}


def test_borda_consensus_ties_equal_means_and_follows_weights():
    # normalised: x (0, .5, 1), y (.5, 0, 1), z ties a-b on top (.25, .25, 1): means a .25, b .25, c 1
    rankings = [rk("x", [1, 2, 3]), rk("y", [2, 1, 3]), rk("z", [1, 1, 2])]
    (c,) = consensus(rankings)
    assert c["scores"] == pytest.approx([0.25, 0.25, 1.0]) and c["ranks"] == [1, 1, 2]
    assert c["labelers"] == ["x", "y", "z"]
    # x counted twice: a (0+0+.5+.25)/4 = .1875, b (.5+.5+0+.25)/4 = .3125
    (w,) = consensus(rankings, {"x": 2.0})  # y and z are missing from the weights: 1.0 each
    assert w["scores"] == pytest.approx([0.1875, 0.3125, 1.0]) and w["ranks"] == [1, 2, 3]
    (none,) = consensus(rankings, {"x": 0.0, "y": 0.0, "z": 0.0})
    assert none["ranks"] == [None, None, None]


def test_consensus_keeps_unranked_completions_apart():
    rankings = [rk("x", [1, None, 2]), rk("y", [2, None, 1], completions=["c", "b", "a"])]
    (c,) = consensus(rankings)
    assert c["completions"] == ABC
    assert c["ranks"] == [1, None, 2] and c["scores"] == [0.0, None, 1.0]


def test_krippendorff_alpha_by_hand():
    # ordinal, 2 labelers on a, b, c: values (0, .5, 1) and (0, 1, .5), each value twice (n = 6).
    # delta(0,.5) = delta(.5,1) = (4 - 2)^2 = 4, delta(0,1) = (6 - 2)^2 = 16; D_o = (8 + 8) / 6, D_e = 192 / 30
    # alpha = 1 - (16/6) / 6.4 = 7/12.
    report = agreement_report([rk("x", [1, 2, 3]), rk("y", [1, 3, 2])])
    assert report["alpha"]["rankings"] == pytest.approx(7 / 12)
    assert report["alpha"]["rankings_units"] == 3
    # interval over ratings (0, 1, .5) vs (0, 1, 1): D_o = 2 * .25 / 6 = 1/12, D_e = 14.5 / 30; alpha = 24/29
    report = agreement_report([rk("x", [1, 2, 3], ratings=[0.0, 1.0, 0.5]),
                               rk("y", [1, 2, 3], ratings=[0.0, 1.0, 1.0])])
    assert report["alpha"]["ratings"] == pytest.approx(24 / 29) and report["alpha"]["ratings_units"] == 3
    assert report["alpha"]["rankings"] == pytest.approx(1.0)


def test_alpha_over_rankings_normalises_rank_within_each_prompt():
    # p1 has 3 completions, p2 has 4: the same value means the same place (0 best, 1 worst) in both
    rankings = [rk("x", [1, 2, 3]), rk("y", [1, 3, 2]),
                rk("x", [1, 2, 3, 4], "p2", list("defg")), rk("y", [1, 2, 4, 3], "p2", list("defg"))]
    krippendorff = pytest.importorskip("krippendorff")
    want = krippendorff.alpha(reliability_data=[[0, .5, 1, 0, 1 / 3, 2 / 3, 1], [0, 1, .5, 0, 1 / 3, 1, 2 / 3]],
                              level_of_measurement="ordinal")
    assert agreement_report(rankings)["alpha"]["rankings"] == pytest.approx(want)


# -- per labeler, by hand ----------------------------------------------------------------------------------------


def four_labelers():
    """x and y rank a > b > c, w a > c > b, z the reverse; on p1 (gold: a, b tied above c) and p2 alike."""
    out = []
    for pid, texts in (("p1", ABC), ("p2", ["d", "e", "f"])):
        out += [rk("x", [1, 2, 3], pid, texts), rk("y", [1, 2, 3], pid, texts), rk("w", [1, 3, 2], pid, texts),
                rk("z", [3, 2, 1], pid, texts)]
    return out


def test_labeler_figures_by_hand():
    report = agreement_report(four_labelers(), {"p1": [1, 1, 2]})
    rows = {r["labeler"]: r for r in report["labelers"]}
    # leave one out, x: the others' means a (0+0+1)/3, b (.5+1+.5)/3, c (1+.5+0)/3 order a < c < b, against
    # x's a < b < c: C = 2, D = 1, tau-b 1/3, agreement 2/3. w against a < b < c: 1/3 too; z reversed: -1.
    assert [rows[n]["loo_tau_b"] for n in "xywz"] == pytest.approx([1 / 3, 1 / 3, 1 / 3, -1])
    assert [rows[n]["loo_agreement"] for n in "xywz"] == pytest.approx([2 / 3, 2 / 3, 2 / 3, 0])
    assert rows["x"]["loo_se"] == 0.0 and rows["x"]["loo_prompts"] == 2
    # mean tau-b with the others: x with y 1, w 1/3, z -1: 1/9; z with x -1, y -1, w -1/3: -7/9
    assert rows["x"]["mean_tau_b"] == pytest.approx(1 / 9) and rows["w"]["mean_tau_b"] == pytest.approx(1 / 9)
    assert rows["z"]["mean_tau_b"] == pytest.approx(-7 / 9)
    # gold with ties: a-c and b-c are the strict pairs; w gets a-c, z neither
    assert [rows[n]["gold_accuracy"] for n in "xywz"] == [1.0, 1.0, 0.5, 0.0]
    assert rows["x"]["gold_pairs"] == 2 and rows["x"]["gold_labels"] == 1
    # z trails the median 1/3 with no spread at all and agrees worse than chance
    assert report["outliers"] == ["z"] and report["outlier_median"] == pytest.approx(1 / 3)
    # weights: x, y mean(1/3, 2*1-1) = 2/3; w mean(1/3, 0) = 1/6; z 0. Mean 3/8, so 16/9, 16/9, 4/9, 0.
    assert [rows[n]["weight"] for n in "xywz"] == pytest.approx([16 / 9, 16 / 9, 4 / 9, 0.0])
    assert labeler_weights(four_labelers(), {"p1": [1, 1, 2]}) == report["weights"]
    # the consensus of p1: a .25, b (.5+.5+1+.5)/4, c (1+1+.5+0)/4: b and c tie
    assert report["consensus"][0]["ranks"] == [1, 2, 2]
    weighted = agreement_report(four_labelers(), {"p1": [1, 1, 2]}, weighted_consensus=True)
    # a 0; b (16/9 * .5 * 2 + 4/9) / 4 = 5/9; c (16/9 * 2 + 4/9 * .5) / 4 = 17/18
    assert weighted["consensus"][0]["scores"] == pytest.approx([0.0, 5 / 9, 17 / 18])
    assert weighted["consensus"][0]["ranks"] == [1, 2, 3]


def test_pairs_are_labeler_agreement_s():
    report = agreement_report(four_labelers())
    assert report["pairs"] == labeler_agreement(four_labelers())["labeler_pairs"]
    assert report["overall"]["agreement"] == labeler_agreement(four_labelers())["agreement"]


def test_report_is_json_and_carries_its_settings():
    report = agreement_report(four_labelers(), {"p1": [1, 1, 2]}, outlier_z=2.5)
    assert json.loads(json.dumps(report, allow_nan=False)) == report
    s = report["settings"]
    assert s["alpha_rankings_level"] == "ordinal" and s["alpha_ratings_level"] == "interval"
    assert s["outlier_z"] == 2.5 and "median" in s["outlier_rule"] and "MAD" in s["outlier_rule"]
    assert s["consensus"].startswith("borda") and s["krippendorff"]


# -- simulated labelers ------------------------------------------------------------------------------------------


def dense(values):
    levels = {v: i for i, v in enumerate(sorted(set(values)), start=1)}
    return [levels[v] for v in values]


def simulate(seed, informed, randoms=(), prompts=40, k=4, noise=0.5):
    """Each prompt's completions have a true quality ~ N(0, 1). An informed labeler ranks by quality plus
    N(0, noise) noise, rounded to 0.3 (so close calls tie); a random one draws each rank uniformly."""
    rng = random.Random(seed)
    out = []
    for p in range(prompts):
        texts = [f"p{p} completion {j}" for j in range(k)]
        quality = [rng.gauss(0, 1) for _ in texts]
        for name in [*informed, *randoms]:
            if name in randoms:
                ranks = dense([rng.randrange(k) for _ in texts])
            else:
                ranks = dense([round(-(q + rng.gauss(0, noise)) / 0.3) for q in quality])
            out.append(rk(name, ranks, f"p{p}", texts))
    return out


@pytest.mark.parametrize("n_informed", [4, 5])
@pytest.mark.parametrize("seed", range(4))
def test_one_random_labeler_among_informed_ones_is_the_outlier(seed, n_informed):
    informed = [f"good{i}" for i in range(n_informed)]
    report = agreement_report(simulate(seed, informed, ["rand"]))
    assert report["outliers"] == ["rand"]
    weights = report["weights"]
    assert weights["rand"] == 0.0
    share = (n_informed + 1) / n_informed  # the informed ones share the random one's weight
    assert all(0.75 * share < weights[n] < 1.25 * share for n in informed)
    assert sum(weights.values()) == pytest.approx(n_informed + 1)


@pytest.mark.parametrize("seed", range(4))
def test_equally_good_labelers_flag_nobody(seed):
    names = [f"good{i}" for i in range(5)]
    rankings = simulate(seed, names)
    report = agreement_report(rankings)
    assert report["outliers"] == []
    assert all(0.7 < w < 1.3 for w in report["weights"].values())
    assert labeler_weights(rankings) == report["weights"]
    assert report["alpha"]["rankings"] > 0.4


def _outlier_red_pixels(path) -> int:
    import matplotlib.image
    import numpy as np

    rgb = matplotlib.image.imread(path)[..., :3] * 255
    return int((np.abs(rgb - np.array([192, 57, 43])).max(axis=-1) < 12).sum())  # the outlier colour, #c0392b


def test_plot_marks_the_outlier(tmp_path):
    # a "$...$" name must be drawn as text, not parsed as mathtext
    rankings = simulate(0, ["ann", "bob", "cy", "$x^2$"], ["rand"], prompts=20)
    gold = {"p0": [1, 2, 3, 4], "p1": [2, 1, 1, 3]}
    path = agreement_plot(agreement_report(rankings, gold), tmp_path / "plots" / "agreement.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    calm = agreement_plot(agreement_report(simulate(0, ["ann", "bob", "cy", "dee", "eve"], prompts=20), gold),
                          tmp_path / "calm.png")
    # hatched red-edged bars and a red name for the outlier; only the thin threshold dashes without one
    assert _outlier_red_pixels(path) > 200 > 100 > _outlier_red_pixels(calm)
    empty = agreement_plot(agreement_report([]), tmp_path / "empty.png")
    assert empty.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- edge cases ----------------------------------------------------------------------------------------------------


def test_one_labeler_has_no_pairs_no_alpha_and_no_flag():
    report = agreement_report([rk("x", [1, 2, 3]), rk("x", [2, 1, 3], "p2")])
    assert report["pairs"] == [] and report["alpha"]["rankings"] is None
    (row,) = report["labelers"]
    assert row["outlier"] is False and row["loo_tau_b"] is None and row["mean_tau_b"] is None
    assert report["weights"] == {"x": 1.0}
    assert report["consensus"][1]["ranks"] == [2, 1, 3]


def test_all_labels_special_are_counted_and_agree_on_nothing():
    rankings = [rk("x", [None] * 3, special="unsafe"), rk("y", [None] * 3, special="not_rankable"),
                rk("y", [None] * 3, "p2", special="not_rankable")]
    report = agreement_report(rankings)
    rows = {r["labeler"]: r for r in report["labelers"]}
    assert rows["y"]["special"] == {"not_rankable": 2} and rows["y"]["labels"] == 2 and rows["y"]["ranked"] == 0
    assert report["counts"]["special"] == 3 and report["alpha"]["rankings"] is None
    assert report["overall"]["agreement"] is None and report["outliers"] == []
    assert report["consensus"][0]["ranks"] == [None, None, None] and report["weights"] == {"x": 1.0, "y": 1.0}


def test_a_prompt_ranked_by_one_labeler_adds_no_agreement():
    shared = [rk("x", [1, 2, 3]), rk("y", [1, 3, 2])]
    alone = rk("x", [3, 2, 1], "p2", ["d", "e", "f"])
    with_alone, without = agreement_report([*shared, alone]), agreement_report(shared)
    assert with_alone["alpha"] == without["alpha"] and with_alone["pairs"] == without["pairs"]
    x = next(r for r in with_alone["labelers"] if r["labeler"] == "x")
    assert x["ranked"] == 2 and x["loo_prompts"] == 1
    assert with_alone["consensus"][1] == {"prompt_id": "p2", "completions": ["d", "e", "f"],
                                          "scores": [1.0, 0.5, 0.0], "ranks": [3, 2, 1], "labelers": ["x"]}


def test_ties_everywhere_give_no_tau_no_alpha_and_no_flag():
    rankings = [rk(n, [1, 1, 1], pid) for n in ("x", "y", "z", "w") for pid in ("p1", "p2", "p3")]
    report = agreement_report(rankings, {"p1": [1, 1, 2]})
    assert report["alpha"]["rankings"] is None and report["overall"]["compared"] == 0
    assert all(p["kendall_tau_b"] is None for p in report["pairs"])
    assert report["outliers"] == [] and all(w == 1.0 for w in report["weights"].values())
    assert all(c["ranks"] == [1, 1, 1] for c in report["consensus"])
    # every labeler ties gold's two strict pairs (both misses): all score 0, so none is preferred
    assert all(r["gold_accuracy"] == 0.0 for r in report["labelers"])


@pytest.mark.parametrize(("call", "field"), [
    (lambda: agreement_report([rk("x", [1, 2, 3])], {"p1": [1, 2]}), "gold"),
    (lambda: agreement_report([rk("x", [1, 2, 3]), rk("y", [1, 2, 3], completions=["c", "b", "a"])],
                              {"p1": [1, 2, 3]}), "gold"),
    (lambda: agreement_report([rk("x", [1, 2, 3])], {"p1": [0, 1, 2]}), "gold"),
    (lambda: agreement_report([rk("x", [1, 2, 3])], outlier_z=0), "outlier_z"),
    (lambda: agreement_report([rk("x", [1, 2, 3]), rk("x", [1, 2, 3])]), "labeler"),
    (lambda: agreement_report([rk("x", [1, 2])]), "ranks"),
    (lambda: labeler_weights([rk("x", [1, 2, 3], ratings=[0.5])]), "ratings"),
])
def test_bad_input_names_the_field(call, field):
    with pytest.raises(LmcycleError) as e:
        call()
    assert e.value.field == field


# -- ratings in rankings files, rankings out of the store ---------------------------------------------------------


def test_load_rankings_reads_optional_ratings(tmp_path):
    rows = [{"prompt_id": "p1", "prompt": "q", "completions": ABC, "ranks": [1, 2, 3], "labeler": "x",
             "ratings": [0.25, None, 1]},
            {"prompt_id": "p1", "prompt": "q", "completions": ABC, "ranks": [1, 2, 3], "labeler": "y"}]
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    x, y = load_rankings(path)
    assert x.ratings == [0.25, None, 1.0] and y.ratings is None
    for bad in ([0.5], [True, 0, 0], "high", [0, 0, "x"]):
        path.write_text(json.dumps(rows[1]) + "\n" + json.dumps({**rows[0], "ratings": bad}) + "\n")
        with pytest.raises(LmcycleError) as e:
            load_rankings(path)
        assert (e.value.file, e.value.line, e.value.field) == (str(path), 2, "ratings")


def _label_all(store, plan):
    """Every labeler in ``plan`` labels every item they are given: ``plan[name](item ids) -> Label``."""
    for name, make in plan.items():
        while (task := store.next_item_for(name)) is not None:
            store.submit(name, task.item_id, make(task), f"{name}-{task.item_id}")


def test_rankings_from_snapshot_match_the_export(db_url, tmp_path, hasher, item_row, write_rows):
    with LabelStore.init(db_url, hasher=hasher) as store:
        store.create_project(overlap=2, rating_scale=RatingScale("toxicity", 0.0, 1.0))
        for name in ("ann", "bob"):
            store.add_user(name, "labeler", f"{name}-password")
        store.import_file(write_rows(tmp_path / "items.jsonl", [item_row("p1", gold=[["c1", "c2"], ["c0"]]),
                                                                 item_row("p2")]))
        _label_all(store, {
            "ann": lambda t: Label(ranking=[["c2"], ["c0", "c1"]], ratings={"c0": 0.5}),
            "bob": lambda t: Label(special="unsafe", reason="insults") if t.prompt_id == "p2"
            else Label(ranking=[["c0"], ["c1"], ["c2"]])})
        snap = store.snapshot()
    rankings, gold = rankings_from_snapshot(snap)
    assert gold == {"p1": [2, 1, 1]}
    by = {(r.labeler, r.prompt_id): r for r in rankings}
    assert by["ann", "p1"].ranks == [2, 2, 1] and by["ann", "p1"].ratings == [0.5, None, None]
    assert by["bob", "p2"].special == "unsafe" and by["bob", "p2"].ranks == [None] * 3
    assert by["bob", "p1"].ratings is None and by["ann", "p1"].completions[0] == "answer 0 to p1"
    write_export(snap, tmp_path / "out.jsonl")
    assert load_rankings(tmp_path / "out.jsonl") == rankings
    rows = {r["labeler"]: r for r in agreement_report(rankings, gold)["labelers"]}
    # gold orders c1 and c2 above c0: ann puts c2 above c0 but ties c1 with it (1 of 2), bob gets neither
    assert rows["ann"]["gold_accuracy"] == 0.5 and rows["bob"]["gold_accuracy"] == 0.0
    assert rows["bob"]["special"] == {"unsafe": 1}


# -- lmcycle label stats ------------------------------------------------------------------------------------------


def _run(capsys, *argv):
    code = main(["label", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_stats_print_agreement_and_plot_it(db_url, tmp_path, capsys, hasher, item_row, write_rows):
    # three labelers rank c0 > c1 > c2, one the reverse, on 6 items each labelled by all four
    with LabelStore.init(db_url, hasher=hasher) as store:
        store.create_project(overlap=4, rating_scale=RatingScale("toxicity", 0.0, 1.0))
        for name in ("ann", "bob", "cy", "rev"):
            store.add_user(name, "labeler", f"{name}-password")
        store.import_file(write_rows(tmp_path / "items.jsonl", [item_row(f"p{i}") for i in range(6)]))
        good = lambda t: Label(ranking=[["c0"], ["c1"], ["c2"]], ratings={"c0": 0.0, "c2": 1.0})  # noqa: E731
        _label_all(store, {"ann": good, "bob": good, "cy": good,
                           "rev": lambda t: Label(ranking=[["c2"], ["c1"], ["c0"]], ratings={"c0": 1.0})})
        want = agreement_report(*rankings_from_snapshot(store.snapshot()))
    code, out, _ = _run(capsys, "stats", "--db", db_url, "--json")
    stats = json.loads(out)
    assert code == 0 and stats["overall"]["done"] == 24 and stats["agreement"] == want
    assert stats["agreement"]["outliers"] == ["rev"]
    plot = tmp_path / "agreement.png"
    code, out, _ = _run(capsys, "stats", "--db", db_url, "--plot", str(plot))
    assert code == 0 and "labels 24 done" in out and "Krippendorff's alpha" in out
    rev = [line for line in out.splitlines() if line.startswith("rev ")][-1]  # the agreement table comes last
    assert rev.split()[-1] == "OUTLIER" and "-1.00" in rev
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, _, err = _run(capsys, "stats", "--db", db_url, "--plot", str(tmp_path / "agreement.jpg"))
    assert code == 1 and "field '--plot'" in err and not (tmp_path / "agreement.jpg").exists()
