"""The reward stage with `loss: listwise | rao_kupper | davidson` and `labeler_weights`: each loss learns a
preference from a rankings file with ties and records itself in eval.json, pairs-only data is refused on the
`loss` field, a killed run resumes exactly, labeler weights steer training, and the report names the loss."""

from __future__ import annotations

import json
import math
import random

import pytest
import tiny_lm
import torch
import yaml

from lmcycle.align.reward import RewardModel, train_ranking_reward_model
from lmcycle.config import validate
from lmcycle.data.loaders import DatasetConfig, load_examples
from lmcycle.data.preferences import (
    Ranking,
    examples_from_pairs,
    pairs_from_examples,
    rankings_from_examples,
    rankings_to_pairs,
)
from lmcycle.errors import LmcycleError
from lmcycle.feedback.agreement import labeler_weights
from lmcycle.report.rundir import Run
from lmcycle.stages.context import RunContext
from lmcycle.stages.reward import RewardStage, run_reward, section
from lmcycle.train.loop import TrainConfig

TRAIN = {"max_steps": 30, "batch_size": 8, "lr": 3e-3, "warmup_steps": 2, "eval_every": 15, "log_every": 10}
# Every strict pair is a marked completion over an unmarked one (learnable); ties on both sides, one unranked.
PATTERNS = ([1, 1, 2, 2], [1, 1, 2, None], [1, None, 2, 2])


def marker_rankings(n: int, seed: int, labeler: str = "ann", reverse: bool = False) -> list[dict]:
    """Rankings of 4 completions, the two with the marker word on top (``reverse``: at the bottom)."""
    rng = random.Random(seed)
    words = [w for w in tiny_lm.WORDS if w != tiny_lm.MARKER]
    rows = []
    for i in range(n):
        texts: list[str] = []
        while len(texts) < 4:
            body = [rng.choice(words) for _ in range(rng.randint(2, 4))]
            if len(texts) < 2:
                body.insert(rng.randint(0, len(body)), tiny_lm.MARKER)
            if " " + " ".join(body) not in texts:
                texts.append(" " + " ".join(body))
        ranks = list(PATTERNS[i % 3])
        if reverse:
            ranks = [None if r is None else 3 - r for r in ranks]
        order = list(range(4))
        rng.shuffle(order)
        rows.append({"prompt_id": f"p{seed}-{i}", "prompt": f"the {rng.choice(words)} sees the {rng.choice(words)} :",
                     "completions": [texts[j] for j in order], "ranks": [ranks[j] for j in order],
                     "labeler": labeler})
    return rows


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def context(tmp_path, tok, train_rows, held_rows, fmt: str = "rankings") -> RunContext:
    data = {"prefs": DatasetConfig(format=fmt, path=write_jsonl(tmp_path / "train.jsonl", train_rows), split="all"),
            "held_out": DatasetConfig(format="rankings", path=write_jsonl(tmp_path / "held.jsonl", held_rows),
                                      split="all")}
    ctx = RunContext(run_dir=tmp_path / "run", recipe_file=str(tmp_path / "recipe.yaml"), data=data)
    ctx.add_artifacts("build", {"model": tiny_lm.save_tiny(tiny_lm.tiny_llama(tok), tok, tmp_path / "build")})
    return ctx


def stage(**fields) -> RewardStage:
    return validate(RewardStage, {"model": "build", "data": "prefs", "eval_data": "held_out", "max_len": 64,
                                  "train": TRAIN, **fields})


def tie_log_prob_at_equal_scores(loss: str, value: float) -> float:
    """log P(tie) when both scores are equal: the most a tied pair can get."""
    if loss == "rao_kupper":
        return math.log((value ** 2 - 1) / (1 + value) ** 2)
    return math.log(value / (2 + value))


@pytest.mark.parametrize("loss,extra", [
    ("pairwise", {}), ("listwise", {}), ("rao_kupper", {}), ("davidson", {}),
    ("rao_kupper", {"rao_kupper_theta": "learned"}), ("davidson", {"davidson_nu": 2.0})])
def test_each_loss_learns_the_preference_of_rankings_with_ties_and_records_itself(loss, extra, tok, tmp_path):
    held_rows = marker_rankings(24, seed=2)
    ctx = context(tmp_path, tok, marker_rankings(64, seed=1), held_rows)
    produced = run_reward(stage(loss=loss, **extra), ctx)
    report = json.loads(open(produced["eval"]).read())
    m, s = report["metrics"], report["settings"]

    assert s["loss"] == loss and s["labeler_weights"] == "none" and s["weights"] is None
    # the comparable numbers: held-out strict pairs, 4 + 2 + 2 per three rankings, well above chance (0.5)
    assert m["n"] == 8 * 24 // 3 and m["accuracy"] >= 0.9 and m["loss"] < math.log(2)
    accuracies = [r["eval_accuracy"] for r in ctx.read_metrics("reward") if "step" in r and "eval_accuracy" in r]
    assert len(accuracies) == 2
    if loss == "pairwise":
        assert s["loss_params"] == {} and s["train_rankings"] is None and "ranking_loss" not in m
        return
    assert s["train_rankings"] == 64 and m["rankings"] == 24
    if loss == "listwise":
        assert s["loss_params"] == {"ties": "breslow"}
        assert m["top1_n"] == 24 and m["top1_accuracy"] >= 0.9  # chance: 1/2, 2/3, 1/3
        return
    name = "theta" if loss == "rao_kupper" else "nu"
    value = s["loss_params"][name]
    if extra:
        expected = extra.get("davidson_nu", "learned")
        assert s["loss_params"]["learned"] == (expected == "learned")
        assert value != 1.5 if expected == "learned" else value == expected  # a learned θ moved from its start
    else:
        assert s["loss_params"] == {name: 1.5 if loss == "rao_kupper" else 1.0, "learned": False}
    assert m["tie_pairs"] == 24 // 3 * (2 + 1 + 1)  # the tied pairs of the three patterns
    assert m["tie_loglik"] <= tie_log_prob_at_equal_scores(loss, value) + 1e-6
    assert m["tie_loglik"] > tie_log_prob_at_equal_scores(loss, value) - 2.0  # tied completions score close


def hh_row(i: int) -> dict:
    context_ = f"\n\nHuman: question {i}?\n\nAssistant:"
    return {"chosen": f"{context_} yes", "rejected": f"{context_} no"}


def test_a_ranking_loss_on_pairs_read_as_pairs_fails_on_the_loss_field_before_anything_runs(tok, tmp_path):
    ctx = context(tmp_path, tok, [hh_row(i) for i in range(8)], marker_rankings(6, seed=2), fmt="hh_rlhf")
    with pytest.raises(LmcycleError, match="loss listwise needs whole rankings.*'prefs' is format hh_rlhf") as err:
        run_reward(stage(loss="listwise"), ctx)
    assert err.value.field == "loss" and err.value.file == ctx.recipe_file
    assert not (ctx.run_dir / "reward").exists()  # found from the configs: nothing was loaded or written
    with pytest.raises(LmcycleError, match="labeler_weights agreement needs") as err:
        run_reward(stage(labeler_weights="agreement"), ctx)
    assert err.value.field == "labeler_weights"

    # A dataset the data section does not describe is caught on its examples, on the same field.
    bare = RunContext(run_dir=tmp_path / "bare", recipe_file=ctx.recipe_file, artifacts=ctx.artifacts)
    bare._datasets["prefs"] = examples_from_pairs(tiny_lm.marker_pairs(8, seed=1))
    bare._datasets["held_out"] = examples_from_pairs(tiny_lm.marker_pairs(4, seed=2))
    with pytest.raises(LmcycleError, match="loss davidson needs whole rankings.*holds no rankings") as err:
        run_reward(stage(loss="davidson"), bare)
    assert err.value.field == "loss"


def test_rankings_examples_carry_their_rankings_and_the_pairs_stay_as_they_were(tmp_path):
    rows = marker_rankings(6, seed=3) + [{**marker_rankings(1, seed=3)[0], "labeler": ""}]
    rows.append({**rows[-1], "ranks": [None if k is None else 3 - k for k in rows[-1]["ranks"]]})  # unnamed too
    rows.append({**rows[-1], "ranks": [1, 1, 1, 1]})  # a third unnamed ranking of that prompt: all tied
    examples = load_examples(DatasetConfig(format="rankings", path=write_jsonl(tmp_path / "r.jsonl", rows),
                                           split="all"))
    rankings = rankings_from_examples(examples)
    by_prompt = [rows[0], rows[6], rows[7], *rows[1:6]]  # pairs, and so rankings, come grouped by prompt
    assert [(r.prompt_id, r.labeler, r.ranks) for r in rankings] == \
        [(row["prompt_id"], row["labeler"], row["ranks"]) for row in by_prompt]  # all-tied: no pair, not here
    pairs = pairs_from_examples(examples)
    assert len(pairs) == len(examples) == 2 * (4 + 2 + 2) + 4 + 4
    assert all(p.ranking is None for p in pairs)  # what pairwise training gets: plain pairs, as before


@pytest.mark.parametrize("kwargs,field,message", [
    ({"margin": True, "loss": "listwise"}, "loss", "margin only applies to loss pairwise"),
    ({"loss": "listwise", "rao_kupper_theta": 2.0}, "rao_kupper_theta", "only applies to loss rao_kupper"),
    ({"loss": "rao_kupper", "rao_kupper_theta": 1.0}, "rao_kupper_theta", "must be > 1"),
    ({"loss": "davidson", "davidson_nu": 0.0}, "davidson_nu", "must be > 0"),
    ({"davidson_nu": "learned"}, "davidson_nu", "only applies to loss davidson"),
    ({"loss": "hinge"}, "loss", "Input should be"),
    ({"labeler_weights": "votes"}, "labeler_weights", "Input should be")])
def test_stage_config_rejects_loss_settings_that_do_not_fit(kwargs, field, message):
    with pytest.raises(LmcycleError, match=message) as err:
        stage(**kwargs)
    assert err.value.field == field


def test_stage_config_defaults_to_todays_pairwise_loss():
    cfg = stage()
    assert (cfg.loss, cfg.labeler_weights, cfg.rankings_field) == ("pairwise", "none", None)
    assert stage(loss="davidson", davidson_nu="learned").davidson_nu == "learned"
    assert stage(loss="rao_kupper", rao_kupper_theta=3).rao_kupper_theta == 3


def rankings_of(rows) -> list[Ranking]:
    return [Ranking(r["prompt_id"], r["prompt"], r["completions"], r["ranks"], r["labeler"]) for r in rows]


def llama_rm(tok, seed: int = 0) -> RewardModel:
    lm = tiny_lm.tiny_llama(tok, seed)
    torch.manual_seed(seed)
    return RewardModel.from_causal_lm(lm)


class Killed(Exception):
    pass


def test_a_killed_ranking_run_resumes_to_the_same_weights_and_learned_tie(tok, tmp_path):
    rankings = rankings_of(marker_rankings(24, seed=1))
    cfg = TrainConfig(max_steps=6, batch_size=4, lr=3e-3, warmup_steps=1, save_every=2, log_every=1, seed=3)

    def run(model, out, log=lambda **kw: None):
        return train_ranking_reward_model(model, tok, rankings, cfg, out, log, loss="davidson", learn_tie=True,
                                          max_len=64)

    straight_model = llama_rm(tok)
    straight, straight_params = run(straight_model, tmp_path / "straight")

    def killed_at_step_3(**row):
        if row.get("step") == 3 and "loss" in row:
            raise Killed

    with pytest.raises(Killed):
        run(llama_rm(tok), tmp_path / "resumed", killed_at_step_3)
    resumed_model = llama_rm(tok, seed=7)  # another init: the checkpoint must win
    resumed, resumed_params = run(resumed_model, tmp_path / "resumed")
    assert resumed.step == 6 and resumed.losses == straight.losses  # exact, every step
    assert resumed_params == straight_params and straight_params["nu"] != 1.0  # ν learned, and restored
    for k, v in straight_model.state_dict().items():
        assert torch.equal(v, resumed_model.state_dict()[k]), k


def pair_accuracy(model, pairs, tok) -> float:
    from lmcycle.align.reward import encode_pairs, pair_batches, pair_metrics

    model.eval()
    return pair_metrics(model, pair_batches(encode_pairs(pairs, tok, 64), tok, 16))["accuracy"]


def test_labeler_weights_decide_whose_rankings_the_model_learns(tok, tmp_path):
    # Two labelers rank the same completions in opposite orders: unweighted, the signal cancels out.
    good = marker_rankings(48, seed=1, labeler="good")
    bad = [{**r, "labeler": "bad", "ranks": [None if k is None else 3 - k for k in r["ranks"]]} for r in good]
    rankings = rankings_of(good + bad)
    held_out = rankings_to_pairs(rankings_of(marker_rankings(24, seed=2)))
    cfg = TrainConfig(max_steps=30, batch_size=8, lr=3e-3, warmup_steps=2, seed=0)
    accuracy = {}
    for name, weights in (("none", None), ("good", {"good": 1.0, "bad": 0.0}), ("bad", {"good": 0.0, "bad": 1.0})):
        model = llama_rm(tok)
        train_ranking_reward_model(model, tok, rankings, cfg, tmp_path / name, lambda **kw: None,
                                   loss="listwise", max_len=64, weights=weights)
        accuracy[name] = pair_accuracy(model, held_out, tok)
    assert accuracy["good"] >= 0.9 and accuracy["bad"] <= 0.1, accuracy
    assert 0.1 < accuracy["none"] < 0.9, accuracy


def test_agreement_weights_silence_a_contrarian_labeler(tok, tmp_path):
    # Three labelers agree; a fourth ranks every prompt the other way round (an outlier: weight 0).
    agreeing = [{**r, "labeler": name} for name in ("ann", "bob", "cy") for r in marker_rankings(48, seed=1)]
    contrarian = [{**r, "labeler": "dan", "ranks": [None if k is None else 3 - k for k in r["ranks"]]}
                  for r in marker_rankings(48, seed=1)]
    ctx = context(tmp_path, tok, agreeing + contrarian, marker_rankings(24, seed=2))
    produced = run_reward(stage(loss="listwise", labeler_weights="agreement"), ctx)
    report = json.loads(open(produced["eval"]).read())
    weights = report["settings"]["weights"]
    assert weights == labeler_weights(rankings_from_examples(ctx.dataset("prefs")))  # of the training rankings
    assert weights["dan"] == 0 and weights["ann"] == weights["bob"] == weights["cy"] > 1
    assert report["settings"]["labeler_weights"] == "agreement" and report["settings"]["train_rankings"] == 192
    assert report["metrics"]["accuracy"] >= 0.9


def write_run(run_dir, stages: dict[str, dict]) -> Run:
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"name": "r", "stages": [
        {"type": "reward", "name": name} for name in stages]}))
    artifacts = {}
    for name, payload in stages.items():
        (run_dir / name).mkdir()
        (run_dir / name / "eval.json").write_text(json.dumps(payload))
        artifacts[name] = {"eval": str(run_dir / name / "eval.json")}
    (run_dir / "artifacts.json").write_text(json.dumps(artifacts))
    return Run.read(run_dir)


def eval_json(settings: dict, **metrics) -> dict:
    base = {"accuracy": 0.9, "loss": 0.3, "margin": 1.2, "reward_mean": 0.1, "reward_std": 1.0, "n": 40}
    return {"kind": "reward", "metrics": {**base, **metrics},
            "settings": {"backbone": "causal", "train_pairs": 100, **settings}}


def test_the_report_shows_the_loss_when_the_stages_differ(tmp_path):
    run = write_run(tmp_path / "a", {
        "rm_bt": eval_json({}),  # an eval.json from before the loss setting: pairwise
        "rm_pl": eval_json({"loss": "listwise", "loss_params": {"ties": "breslow"}}, top1_accuracy=0.875),
        "rm_rk": eval_json({"loss": "rao_kupper", "loss_params": {"theta": 1.734, "learned": True},
                            "labeler_weights": "agreement"}, tie_loglik=-1.25)})
    lines = section(run).splitlines()
    head = next(line for line in lines if line.startswith("| Stage"))
    assert [c.strip() for c in head.strip("|").split("|")] == [
        "Stage", "Backbone", "Loss", "Train pairs", "Held-out pairs", "Pair accuracy", "Pair loss",
        "Margin (r_c − r_r)", "Reward mean ± std", "Top-1", "Tie log-lik"]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
            for line in lines if line.startswith("| rm")}
    assert rows["rm_bt"][2] == "pairwise (Bradley-Terry)" and rows["rm_bt"][-2:] == ["—", "—"]
    assert rows["rm_pl"][2] == "listwise (Plackett-Luce)" and rows["rm_pl"][-2] == "0.875"
    assert rows["rm_rk"][2] == "Rao-Kupper θ=1.73 learned, agreement-weighted" and rows["rm_rk"][-1] == "-1.250"

    same = write_run(tmp_path / "b", {"x": eval_json({"loss": "pairwise"}), "y": eval_json({})})
    head = next(line for line in section(same).splitlines() if line.startswith("| Stage"))
    assert "Loss |" in head and "Pair loss" not in head and head.count("Loss") == 1  # one loss: no column
