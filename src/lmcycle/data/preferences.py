"""Human-feedback preference data: rankings of completions turned into chosen/rejected pairs.

A :class:`Ranking` is one labeler's ordering of the ``k`` completions of one prompt (rank 1 = best, equal ranks =
a tie, ``None`` = that completion was left unranked). :func:`rankings_to_pairs` turns it into every ordered
pair with a strict preference: ``k(k-1)/2`` pairs minus the tied ones and minus those with an unranked side.

Rules (the same everywhere in this module):

- **Special labels.** A ranking whose ``special`` is set (e.g. ``"not_rankable"``, ``"unsafe"``) says the
  labeler refused to order the completions, so it yields no pairs and takes no part in agreement; it is
  counted, per label, by :func:`pairing_summary`.
- **Several labelers of one prompt.** Each labeler's ranking gives its own pair set (``labeler`` is kept on each
  pair), so a pair that three labelers agree on appears three times and a disputed one appears both ways.
  This keeps the raw signal; :func:`labeler_agreement` reports how consistent it is.
- **Grouping.** Pairs of one ``prompt_id`` are consecutive, prompts in order of first appearance, so
  :func:`split_by_prompt` (and any batcher) can keep a prompt's pairs together.

:func:`load_pairs` reads plain pair rows (``{"prompt", "chosen", "rejected"}``, optionally a soft ``target``).
:func:`load_hh_rlhf` reads Anthropic HH-RLHF rows (``{"chosen": transcript, "rejected": transcript}``) as pairs.
The texts of that dataset are offensive: never print them in tests or logs.

In a recipe, formats ``hh_rlhf``, ``pairs`` and ``rankings`` (:func:`load_preference_examples`) load pairs as
:class:`~lmcycle.data.examples.Example` objects (``meta["rejected"]``; :func:`pairs_from_examples` turns them back),
split ``train``/``test``/``all`` by prompt with a fixed seed (15% of the prompts are test); pairs with an empty
reply are left out there, with a logged count. A pair made from a ranking keeps it (``PreferencePair.ranking``,
``meta["ranking"]``), so :func:`rankings_from_examples` gives the listwise and tie-aware reward losses the whole
rankings, ties included, split as the pairs are.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmcycle.data.examples import Example
from lmcycle.data.records import SourceRecord, id_field, read_records, text_field
from lmcycle.errors import LmcycleError

logger = logging.getLogger(__name__)
SPECIAL_LABELS = ("not_rankable", "unsafe")  # the usual ones; any non-empty string is accepted
ASSISTANT_TAG = "\n\nAssistant:"


@dataclass
class Ranking:
    """One labeler's ranking of the completions of one prompt. ``ranks[i]`` is the rank of ``completions[i]``."""

    prompt_id: str
    prompt: str
    completions: list[str]
    ranks: list[int | None]
    labeler: str = ""
    special: str | None = None
    ratings: list[float | None] | None = None  # a scalar rating per completion (None = not rated), if any


@dataclass
class PreferencePair:
    """``chosen`` was preferred over ``rejected`` for ``prompt``; ``margin`` is the rank difference (>= 1);
    ``target`` the probability that ``chosen`` is the better one (0.5..1: 1.0 a hard label, below it a soft
    preference such as an AI judge's, trained with :func:`lmcycle.align.reward.soft_bradley_terry_losses`)."""

    prompt_id: str
    prompt: str
    chosen: str
    rejected: str
    labeler: str = ""
    margin: float = 1.0
    target: float = 1.0
    # The ranking the pair was read from (None for pairs read as pairs): what the listwise and tie-aware reward
    # losses train on, carried into recipe examples by examples_from_pairs. Not part of a pair's equality.
    ranking: Ranking | None = field(default=None, compare=False, repr=False)


def rankings_to_pairs(rankings: list[Ranking]) -> list[PreferencePair]:
    """Every strictly ordered completion pair of every non-special ranking, grouped by ``prompt_id``.

    Within one ranking, pairs follow completion order (i < j); the better-ranked completion is ``chosen``.
    """
    pairs: dict[str, list[PreferencePair]] = {}
    for r in rankings:
        group = pairs.setdefault(r.prompt_id, [])
        if r.special is None:
            group.extend(_ranking_pairs(r))
    return [p for group in pairs.values() for p in group]


def _ranking_pairs(r: Ranking) -> list[PreferencePair]:
    out = []
    for i, j in itertools.combinations(range(len(r.completions)), 2):
        a, b = r.ranks[i], r.ranks[j]
        if a is None or b is None or a == b:
            continue
        best, worst = (i, j) if a < b else (j, i)
        out.append(PreferencePair(r.prompt_id, r.prompt, r.completions[best], r.completions[worst],
                                  r.labeler, float(abs(a - b)), ranking=r))
    return out


def pairing_summary(rankings: list[Ranking]) -> dict[str, Any]:
    """Counts for the report: rankings, prompts, pairs made, tied and unranked pairs skipped, special labels."""
    special = Counter(r.special for r in rankings if r.special is not None)
    tied = unranked = 0
    for r in rankings:
        if r.special is not None:
            continue
        for a, b in itertools.combinations(r.ranks, 2):
            unranked += a is None or b is None
            tied += a is not None and a == b
    return {"rankings": len(rankings), "prompts": len({r.prompt_id for r in rankings}),
            "pairs": len(rankings_to_pairs(rankings)), "tied_pairs": tied, "unranked_pairs": unranked,
            "special": dict(special), "special_total": sum(special.values())}


def split_by_prompt(pairs: list[PreferencePair], dev_fraction: float,
                    seed: int = 0) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """``(train, dev)``: a seeded shuffle of the distinct prompt ids, ``round(dev_fraction * n_prompts)`` of them
    to dev. A prompt's pairs are never on both sides; each side keeps the input order."""
    if not 0.0 <= dev_fraction < 1.0:
        raise LmcycleError(f"must be in [0, 1), got {dev_fraction}", field="dev_fraction")
    ids = sorted({p.prompt_id for p in pairs})
    random.Random(seed).shuffle(ids)
    dev_ids = set(ids[: round(dev_fraction * len(ids))])
    return [p for p in pairs if p.prompt_id not in dev_ids], [p for p in pairs if p.prompt_id in dev_ids]


def labeler_agreement(rankings: list[Ranking]) -> dict[str, Any]:
    """How often two labelers order a completion pair the same way, on the prompts both ranked.

    Completions are matched by text, so labelers may see them in different orders. A pair counts when both
    labelers ranked both completions without a tie; ``agreement = agreed / compared``. ``kendall_tau_b`` is
    Kendall's tau-b over the pairs both ranked (ties included, as tau-b corrects for them), averaged over
    shared prompts. Special-labelled rankings and rankings without a labeler name are left out (counted).
    Returns ``{"labeler_pairs": [...], "compared": n, "agreed": n, "agreement": rate | None, "skipped_special":
    n, "skipped_unnamed": n}``; rates are ``None`` when nothing could be compared.
    """
    by_labeler: dict[str, dict[str, dict[str, int | None]]] = {}
    for r in rankings:
        if r.special is not None or not r.labeler:
            continue
        seen = by_labeler.setdefault(r.labeler, {})
        if r.prompt_id in seen:
            raise LmcycleError(f"labeler '{r.labeler}' ranked prompt '{r.prompt_id}' twice", field="labeler")
        seen[r.prompt_id] = dict(zip(r.completions, r.ranks, strict=True))
    rows = [_agreement_row(a, b, by_labeler[a], by_labeler[b]) for a, b in itertools.combinations(sorted(by_labeler), 2)]
    compared, agreed = sum(r["compared"] for r in rows), sum(r["agreed"] for r in rows)
    return {"labeler_pairs": rows, "compared": compared, "agreed": agreed,
            "agreement": agreed / compared if compared else None,
            "skipped_special": sum(r.special is not None for r in rankings),
            "skipped_unnamed": sum(r.special is None and not r.labeler for r in rankings)}


def rank_concordance(ranks_a: dict[str, int | None],
                     ranks_b: dict[str, int | None]) -> tuple[int, int, float | None]:
    """``(agreed, compared, tau_b)`` of two rankings of one prompt, completions matched by key (text).

    Only completions both rank (not None) take part. ``compared`` counts the pairs both order strictly (C + D)
    and ``agreed`` those they order the same way (C). ``tau_b`` is Kendall's tau-b over those completions, ties
    included: ``(C - D) / sqrt(n_a * n_b)`` with ``n_a``, ``n_b`` the pairs each side orders strictly (as
    scipy's ``kendalltau(variant="b")``); None when either side ties every pair.
    """
    common = [c for c in ranks_a if c in ranks_b and ranks_a[c] is not None and ranks_b[c] is not None]
    concordant = discordant = tied_a = tied_b = 0
    for x, y in itertools.combinations(common, 2):
        da = _sign(ranks_a[x] - ranks_a[y])
        db = _sign(ranks_b[x] - ranks_b[y])
        if da and db:
            concordant += da == db
            discordant += da != db
        else:
            tied_a += da == 0 and db != 0
            tied_b += db == 0 and da != 0
    denom = math.sqrt((concordant + discordant + tied_a) * (concordant + discordant + tied_b))
    return concordant, concordant + discordant, (concordant - discordant) / denom if denom else None


def _agreement_row(a: str, b: str, ranks_a: dict, ranks_b: dict) -> dict[str, Any]:
    shared = sorted(set(ranks_a) & set(ranks_b))
    compared = agreed = 0
    taus = []
    for pid in shared:
        ok, n, tau = rank_concordance(ranks_a[pid], ranks_b[pid])
        compared += n
        agreed += ok
        if tau is not None:
            taus.append(tau)
    return {"labelers": [a, b], "shared_prompts": len(shared), "compared": compared, "agreed": agreed,
            "agreement": agreed / compared if compared else None,
            "kendall_tau_b": sum(taus) / len(taus) if taus else None}


def _sign(x: int) -> int:
    return (x > 0) - (x < 0)


def load_rankings(path: str | Path) -> list[Ranking]:
    """Rankings from a JSON Lines file (``.gz`` too), one per line with fields ``prompt_id``, ``prompt``,
    ``completions`` (list of >= 2 distinct non-empty strings), ``ranks`` (one integer >= 1 or null per
    completion), ``labeler`` (optional string), ``special`` (optional string or null) and ``ratings`` (optional:
    null, or one finite number or null per completion; the label export writes it). A ``special`` row may
    leave ``ranks`` out or null. A prompt id must always carry the same prompt text, and a named labeler may rank
    a prompt only once. Every problem is an :class:`LmcycleError` naming file, line and field."""
    rankings: list[Ranking] = []
    prompts: dict[str, str] = {}
    seen: set[tuple[str, str]] = set()
    for rec in read_records(path, "jsonl"):
        r = _to_ranking(rec)
        if prompts.setdefault(r.prompt_id, r.prompt) != r.prompt:
            raise _err(rec, "prompt_id", f"prompt id '{r.prompt_id}' already used with a different prompt")
        if r.labeler and (r.prompt_id, r.labeler) in seen:
            raise _err(rec, "labeler", f"labeler '{r.labeler}' already ranked prompt '{r.prompt_id}'")
        seen.add((r.prompt_id, r.labeler))
        rankings.append(r)
    return rankings


def _to_ranking(rec: SourceRecord) -> Ranking:
    d = rec.data
    prompt_id = id_field(rec, "prompt_id")
    prompt = text_field(rec, "prompt")
    completions = d.get("completions")
    if not isinstance(completions, list) or len(completions) < 2:
        raise _err(rec, "completions", "expected a list of at least 2 completions" if "completions" in d
                   else "missing field")
    for i, c in enumerate(completions):
        if not isinstance(c, str) or not c.strip():
            raise _err(rec, "completions", f"completion {i} is not a non-empty string")
    if len(set(completions)) != len(completions):
        raise _err(rec, "completions", "duplicate completions (a pair of equal texts has no preference)")
    labeler = d.get("labeler", "")
    if labeler is None:
        labeler = ""
    if not isinstance(labeler, str):
        raise _err(rec, "labeler", f"expected a string, got {type(labeler).__name__}")
    special = d.get("special")
    if special is not None and (not isinstance(special, str) or not special.strip()):
        raise _err(rec, "special", "expected a non-empty string or null")
    ranks = d.get("ranks")
    if ranks is None and special is not None:
        ranks = [None] * len(completions)
    elif "ranks" not in d:
        raise _err(rec, "ranks", "missing field")
    if not isinstance(ranks, list) or len(ranks) != len(completions):
        got = f"{len(ranks)} ranks" if isinstance(ranks, list) else type(ranks).__name__
        raise _err(rec, "ranks", f"expected one rank per completion ({len(completions)}), got {got}")
    for i, k in enumerate(ranks):
        if k is None:
            continue
        if isinstance(k, bool) or not isinstance(k, int):
            raise _err(rec, "ranks", f"rank {i} is not an integer: {k!r:.20}")
        if k < 1:
            raise _err(rec, "ranks", f"rank {i} is {k}; ranks start at 1 (= best)")
    return Ranking(prompt_id, prompt, list(completions), list(ranks), labeler, special, _ratings(rec, len(completions)))


def _ratings(rec: SourceRecord, k: int) -> list[float | None] | None:
    ratings = rec.data.get("ratings")
    if ratings is None:
        return None
    if not isinstance(ratings, list) or len(ratings) != k:
        got = f"{len(ratings)} ratings" if isinstance(ratings, list) else type(ratings).__name__
        raise _err(rec, "ratings", f"expected null or one rating per completion ({k}), got {got}")
    for i, v in enumerate(ratings):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)):
            raise _err(rec, "ratings", f"rating {i} is not a finite number or null: {v!r:.20}")
    return [None if v is None else float(v) for v in ratings]


def _err(rec: SourceRecord, field: str, message: str) -> LmcycleError:
    return LmcycleError(f"{rec.where()}{message}", file=rec.file, line=rec.line, field=field)


def load_hh_rlhf(path: str | Path) -> list[PreferencePair]:
    """Pairs from an Anthropic HH-RLHF JSON Lines file (``.gz`` too), rows ``{"chosen": ..., "rejected": ...}``.

    Both fields are whole transcripts (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``). The prompt is the part both
    share, up to and including their last shared ``"\\n\\nAssistant:"``; ``chosen`` and ``rejected`` are the rest
    of each (so ``prompt + chosen`` is the original text; responses keep their leading space). Usually that is
    the last Assistant turn; in the few rows whose transcripts diverge earlier, the responses are the
    multi-turn continuations from the divergence's Assistant turn, still a valid preference for that context.
    A response may be empty: the data has rows where the preferred reply is the assistant saying nothing
    (4 ``chosen`` replies in the shared harmless-base test file), a real preference, so they are kept here
    (recipe datasets leave them out: :func:`drop_empty_replies`).
    ``prompt_id`` is ``hh-`` plus a hash of the prompt, so rows with the same prompt stay together;
    ``margin`` is 1.0.
    """
    pairs = []
    for rec in read_records(path, "jsonl"):
        chosen, rejected = text_field(rec, "chosen"), text_field(rec, "rejected")
        cut = _shared_prompt_end(chosen, rejected)
        if cut < 0:
            raise _err(rec, "chosen", "chosen and rejected share no '\\n\\nAssistant:' turn to split at")
        prompt, chosen_reply, rejected_reply = chosen[:cut], chosen[cut:], rejected[cut:]
        prompt_id = "hh-" + hashlib.sha1(prompt.encode()).hexdigest()[:16]
        pairs.append(PreferencePair(prompt_id, prompt, chosen_reply, rejected_reply))
    return pairs


def _shared_prompt_end(chosen: str, rejected: str) -> int:
    """End (exclusive) of the last ``ASSISTANT_TAG`` inside the common prefix of both texts; -1 if none."""
    end = chosen.rfind(ASSISTANT_TAG)
    if end >= 0 and chosen[: end + len(ASSISTANT_TAG)] == rejected[: end + len(ASSISTANT_TAG)]:
        return end + len(ASSISTANT_TAG)  # the usual case: only the last reply differs
    common = next((i for i, (x, y) in enumerate(zip(chosen, rejected, strict=False)) if x != y),
                  min(len(chosen), len(rejected)))
    end = chosen.rfind(ASSISTANT_TAG, 0, common)
    return end + len(ASSISTANT_TAG) if end >= 0 else -1


def load_pairs(path: str | Path, split: str = "train") -> list[PreferencePair]:
    """Pairs from a JSON Lines file (``.gz`` too; a folder: its ``<split>.jsonl[.gz]``), one per line: ``prompt``, ``chosen``, ``rejected`` (non-empty
    strings), optional ``target`` (the probability that ``chosen`` is better: a finite number in [0, 1], default
    1.0; null means the default), optional ``prompt_id`` (default ``pairs-`` plus a hash of the prompt, so rows
    of one prompt stay together) and optional ``labeler`` (a string or null).

    A row with ``target < 0.5`` is kept with its replies swapped and ``1 - target``, so every pair's ``target``
    is in 0.5..1 (the same preference, said the other way round). A prompt id must always carry the same prompt
    text. Every problem is an :class:`LmcycleError` naming file, line and field."""
    pairs = []
    prompts: dict[str, str] = {}
    for rec in read_records(path, "jsonl", split):
        prompt, chosen, rejected = text_field(rec, "prompt"), text_field(rec, "chosen"), text_field(rec, "rejected")
        if "prompt_id" in rec.data and rec.data["prompt_id"] is not None:
            prompt_id = id_field(rec, "prompt_id")
        else:
            prompt_id = "pairs-" + hashlib.sha1(prompt.encode()).hexdigest()[:16]
        if prompts.setdefault(prompt_id, prompt) != prompt:
            raise _err(rec, "prompt_id", f"prompt id '{prompt_id}' already used with a different prompt")
        labeler = rec.data.get("labeler") or ""
        if not isinstance(labeler, str):
            raise _err(rec, "labeler", f"expected a string, got {type(labeler).__name__}")
        target = _target(rec)
        if target < 0.5:
            chosen, rejected, target = rejected, chosen, 1.0 - target
        pairs.append(PreferencePair(prompt_id, prompt, chosen, rejected, labeler, target=target))
    return pairs


def _target(rec: SourceRecord) -> float:
    value = rec.data.get("target")
    if value is None:
        return 1.0
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _err(rec, "target", f"expected a number in [0, 1] (the probability that chosen is better), got "
                   f"{value!r:.20}")
    if not 0.0 <= value <= 1.0:
        raise _err(rec, "target", f"target {value} is outside [0, 1] (the probability that chosen is better)")
    return float(value)


# -- preference pairs as recipe datasets ---------------------------------------------------------------------------
#
# A recipe dataset is a list of Examples. A pair is ``Example(input=prompt, targets=[chosen], id=prompt_id,
# meta={"rejected": ..., "margin": ..., "labeler": ...})``, so the chosen replies double as SFT targets and the
# prompts + chosen replies as pre-training text.

PREFERENCE_SPLITS = ("train", "test", "all")
PREFERENCE_TEST_FRACTION = 0.15  # of the distinct prompts; the rest is train
PREFERENCE_SPLIT_SEED = 0  # a constant, not the recipe's seed: a split that moved could leak test prompts


def preference_split(pairs: list[PreferencePair], split: str, fraction: float = PREFERENCE_TEST_FRACTION,
                     seed: int = PREFERENCE_SPLIT_SEED) -> list[PreferencePair]:
    """The ``train`` or ``test`` side of :func:`split_by_prompt` (``fraction`` of the prompts go to test, fixed
    seed), or ``all`` pairs; each side keeps file order and no prompt is on both sides."""
    if split not in PREFERENCE_SPLITS:
        raise LmcycleError(f"unknown split '{split}' for preference data (known: {', '.join(PREFERENCE_SPLITS)})",
                           field="split")
    if split == "all":
        return list(pairs)
    train, test = split_by_prompt(pairs, fraction, seed)
    return train if split == "train" else test


def drop_empty_replies(pairs: list[PreferencePair]) -> tuple[list[PreferencePair], int]:
    """``(pairs whose chosen and rejected replies both have text, how many were dropped)``.

    A pair with an empty reply is left out of recipe datasets: its chosen reply would be an empty SFT target,
    and a preference for saying nothing tells a reward model or DPO about the end-of-text token only.
    """
    kept = [p for p in pairs if p.chosen.strip() and p.rejected.strip()]
    return kept, len(pairs) - len(kept)


def load_preference_examples(path: str | Path, format: str, split: str) -> list[Example]:
    """Recipe examples of a preference file: ``format`` ``hh_rlhf`` (:func:`load_hh_rlhf`), ``pairs``
    (:func:`load_pairs`) or ``rankings`` (:func:`load_rankings` then :func:`rankings_to_pairs`); ``split``
    ``train``/``test``/``all`` (:func:`preference_split`). Pairs with an empty reply are dropped and counted in a
    log warning (:func:`drop_empty_replies`). ``path`` is the file, or a folder: for ``hh_rlhf`` and ``rankings``
    one holding exactly one ``*.jsonl[.gz]``; for ``pairs`` one holding ``<split>.jsonl[.gz]``, which is that
    split already and is taken whole (no prompt of it is moved to another split)."""
    path = Path(path)
    if format == "pairs":
        if path.is_dir():
            return pair_examples(load_pairs(path, split), "all", path)
        return pair_examples(load_pairs(path), split, path)
    file = _preference_file(path)
    if format == "rankings":
        return ranking_examples(load_rankings(file), split, file)
    return pair_examples(load_hh_rlhf(file), split, file)


def ranking_examples(rankings: list[Ranking], split: str, source: str | Path) -> list[Example]:
    """Recipe examples of rankings wherever they were read (a ``rankings`` file, a label database): their
    pairs (:func:`rankings_to_pairs`) as :func:`pair_examples` makes them. One function for every source, so
    that a label database and its exported file give the same examples."""
    return pair_examples(rankings_to_pairs(rankings), split, source)


def pair_examples(pairs: list[PreferencePair], split: str, source: str | Path) -> list[Example]:
    """The ``split`` of ``pairs`` (:func:`preference_split`) as recipe examples, pairs with an empty reply
    dropped and counted in a log warning (:func:`drop_empty_replies`); no pair at all is an error. ``source``
    (a file, or a label database's name) is what the error and the warning name."""
    if not pairs:
        raise LmcycleError("no preference pair can be formed: every ranking ties or leaves out its completions, "
                           "or is special", file=source, field="ranks")
    kept, dropped = drop_empty_replies(preference_split(pairs, split))
    if dropped:
        name = source.name if isinstance(source, Path) else source
        logger.warning("%s (%s split): left out %d preference pair(s) with an empty reply", name, split, dropped)
    return examples_from_pairs(kept)


def _preference_file(path: Path) -> Path:
    if not path.is_dir():
        return path  # read_records names a missing file
    files = sorted(p for p in path.iterdir() if p.name.endswith((".jsonl", ".jsonl.gz")))
    if len(files) != 1:
        found = ", ".join(p.name for p in files) or "none"
        raise LmcycleError(f"expected exactly one .jsonl or .jsonl.gz file in the folder (found: {found}); "
                           "give the file itself", file=path)
    return files[0]


def examples_from_pairs(pairs: list[PreferencePair]) -> list[Example]:
    """Each pair as ``Example(input=prompt, targets=[chosen], task="preference", id=prompt_id,
    meta={"rejected", "margin", "labeler"})``, plus ``meta["target"]`` for a soft pair (``target`` < 1; a hard
    pair leaves it out, so its examples are what they were before soft targets); the inverse of
    :func:`pairs_from_examples`.

    A pair read from a ranking also carries it: ``meta["ranking"] = {"index", "completions", "ranks", "ratings"}`` (one
    dict shared by that ranking's pairs; ``index`` numbers the distinct rankings in order of first appearance,
    so two unnamed labelers' rankings of one prompt stay apart). :func:`rankings_from_examples` reads it back.
    """
    index: dict[int, dict[str, Any]] = {}
    out = []
    for p in pairs:
        meta: dict[str, Any] = {"rejected": p.rejected, "margin": p.margin, "labeler": p.labeler}
        if p.target != 1.0:
            meta["target"] = p.target
        if p.ranking is not None:
            r = p.ranking
            meta["ranking"] = index.setdefault(id(r), {"index": len(index), "completions": list(r.completions),
                                                        "ranks": list(r.ranks), "ratings": r.ratings})
        out.append(Example(input=p.prompt, targets=[p.chosen], task="preference", id=p.prompt_id, meta=meta))
    return out


def pairs_from_examples(examples: list[Example], dataset: str = "") -> list[PreferencePair]:
    """The preference pairs of a recipe dataset (see :func:`examples_from_pairs`).

    A dataset whose examples have no ``meta["rejected"]`` is not preference data: :class:`LmcycleError` naming
    ``dataset`` (use format ``hh_rlhf``, ``pairs`` or ``rankings``). ``meta["target"]`` (default 1.0) must be a
    number in [0.5, 1]."""
    if not examples:
        raise LmcycleError(f"dataset '{dataset}' has no examples", field="data")
    pairs = []
    for ex in examples:
        rejected = ex.meta.get("rejected")
        if not isinstance(rejected, str):
            raise LmcycleError(f"dataset '{dataset}' is not preference data: example '{ex.id}' has no rejected "
                               "reply (load chosen/rejected pairs with format hh_rlhf, pairs or rankings)",
                               field="data")
        margin = ex.meta.get("margin", 1.0)
        target = ex.meta.get("target", 1.0)
        if isinstance(target, bool) or not isinstance(target, int | float) or not 0.5 <= target <= 1.0:
            raise LmcycleError(f"dataset '{dataset}': example '{ex.id}' has target {target!r:.20}; a pair's target "
                               "is the probability that its chosen reply is better, in [0.5, 1]", field="target")
        pairs.append(PreferencePair(ex.id, ex.input, ex.target, rejected, str(ex.meta.get("labeler") or ""),
                                    float(margin if margin is not None else 1.0), float(target)))
    return pairs


def rankings_from_examples(examples: list[Example], dataset: str = "") -> list[Ranking]:
    """The rankings behind a recipe dataset's pairs (``meta["ranking"]``, see :func:`examples_from_pairs`), each
    once, in order of first appearance, as ``Ranking(ex.id, ex.input, completions, ranks, labeler, ratings=...)``.

    They follow the dataset's split and ``limit`` (a ranking is here when at least one of its pairs is). A
    ranking whose completions all tie makes no pair, so no example holds it. A dataset of pairs read as pairs
    (``hh_rlhf``, ``synthetic_preferences``) has no rankings: :class:`LmcycleError` naming ``dataset``."""
    if not examples:
        raise LmcycleError(f"dataset '{dataset}' has no examples", field="data")
    found: dict[tuple, Ranking] = {}
    for ex in examples:
        r = ex.meta.get("ranking")
        if not (isinstance(r, dict) and isinstance(r.get("completions"), list) and isinstance(r.get("ranks"), list)
                and len(r["completions"]) == len(r["ranks"])):
            raise LmcycleError(f"dataset '{dataset}' holds no rankings: example '{ex.id}' is a pair without the "
                               "ranking it came from (load rankings with format rankings or label_db)",
                               field="data")
        labeler = str(ex.meta.get("labeler") or "")
        key = (ex.id, labeler, r.get("index"))
        if key not in found:
            found[key] = Ranking(ex.id, ex.input, list(r["completions"]), list(r["ranks"]), labeler,
                                 ratings=r.get("ratings"))
    return list(found.values())
