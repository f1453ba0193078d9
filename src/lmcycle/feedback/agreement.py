"""Agreement between labelers, the consensus of their rankings, and how much each labeler should weigh.

Input: :class:`~lmcycle.data.preferences.Ranking` objects, one per labeler and prompt, completions matched
across labelers by text (the label export's rows, or :func:`lmcycle.feedback.export.rankings_from_snapshot`).

Rules (the same everywhere in this module):

- **What takes part.** Rankings with a labeler name and no special label. Special labels (``not_rankable``,
  ``unsafe``) are counted per labeler and left out of rank agreement; rankings without a labeler are counted
  (``counts.unnamed``) and left out of everything. Ratings take part whether the label is special or not: the
  toxicity rating of an unsafe item is information.
- **Pairwise.** Per pair of labelers, over the prompts both ranked: ``agreement``, the share of the completion
  pairs both order strictly that they order alike, and ``kendall_tau_b`` averaged over shared prompts; both
  are :func:`lmcycle.data.preferences.labeler_agreement`'s. Tau-b is lmcycle's own
  (:func:`~lmcycle.data.preferences.rank_concordance`, checked against ``scipy.stats.kendalltau(variant="b")``
  in the tests): scipy is not a dependency of lmcycle.
- **Normalised rank.** A labeler's rank of a completion becomes its mid-rank among the ``m`` completions they
  ranked (a tie shares the mean of the positions it covers: ranks ``[1, 2, 2]`` are positions ``1, 2.5, 2.5``),
  then ``(midrank - 1) / (m - 1)`` in [0, 1], 0 = best. Ranks of prompts with different ``k`` are comparable
  on that scale, and a tie at the bottom stays at the bottom (dense ranks would put it in the middle).
- **Krippendorff's alpha** (the ``krippendorff`` package): units are (prompt, completion). Over rankings, the
  values are normalised ranks at the **ordinal** level; over ratings, the raw ratings at the **interval**
  level (one rating scale per project, so a difference means the same anywhere on it). None when no unit has
  values from two labelers, or every value is the same (alpha is undefined without variation).
- **Consensus** (Borda count): per prompt, each completion's mean normalised rank over the labelers who
  ranked it (weighted by labeler weights when asked), then dense ranks of those means; equal means tie.
- **Leave one out.** A labeler's ``loo_tau_b`` / ``loo_agreement``: tau-b / pairwise agreement of their ranking
  with the (unweighted) consensus of the prompt's other labelers, over the prompts somebody else ranked too.
- **Gold accuracy.** Over the completion pairs a gold ranking orders strictly, the share the labeler orders the
  same way (a tie or an unranked side is a miss), as :mod:`lmcycle.feedback.stats` counts it. Gold ranks are
  given per prompt id in the completion order of that prompt's rankings.
- **Outlier.** A labeler whose ``loo_tau_b`` is far below the rest and no better than chance:
  ``loo_tau_b < median - z * max(1.4826 * MAD, se)`` and ``loo_tau_b < z * se``, where median and MAD are over
  all labelers' ``loo_tau_b`` (at least 3 labelers must have one) and ``se`` is the standard error of this
  labeler's per-prompt tau-b (at least 2 prompts). 1.4826 * MAD estimates the labelers' spread without being
  pulled by the outlier itself; ``se`` keeps a gap that the labeler's own few prompts explain from counting;
  the second condition spares a labeler who is noisier than the rest but clearly informed (they get a lower
  weight instead). In 100 seeded simulations each (4 or 5 labelers ranking the k = 4 completions of 40 prompts
  by an N(0, 1) quality plus N(0, 0.5) noise), z = 3 flagged an added random labeler every time and nobody
  when all were alike; with each prompt seen by only 3 of 5 labelers, or with twice that noise, it takes about
  100 prompts to miss it fewer than 1 time in 20.
- **Weights** (:func:`labeler_weights`): a labeler's evidence is the mean of ``max(loo_tau_b, 0)`` and, with
  gold, ``max(2 * gold_accuracy - 1, 0)`` (a tau-like score: 1 all gold pairs right, 0 half of them); an
  outlier gets 0, a labeler without evidence the mean of the others'; then all are scaled to mean 1. When no
  one's evidence is above 0 there is no ground to prefer anybody: every labeler but an outlier weighs the same.
"""

from __future__ import annotations

import io
import math
import statistics
from collections import Counter
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from lmcycle import __version__
from lmcycle.atomic import atomic_write_bytes
from lmcycle.data.preferences import Ranking, labeler_agreement, rank_concordance
from lmcycle.errors import LmcycleError
from lmcycle.terminal import columns, printable

OUTLIER_Z = 3.0
MAD_SCALE = 1.4826  # MAD * this estimates the standard deviation of normal data
ROUND = 12  # Borda means equal to 12 decimals are a tie (float sums of the same fractions differ in the last bit)

Ranks = dict[str, int | None]  # completion text -> rank (1 = best, None = unranked)


def normalised_ranks(ranks: Ranks) -> dict[str, float]:
    """Completion -> ``(midrank - 1) / (m - 1)`` over the ``m`` ranked completions (0 = best, 1 = worst, ties
    share their mean position); empty when fewer than 2 are ranked. E.g. ``{a: 1, b: 2, c: 2}`` ->
    ``{a: 0.0, b: 0.75, c: 0.75}``."""
    ranked = {c: r for c, r in ranks.items() if r is not None}
    if len(ranked) < 2:
        return {}
    counts = Counter(ranked.values())
    better, mid = 0, {}
    for r in sorted(counts):
        mid[r] = better + (counts[r] + 1) / 2
        better += counts[r]
    return {c: (mid[r] - 1) / (len(ranked) - 1) for c, r in ranked.items()}


def _borda(normalised: list[tuple[dict[str, float], float]]) -> tuple[dict[str, float], dict[str, int]]:
    """``(mean normalised rank, dense consensus rank)`` per completion over ``(normalised ranks, weight)``."""
    sums: dict[str, float] = {}
    totals: dict[str, float] = {}
    for ranks, weight in normalised:
        for c, v in ranks.items():
            sums[c] = sums.get(c, 0.0) + weight * v
            totals[c] = totals.get(c, 0.0) + weight
    scores = {c: round(sums[c] / totals[c], ROUND) for c in sums if totals[c] > 0}
    levels = {v: i for i, v in enumerate(sorted(set(scores.values())), start=1)}
    return scores, {c: levels[v] for c, v in scores.items()}


def _collect(rankings: list[Ranking]) -> tuple[dict[str, dict[str, Ranks]], dict[str, list[str]]]:
    """``(labeler -> prompt -> ranks, prompt -> completion texts in first-seen order)`` of the rankings that
    take part, after checking every ranking's shape."""
    ranked: dict[str, dict[str, Ranks]] = {}
    texts: dict[str, list[str]] = {}
    for i, r in enumerate(rankings):
        if len(r.ranks) != len(r.completions):
            raise LmcycleError(f"ranking {i} (prompt '{r.prompt_id}') has {len(r.ranks)} ranks for "
                               f"{len(r.completions)} completions", field="ranks")
        if r.ratings is not None and len(r.ratings) != len(r.completions):
            raise LmcycleError(f"ranking {i} (prompt '{r.prompt_id}') has {len(r.ratings)} ratings for "
                               f"{len(r.completions)} completions", field="ratings")
        seen = texts.setdefault(r.prompt_id, [])
        seen.extend(c for c in r.completions if c not in seen)
        if r.labeler and r.special is None:
            ranked.setdefault(r.labeler, {})[r.prompt_id] = dict(zip(r.completions, r.ranks, strict=True))
    return ranked, texts


def consensus(rankings: list[Ranking], weights: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """The Borda consensus of each prompt, prompts in order of first appearance: ``{"prompt_id", "completions"
    (texts, first-seen order), "scores" (mean normalised rank, 0 = best; None where nobody ranked it), "ranks"
    (dense, 1 = best, equal means tied; None where unranked), "labelers"}``. With ``weights``, each labeler
    counts by their weight (a labeler missing from it: 1.0); a prompt whose labelers all weigh 0 has no
    consensus (every rank None)."""
    ranked, texts = _collect(rankings)
    out = []
    for pid, completions in texts.items():
        who = sorted(name for name in ranked if pid in ranked[name])
        scores, ranks = _borda([(normalised_ranks(ranked[n][pid]), 1.0 if weights is None else weights.get(n, 1.0))
                                for n in who])
        out.append({"prompt_id": pid, "completions": completions, "scores": [scores.get(c) for c in completions],
                    "ranks": [ranks.get(c) for c in completions], "labelers": who})
    return out


def _check_gold(gold: dict[str, list[int]], rankings: list[Ranking]) -> None:
    for pid, ranks in gold.items():
        if not isinstance(ranks, list) or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ranks):
            raise LmcycleError(f"gold of prompt '{pid}' must be a list of ranks (integers >= 1)", field="gold")
    orders: dict[str, list[str]] = {}
    for r in rankings:
        if r.prompt_id in gold and len(r.completions) != len(gold[r.prompt_id]):
            raise LmcycleError(f"gold of prompt '{r.prompt_id}' has {len(gold[r.prompt_id])} ranks but a ranking "
                               f"of it has {len(r.completions)} completions", field="gold")
        if r.prompt_id in gold and orders.setdefault(r.prompt_id, r.completions) != r.completions:
            raise LmcycleError(f"the rankings of gold prompt '{r.prompt_id}' list its completions in different "
                               "orders; gold ranks follow one completion order", field="gold")


def _gold_hits(mine: Ranks, gold_ranks: list[int], order: list[str]) -> tuple[int, int]:
    """``(agreed, compared)`` over the pairs ``gold_ranks`` (aligned with ``order``) orders strictly."""
    agreed = compared = 0
    for i in range(len(order)):
        for j in range(i + 1, len(order)):
            if gold_ranks[i] == gold_ranks[j]:
                continue
            compared += 1
            a, b = mine.get(order[i]), mine.get(order[j])
            agreed += a is not None and b is not None and a != b and (a < b) == (gold_ranks[i] < gold_ranks[j])
    return agreed, compared


def _loo(ranked: dict[str, dict[str, Ranks]], normalised: dict[str, dict[str, dict[str, float]]],
         who: dict[str, list[str]], name: str) -> tuple[list[float], float | None, int]:
    """``(tau-b per prompt, agreement, prompts)`` of ``name``'s rankings against the consensus of the others
    (``normalised``: ``ranked``'s normalised ranks; ``who``: prompt -> its labelers; a prompt whose sides tie
    every pair has no tau-b)."""
    taus, agreed, compared, prompts = [], 0, 0, 0
    for pid, mine in ranked[name].items():
        others = [(normalised[o][pid], 1.0) for o in who[pid] if o != name]
        if not others:
            continue
        prompts += 1
        ok, n, tau = rank_concordance(mine, _borda(others)[1])
        agreed, compared = agreed + ok, compared + n
        if tau is not None:
            taus.append(tau)
    return taus, (agreed / compared if compared else None), prompts


def _flag_outliers(rows: list[dict[str, Any]], z: float) -> dict[str, Any]:
    """Set each row's ``outlier`` and ``outlier_below`` (the loo tau-b it had to fall below; None when the rule
    cannot judge); returns the rule's median and scaled MAD."""
    known = [row for row in rows if row["loo_tau_b"] is not None]
    median = statistics.median(r["loo_tau_b"] for r in known) if len(known) >= 3 else None
    spread = None if median is None else MAD_SCALE * statistics.median(abs(r["loo_tau_b"] - median) for r in known)
    for row in rows:
        row["outlier"], row["outlier_below"] = False, None
        if median is None or row["loo_se"] is None:
            continue
        below = median - z * max(spread, row["loo_se"])
        row["outlier_below"] = below
        row["outlier"] = row["loo_tau_b"] < below and row["loo_tau_b"] < z * row["loo_se"]
    return {"median": median, "spread": spread}


def _weights(rows: list[dict[str, Any]]) -> dict[str, float]:
    raw: dict[str, float | None] = {}
    for row in rows:
        evidence = [max(row["loo_tau_b"], 0.0)] if row["loo_tau_b"] is not None else []
        if row["gold_accuracy"] is not None:
            evidence.append(max(2 * row["gold_accuracy"] - 1, 0.0))
        raw[row["labeler"]] = 0.0 if row["outlier"] else statistics.fmean(evidence) if evidence else None
    typical = [v for row in rows if not row["outlier"] and (v := raw[row["labeler"]]) is not None]
    fill = statistics.fmean(typical) if typical and sum(typical) > 0 else 1.0
    filled = {n: fill if v is None else v for n, v in raw.items()}
    if typical and sum(typical) == 0:  # nobody agrees with anybody: no ground to prefer one labeler
        filled = {row["labeler"]: 0.0 if row["outlier"] else 1.0 for row in rows}
    mean = statistics.fmean(filled.values()) if filled else 0.0
    return {n: v / mean if mean > 0 else 1.0 for n, v in filled.items()}


def _labeler_rows(rankings: list[Ranking], gold: dict[str, list[int]] | None,
                  z: float) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """Per-labeler rows (weights included), labeler_agreement's pair report, and the outlier rule's figures."""
    if isinstance(z, bool) or not (isinstance(z, int | float) and math.isfinite(z) and z > 0):
        raise LmcycleError(f"must be a positive number, got {z!r:.20}", field="outlier_z")
    gold = gold or {}
    _check_gold(gold, rankings)
    ranked, _ = _collect(rankings)
    pairs = labeler_agreement(rankings)  # also refuses a labeler ranking one prompt twice
    orders = {r.prompt_id: r.completions for r in rankings if r.prompt_id in gold}
    by_labeler: dict[str, list[Ranking]] = {}
    for r in rankings:
        if r.labeler:
            by_labeler.setdefault(r.labeler, []).append(r)
    who: dict[str, list[str]] = {}
    for name, prompts in ranked.items():
        for pid in prompts:
            who.setdefault(pid, []).append(name)
    normalised = {name: {pid: normalised_ranks(r) for pid, r in prompts.items()} for name, prompts in ranked.items()}
    rows = []
    for name, mine in sorted(by_labeler.items()):
        taus = [(p["kendall_tau_b"], p["shared_prompts"]) for p in pairs["labeler_pairs"]
                if name in p["labelers"] and p["kendall_tau_b"] is not None]
        weight = sum(w for _, w in taus)
        loo_taus, loo_agreement, loo_prompts = _loo(ranked, normalised, who, name) if name in ranked else ([], None, 0)
        hits = [_gold_hits(ranks, gold[pid], orders[pid]) for pid, ranks in ranked.get(name, {}).items()
                if pid in gold]
        gold_compared = sum(n for _, n in hits)
        rows.append({"labeler": name, "labels": len(mine), "ranked": len(ranked.get(name, {})),
                     "special": dict(Counter(r.special for r in mine if r.special is not None)),
                     "mean_tau_b": sum(t * w for t, w in taus) / weight if weight else None,
                     "loo_tau_b": statistics.fmean(loo_taus) if loo_taus else None,
                     "loo_se": statistics.stdev(loo_taus) / math.sqrt(len(loo_taus)) if len(loo_taus) >= 2 else None,
                     "loo_agreement": loo_agreement, "loo_prompts": loo_prompts,
                     "gold_labels": sum(r.prompt_id in gold for r in mine), "gold_pairs": gold_compared,
                     "gold_accuracy": sum(a for a, _ in hits) / gold_compared if gold_compared else None})
    rule = _flag_outliers(rows, z)
    weights = _weights(rows)
    for row in rows:
        row["weight"] = weights[row["labeler"]]
    return rows, pairs, rule


def labeler_weights(rankings: list[Ranking], gold: dict[str, list[int]] | None = None) -> dict[str, float]:
    """Labeler -> weight of their preference pairs in the reward model's loss, mean 1 over labelers (see the
    module docstring: from leave-one-out tau-b and gold accuracy; an outlier weighs 0). Rankings without a
    labeler name have no entry (weigh them 1.0). Needs nothing beyond lmcycle's core dependencies."""
    rows, _, _ = _labeler_rows(rankings, gold, OUTLIER_Z)
    return {row["labeler"]: row["weight"] for row in rows}


def _alpha(units: dict[tuple[str, str], dict[str, float]], level: str) -> tuple[float | None, int]:
    """Krippendorff's alpha over ``(prompt, completion) -> labeler -> value`` and the units with two values."""
    pairable = [u for u in units.values() if len(u) >= 2]
    if not pairable or len({v for u in pairable for v in u.values()}) < 2:
        return None, len(pairable)
    try:
        import krippendorff  # lazy: the label extra, and it imports numpy
    except ImportError:
        raise LmcycleError("Krippendorff's alpha needs the krippendorff package: pip install 'lmcycle[label]'") \
            from None
    coders = sorted({n for u in pairable for n in u})
    data = [[u.get(n, math.nan) for u in pairable] for n in coders]
    return float(krippendorff.alpha(reliability_data=data, level_of_measurement=level)), len(pairable)


def agreement_report(rankings: list[Ranking], gold: dict[str, list[int]] | None = None, *,
                     outlier_z: float = OUTLIER_Z, weighted_consensus: bool = False) -> dict[str, Any]:
    """Agreement of the labelers of ``rankings`` (rules: the module docstring), as one JSON-serialisable dict:

    ``settings`` (the methods, the outlier rule and its ``outlier_z``, levels of measurement, versions),
    ``counts``, ``overall`` (pairwise agreement over every labeler pair), ``alpha`` (``rankings`` and
    ``ratings`` with their units), ``pairs`` (per labeler pair: ``shared_prompts``, ``compared``, ``agreed``,
    ``agreement``, ``kendall_tau_b``), ``labelers`` (per labeler: ``labels``, ``ranked``, ``special``,
    ``mean_tau_b`` over their pairs weighted by shared prompts, ``loo_tau_b``, ``loo_se``, ``loo_agreement``,
    ``loo_prompts``, ``gold_labels``, ``gold_pairs``, ``gold_accuracy``, ``outlier``, ``outlier_below``,
    ``weight``), ``weights``, ``outliers``, ``outlier_median`` and ``outlier_spread`` (the median and 1.4826 *
    MAD of the labelers' ``loo_tau_b``; None under 3 labelers) and ``consensus`` (per prompt, :func:`consensus`; weighted by the
    labelers' weights with ``weighted_consensus``). ``gold``: prompt id -> gold ranks in the completion order
    of that prompt's rankings. Bad input is an :class:`LmcycleError` naming the field, before anything is
    computed."""
    rows, pairs, rule = _labeler_rows(rankings, gold, outlier_z)
    ranked, _ = _collect(rankings)
    rank_units: dict[tuple[str, str], dict[str, float]] = {}
    for name, prompts in ranked.items():
        for pid, ranks in prompts.items():
            for c, v in normalised_ranks(ranks).items():
                rank_units.setdefault((pid, c), {})[name] = v
    rating_units: dict[tuple[str, str], dict[str, float]] = {}
    for r in rankings:
        if r.labeler and r.ratings is not None:
            for c, v in zip(r.completions, r.ratings, strict=True):
                if v is not None:
                    rating_units.setdefault((r.prompt_id, c), {})[r.labeler] = v
    alpha_ranks, rank_n = _alpha(rank_units, "ordinal")
    alpha_ratings, rating_n = _alpha(rating_units, "interval")
    weights = {row["labeler"]: row["weight"] for row in rows}
    try:
        kripp = version("krippendorff")
    except PackageNotFoundError:  # then no alpha was defined either (else _alpha would have said so)
        kripp = None
    settings = {
        "pairwise": "share of the completion pairs both labelers order strictly that they order alike",
        "tau": "kendall tau-b per shared prompt, averaged (lmcycle's; equals scipy kendalltau variant b)",
        "normalised_rank": "(midrank - 1) / (m - 1) over the m ranked completions, 0 = best",
        "alpha_rankings_level": "ordinal", "alpha_ratings_level": "interval",
        "alpha_units": "(prompt, completion)", "consensus": "borda: mean normalised rank, dense ranks, ties equal",
        "consensus_weighted": weighted_consensus, "loo": "tau-b with the unweighted consensus of the others",
        "outlier_rule": "loo_tau_b < median - z * max(1.4826 * MAD, se) and loo_tau_b < z * se (se: standard "
                        "error of the labeler's per-prompt loo tau-b, >= 2 prompts); >= 3 labelers",
        "outlier_z": float(outlier_z),
        "weights": "mean(max(loo_tau_b, 0), max(2 * gold_accuracy - 1, 0)); outlier 0; scaled to mean 1",
        "lmcycle": __version__, "krippendorff": kripp,
    }
    return {"settings": settings,
            "counts": {"rankings": len(rankings), "prompts": len({r.prompt_id for r in rankings}),
                       "labelers": len(rows), "special": sum(r.special is not None for r in rankings),
                       "unnamed": sum(not r.labeler for r in rankings)},
            "overall": {"compared": pairs["compared"], "agreed": pairs["agreed"], "agreement": pairs["agreement"]},
            "alpha": {"rankings": alpha_ranks, "rankings_units": rank_n, "ratings": alpha_ratings,
                      "ratings_units": rating_n},
            "pairs": pairs["labeler_pairs"], "labelers": rows, "weights": weights,
            "outliers": [row["labeler"] for row in rows if row["outlier"]],
            "outlier_median": rule["median"], "outlier_spread": rule["spread"],
            "consensus": consensus(rankings, weights if weighted_consensus else None)}


def _num(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def render_agreement(report: dict[str, Any]) -> str:
    """The report as text for a terminal: alpha and overall agreement, then one row per labeler."""
    a, o = report["alpha"], report["overall"]
    lines = [f"agreement: Krippendorff's alpha {_num(a['rankings'])} over rankings (ordinal, {a['rankings_units']} "
             f"units), {_num(a['ratings'])} over ratings (interval, {a['ratings_units']} units); pairwise "
             f"{_num(o['agreement'])} of {o['compared']} compared pairs", ""]
    head = ("labeler", "ranked", "tau-b", "loo tau-b", "loo agree", "gold acc", "weight", "outlier")
    rows = [head]
    for r in report["labelers"]:
        rows.append((printable(r["labeler"], layout=False), str(r["ranked"]), _num(r["mean_tau_b"]),
                     _num(r["loo_tau_b"]), _num(r["loo_agreement"]), _num(r["gold_accuracy"]), _num(r["weight"]),
                     "OUTLIER" if r["outlier"] else ""))
    lines += columns(rows)
    return "\n".join(lines)


def _plot_name(name: str, outlier: bool) -> str:
    # a "$" pair would start matplotlib's mathtext: labeler names are data, never markup
    text = printable(name, layout=False)
    text = (text[:20] + "…" if len(text) > 21 else text).replace("$", r"\$")
    return text + (" (outlier)" if outlier else "")


def agreement_plot(report: dict[str, Any], path: str | Path) -> Path:
    """A PNG of the report: left, a heatmap of tau-b per labeler pair (grey: nothing shared); right, each
    labeler's leave-one-out tau-b, mean tau-b with the others and gold accuracy as bars, outliers in red and
    hatched, each labeler's "far below the rest" bound a red dash. Written atomically; returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: matplotlib costs a second at start-up
    import numpy as np

    path = Path(path)
    rows = report["labelers"]
    n = len(rows)
    names = [_plot_name(r["labeler"], r["outlier"]) for r in rows]
    fig, (heat, bars) = plt.subplots(1, 2, figsize=(6 + 0.9 * n, 2.8 + 0.35 * n), squeeze=True)
    index = {r["labeler"]: i for i, r in enumerate(rows)}
    tau = np.full((n, n), np.nan)
    for p in report["pairs"]:
        a, b = (index[x] for x in p["labelers"])
        if p["kendall_tau_b"] is not None:
            tau[a, b] = tau[b, a] = p["kendall_tau_b"]
    cmap = plt.get_cmap("RdBu").with_extremes(bad="#dddddd")
    image = heat.imshow(np.ma.masked_invalid(tau) if n else np.full((1, 1), np.nan), cmap=cmap, vmin=-1, vmax=1)
    if n <= 15:
        for i in range(n):
            for j in range(n):
                if not np.isnan(tau[i, j]):
                    heat.text(j, i, f"{tau[i, j]:.2f}", ha="center", va="center", fontsize=8,
                              color="white" if abs(tau[i, j]) > 0.6 else "black")
    heat.set_xticks(range(n), names, rotation=45, ha="right", fontsize=8)
    heat.set_yticks(range(n), names, fontsize=8)
    for tick in [*heat.get_xticklabels(), *heat.get_yticklabels()]:
        if tick.get_text().endswith("(outlier)"):
            tick.set_color("#c0392b")
    fig.colorbar(image, ax=heat, fraction=0.046, pad=0.04, label="Kendall tau-b")
    heat.set_title(f"tau-b per labeler pair (alpha {_num(report['alpha']['rankings'])})", fontsize=10)

    series = [("leave-one-out tau-b", "loo_tau_b", "#2c7fb8"), ("mean tau-b with others", "mean_tau_b", "#9ecae1"),
              ("gold accuracy", "gold_accuracy", "#31a354")]
    series = [s for s in series if any(r[s[1]] is not None for r in rows)]
    width = 0.8 / max(len(series), 1)
    for k, (label, key, colour) in enumerate(series):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(n)]
        values = [r[key] if r[key] is not None else 0.0 for r in rows]
        drawn = bars.bar(xs, values, width, label=label, color=colour)
        for patch, r in zip(drawn, rows, strict=True):
            if r["outlier"]:
                patch.set_edgecolor("#c0392b")
                patch.set_hatch("//")
                patch.set_linewidth(1.5)
    limits = [(i, r["outlier_below"]) for i, r in enumerate(rows) if r["outlier_below"] is not None]
    if limits:
        bars.hlines([y for _, y in limits], [i - 0.45 for i, _ in limits], [i + 0.45 for i, _ in limits],
                    colors="#c0392b", linestyles="--", linewidth=1.2, label="outlier below (loo tau-b)")
    bars.axhline(0, color="black", linewidth=0.6)
    bars.set_ylim(-1.05, 1.05)
    bars.set_xticks(range(n), names, rotation=45, ha="right", fontsize=8)
    for tick in bars.get_xticklabels():
        if tick.get_text().endswith("(outlier)"):
            tick.set_color("#c0392b")
    bars.set_title("agreement per labeler", fontsize=10)
    bars.grid(axis="y", alpha=0.3)
    if series:
        bars.legend(fontsize=7, loc="lower left")
    if n == 0:
        for ax in (heat, bars):
            ax.text(0.5, 0.5, "no labelers yet", ha="center", va="center", transform=ax.transAxes)
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path
