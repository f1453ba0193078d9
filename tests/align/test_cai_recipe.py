"""recipes/cai.yaml end to end on the real local path, shrunk by overrides (the full run is in the note):
every stage runs on models trained in the test, each artifact is there, and the report has the CAI chapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmcycle.align.constitution import load_constitution

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data"
STEPS = {0: 2, 2: 4, 3: 2, 5: 2, 7: 2, 9: 2}  # classifier, pretrain, helpful, sl_cai, cai_rm, human_rm
SHRINK = ["data.red_team.limit=4", "data.human_test.limit=6", "data.tweets.limit=64", "data.tweets_dev.limit=32",
          "data.dialogues.limit=96", "stages.4.rounds=2",
          *[f"stages.{i}.train.{k}={v}" for i, n in STEPS.items() for k, v in (("max_steps", n), ("warmup_steps", 0))],
          *[f"stages.{i}.{k}" for i in (8, 10) for k in ("rollouts=1", "ppo.rollout_size=4", "train.batch_size=4")],
          *[f"stages.{i}.limit=4" for i in (11, 12, 13, 14, 15)]]


@pytest.mark.skipif(not (SHARED / "constitutional_ai").is_dir() or not (SHARED / "hh_rlhf").is_dir(),
                    reason="needs ../shared/data (constitutional_ai, hh_rlhf, hate_speech_offensive)")
def test_the_cai_recipe_runs_every_stage_and_reports_them(tmp_path):
    from lmcycle.cli import main

    run = tmp_path / "run"
    assert main(["run", str(ROOT / "recipes" / "cai.yaml"), "--out", str(run), *SHRINK]) == 0
    constitution = load_constitution(SHARED / "constitutional_ai")
    ids = {p.id for p in constitution.critiques}
    traces = [json.loads(line) for line in (run / "critique_revise" / "traces.jsonl").read_text().splitlines()]
    assert len(traces) == 4 * 2 and [t["round"] for t in traces] == [0, 1] * 4
    assert {t["principle"] for t in traces} <= ids
    assert all(set(t) >= {"prompt_id", "prompt", "answer", "principle", "critique", "revision"} for t in traces)
    pairs = [json.loads(line) for line in (run / "ai_feedback" / "pairs.jsonl").read_text().splitlines()]
    assert pairs and all(0.5 <= p["target"] <= 1 and p["principle"] in constitution.comparisons for p in pairs)
    feedback = json.loads((run / "ai_feedback" / "eval.json").read_text())
    assert feedback["settings"]["constitution_hash"] == constitution.hash
    assert feedback["settings"]["scoring"] == "likelihood" and feedback["metrics"]["human_pairs"] == 6
    m = feedback["metrics"]
    assert 0 <= m["human_ci_low"] <= m["human_agreement"] <= m["human_ci_high"] <= 1
    assert -0.5 <= m["position_bias"] <= 0.5
    sl = json.loads((run / "critique_revise" / "eval.json").read_text())
    assert sl["settings"]["constitution_hash"] == constitution.hash
    for stage in ("tox_before", "tox_sl_cai", "tox_rl_cai", "tox_rlhf"):
        assert 0 <= json.loads((run / stage / "eval.json").read_text())["metrics"]["toxicity"] <= 1
    report = (run / "report.md").read_text()
    for heading in ("## Constitutional AI", "### SL-CAI: critique → revision", "### RL-CAI: AI feedback",
                    "### CAI beside human-feedback RLHF"):
        assert heading in report
    beside = report.split("### CAI beside human-feedback RLHF")[1].split("\n## ")[0]
    rows = {line.split(" | ")[0].strip("| "): line for line in beside.splitlines() if line.startswith("| tox_")}
    assert list(rows) == ["tox_before", "tox_sl_cai", "tox_rl_cai", "tox_rlhf"]
    assert "the starting point" in rows["tox_before"] and "SL-CAI: SFT" in rows["tox_sl_cai"]
    assert "RL-CAI: PPO on AI labels, from `sl_cai`" in rows["tox_rl_cai"] and "cai_rm: " in rows["tox_rl_cai"]
    assert "RLHF: PPO on human labels, from `helpful`" in rows["tox_rlhf"] and "human_rm: " in rows["tox_rlhf"]
    assert constitution.hash in report and "Models this small write meaningless critiques" in report
    assert (run / "plots" / "ai_feedback_calibration.png").stat().st_size > 5000
    assert not any(t["prompt"].strip() in report for t in traces)  # red-team text stays in the files
