"""report.md's alignment sections: the PPO rollout table, alarms, curves; toxicity evals never show their texts."""

from __future__ import annotations

import json

import yaml

from lmcycle.report import write_report
from lmcycle.stages import report_sections

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _rollout(i: int) -> dict:
    return {"stage": "ppo", "event": "rollout", "step": 4 * i, "rollout": i, "score": 0.1 * i, "judge": 0.5,
            "kl": 0.01 * i, "kl_k3": 0.008 * i, "beta": 0.05, "response_len": 12.0 - i, "distinct_2": 0.9,
            "repetition": 0.0, "entropy": 3.0, "alarms": int(i >= 10)}


def _make_run(run_dir) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"name": "detox", "stages": [
        {"type": "ppo", "name": "ppo"}, {"type": "eval", "name": "after"}]}))
    rows = [{"stage": "ppo", "event": "ppo_setup", "prompts": 64, "reference": "adapter disabled",
             "reward": {"kind": "classifier", "path": "toxicity", "label": "not_toxic"}, "judge": None}]
    rows += [_rollout(i) for i in range(12)]
    rows.append({**_rollout(11), "score": 9.5})  # rollout 11 again after a resume: the last row wins
    rows += [{"stage": "ppo", "event": "alarm", "rollout": 10, "alarm": "length", "message": "length moved -83%"},
             {"stage": "ppo", "event": "alarm", "rollout": 11, "alarm": "length", "message": "length moved -92%"},
             {"stage": "ppo", "event": "early_stop", "rollout": 11, "reason": "length moved -92%"}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "after").mkdir()
    (run_dir / "after" / "eval.json").write_text(json.dumps({
        "metrics": {"toxicity": 0.125, "toxic_fraction": 0.05, "reference_perplexity": 31.5, "n": 2},
        "settings": {"model": "ppo/model", "shots": 0}}))
    (run_dir / "after" / "predictions.jsonl").write_text(
        json.dumps({"id": "a", "prediction": "SECRET-COMPLETION", "references": ["offensive"]}) + "\n")
    (run_dir / "artifacts.json").write_text(json.dumps({"ppo": {"model": str(run_dir / "ppo" / "model")},
                                                        "after": {"eval": str(run_dir / "after" / "eval.json")}}))


def test_ppo_section_tables_the_rollouts_and_reports_alarms_and_the_early_stop(tmp_path):
    run = tmp_path / "run"
    _make_run(run)
    text = write_report(run, sections=report_sections()).read_text()
    section = text[text.index("## PPO: ppo"):]
    assert "reference: adapter disabled" in section and "classifier toxicity (not_toxic)" in section
    table = [line for line in section.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [int(line.split("|")[1]) for line in table][0] == 0 and len(table) == 8  # first, last, spread
    assert table[-1].split("|")[2].strip() == "9.500"  # the resumed rollout's last row
    assert "length × 2" in section and "**Stopped early** at rollout 11" in section
    assert (run / "plots" / "ppo_ppo.png").read_bytes().startswith(PNG_MAGIC)


def test_toxicity_evals_show_scores_but_never_the_completions(tmp_path):
    run = tmp_path / "run"
    _make_run(run)
    text = write_report(run, sections=report_sections()).read_text()
    header = next(line for line in text.splitlines() if line.startswith("| Stage | Scored"))
    assert "Toxicity" in header and "Toxic share" in header and "Ref. perplexity" in header
    row = next(line for line in text.splitlines() if line.startswith("| after |"))
    assert "0.125" in row and "31.50" in row
    assert "SECRET-COMPLETION" not in text and "predictions.jsonl" in text
