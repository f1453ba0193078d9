"""The closed loop's own stages: simulated labelers through the app, the win rate, datasets made by a stage,
and the whole `recipes/feedback.yaml` run end to end."""

import json
import random
import textwrap
from pathlib import Path

import pytest

from lmcycle.data.preferences import load_rankings
from lmcycle.errors import LmcycleError
from lmcycle.feedback.store import LabelStore
from lmcycle.report.rundir import Run
from lmcycle.stages import labelers, winrate
from lmcycle.stages.context import RunContext
from lmcycle.stages.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[2]
NAMES = ["Tom", "Ann", "Li", "Sam", "Eve", "Bo", "Kim", "Max"]
PLACES = ["cafe", "park", "office", "station", "bakery", "library"]
DAYS = ["Monday", "Tuesday", "Friday", "Sunday"]


def completions_file(path: Path, n: int, seed: int = 0, perfect: bool = False) -> Path:
    """``n`` items whose 4 completions are ever further from the reference: the oracle's order is known."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        who, other = rng.sample(NAMES, 2)
        place, day = rng.choice(PLACES), rng.choice(DAYS)
        ref = f"{who} and {other} will meet at the {place} on {day} to talk about the plan."
        texts = [ref if perfect else f"{who} and {other} meet at the {place} on {day} about the plan.",
                 f"{who} will meet someone at the {place}.",
                 f"{other} goes to the {rng.choice(PLACES)} on {rng.choice(DAYS)}.",
                 f"The weather is {rng.choice(['cold', 'warm', 'wet'])} and {i} birds sing."]
        lines.append({"prompt_id": f"p{i}", "prompt": f"Summarize dialogue {i}.",
                      "completions": [{"id": f"c{j}", "text": t, "model": "m"} for j, t in enumerate(texts)],
                      "meta": {"reference": ref}})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_simulated_labelers_label_through_the_app_and_the_random_one_is_flagged(tmp_path):
    ctx = RunContext(run_dir=tmp_path / "run", device="cpu")
    ctx.add_artifacts("before", {"completions": completions_file(tmp_path / "c.jsonl", 40)})
    cfg = labelers.LabelersStage(completions="before", gold=5, labelers=[
        {"name": "ann", "noise": 0.03}, {"name": "ben", "noise": 0.06}, {"name": "cai", "noise": 0.1},
        {"name": "dee", "random": True}])
    out = labelers.run_labelers(cfg, ctx)

    report = json.loads(Path(out["eval"]).read_text())
    rows = {r["labeler"]: r for r in report["labelers"]}
    assert all(r["submitted"] == 40 and r["replays"] == 0 for r in rows.values())
    flagged = {r["labeler"] for r in report["agreement"]["labelers"] if r["outlier"]}
    assert flagged == {"dee"}
    weights = {r["labeler"]: r["weight"] for r in report["agreement"]["labelers"]}
    assert weights["dee"] == 0 and min(weights["ann"], weights["ben"], weights["cai"]) > 0.5
    gold = {r["labeler"]: r["gold_accuracy"] for r in report["agreement"]["labelers"]}
    assert gold["ann"] > 0.9 > 0.7 > gold["dee"]

    with LabelStore.open(out["labels"]) as store:
        snap = store.snapshot()
        assert len(snap.labels) == 4 * 40 and sum(item.gold is not None for item in snap.items) == 5
        oracle = store.snapshot("oracle")
        # the truth, ranked once per item: here always c0 > c1 > c2 > c3
        assert len(oracle.labels) == 40 and {str(lab.ranking) for lab in oracle.labels} == {
            "[['c0'], ['c1'], ['c2'], ['c3']]"}
    exported = load_rankings(out["rankings"])
    assert len(exported) == 160 and {r.labeler for r in exported} == {"ann", "ben", "cai", "dee"}

    ctx.log("labelers", event="stage_end", type="labelers", seconds=1.0)  # as the runner records the stage
    page = labelers.section(Run.read(ctx.run_dir, {"labelers": {"eval": out["eval"]}}))
    assert "The random labeler (dee) was singled out by agreement." in page
    assert (ctx.run_dir / "plots" / "agreement_labelers.png").stat().st_size > 10_000


def test_win_rate_stage_judges_by_the_oracle(tmp_path):
    ctx = RunContext(run_dir=tmp_path / "run", device="cpu")
    ctx.add_artifacts("before", {"completions": completions_file(tmp_path / "a.jsonl", 20)})
    ctx.add_artifacts("after", {"completions": completions_file(tmp_path / "b.jsonl", 20, perfect=True)})
    out = winrate.run_winrate(winrate.WinrateStage(candidate="after", baseline="before", resamples=200), ctx)
    m = json.loads(Path(out["eval"]).read_text())["metrics"]
    # "after" differs only in its first completion, the reference itself, which beats all of "before"'s
    assert 0.5 < m["win_rate"] < 1 and m["ci_low"] <= m["win_rate"] <= m["ci_high"]
    assert m["candidate_mean"] > m["baseline_mean"]
    reverse = winrate.run_winrate(winrate.WinrateStage(name="rev", candidate="before", baseline="after",
                                                       resamples=200), ctx)
    assert json.loads(Path(reverse["eval"]).read_text())["metrics"]["win_rate"] == pytest.approx(1 - m["win_rate"])
    for name in ("winrate", "rev"):
        ctx.log(name, event="stage_end", type="winrate", seconds=1.0)
    page = winrate.section(Run.read(ctx.run_dir, {"winrate": out, "rev": reverse}))
    assert "| winrate | after | before | 20 |" in page


RECIPE = """\
name: loop
data:
  prompts: {format: synthetic, n: 8, seed: 3}
  labels: {format: label_db, stage: LABELS_STAGE, split: train}
stages:
  - {type: build, arch: llama, size: 1m, corpus: [prompts], vocab_size: 320, max_len: 256}
  - {type: completions, name: before, prompts: prompts, k: 2}
  - {type: labelers, completions: COMPLETIONS, labelers: [{name: a}, {name: b}]}
  - {type: reward, model: build, backbone: causal_lm, data: labels, eval_data: labels, train: {max_steps: 1}}
"""


@pytest.mark.parametrize("labels_stage,completions,field,words", [
    ("labelers", "after", "stages.2.completions", "stage 'after', but no earlier stage has that name"),
    ("labelers", "labelers", "stages.2.completions", "which is this stage itself"),
    ("reward", "before", "stages.3.data", "dataset 'labels' reads the labels of stage 'reward', which is this"),
    ("labellers", "before", "stages.3.data", "did you mean 'labelers'"),
])
def test_stage_references_and_datasets_made_by_a_stage_are_checked_at_load(tmp_path, labels_stage, completions,
                                                                          field, words):
    p = tmp_path / "r.yaml"
    p.write_text(RECIPE.replace("LABELS_STAGE", labels_stage).replace("COMPLETIONS", completions))
    with pytest.raises(LmcycleError) as e:
        load_recipe(p)
    assert f"field '{field}'" in str(e.value) and words in str(e.value)


def test_a_dataset_gives_path_or_stage_and_only_label_db_takes_a_stage(tmp_path):
    for data, words in [("{format: label_db, stage: x, path: l.sqlite}", "give 'path' or 'stage', not both"),
                        ("{format: rankings, stage: x}", "'stage' only applies to format 'label_db'")]:
        p = tmp_path / "r.yaml"
        p.write_text(textwrap.dedent(RECIPE).replace("{format: label_db, stage: LABELS_STAGE, split: train}", data)
                     .replace("COMPLETIONS", "before"))
        with pytest.raises(LmcycleError, match=words):
            load_recipe(p)


@pytest.mark.slow
def test_the_feedback_recipe_closes_the_loop(tmp_path, capsys):
    """recipes/feedback.yaml as shipped: every stage runs; agreement singles out the random labeler; each
    reward loss is scored on the oracle's held-out rankings; the report has the loop's sections."""
    from lmcycle.cli import main

    assert main(["run", str(ROOT / "recipes" / "feedback.yaml"), "--out", str(tmp_path / "run")]) == 0
    run = tmp_path / "run"
    assert (run / "DONE").exists()
    lab = json.loads((run / "labelers" / "eval.json").read_text())
    assert {r["labeler"] for r in lab["agreement"]["labelers"] if r["outlier"]} == {"dee"}
    losses = {json.loads((run / s / "eval.json").read_text())["settings"]["loss"]
              for s in ("rm_pairwise", "rm_listwise", "rm_tie_aware")}
    assert losses == {"pairwise", "listwise", "rao_kupper"}
    for s in ("rm_pairwise", "rm_listwise", "rm_tie_aware"):
        m = json.loads((run / s / "eval.json").read_text())["metrics"]
        assert m["n"] > 50 and 0 <= m["accuracy"] <= 1
    win = json.loads((run / "winrate" / "eval.json").read_text())["metrics"]
    assert win["ci_low"] <= win["win_rate"] <= win["ci_high"]
    report = (run / "report.md").read_text()
    for heading in ("### Completions for labeling", "### Labels and agreement", "### Reward models",
                    "### Win rate after the loop"):
        assert heading in report
    assert "The random labeler (dee) was singled out by agreement." in report


def test_the_labels_come_out_in_the_same_order_however_the_threads_raced(tmp_path):
    """Submission order depends on thread timing; the export and the label_db dataset must not, or the reward
    model trained on them would differ from run to run (seen: 0.61 vs 0.77 held-out accuracy)."""
    exports = []
    for attempt in range(2):
        ctx = RunContext(run_dir=tmp_path / f"run{attempt}", device="cpu")
        ctx.add_artifacts("before", {"completions": completions_file(tmp_path / "c.jsonl", 12)})
        cfg = labelers.LabelersStage(completions="before", labelers=[
            {"name": "ann", "noise": 0.05}, {"name": "ben", "noise": 0.05}, {"name": "dee", "random": True}])
        out = labelers.run_labelers(cfg, ctx)
        rows = [json.loads(line) for line in Path(out["rankings"]).read_text().splitlines()]
        assert [(r["prompt_id"], r["labeler"]) for r in rows] == sorted(
            ((r["prompt_id"], r["labeler"]) for r in rows), key=lambda k: (int(k[0][1:]), k[1]))
        exports.append([{k: r[k] for k in ("prompt_id", "labeler", "ranks", "special")} for r in rows])
    assert exports[0] == exports[1]
