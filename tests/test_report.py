"""report.md from a hand-made run directory: eval table rows = eval.json values, plots are real PNGs."""

import json
import re
import shutil

import yaml

from lmcycle.report import write_report
from lmcycle.stages import KINDS, PAGE_ORDER, report_sections
from lmcycle.stages.context import RunContext
from lmcycle.stages.report import ReportStage, run_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EVALS = {
    "zero_shot": {"rouge1": 12.3456, "rouge2": 1.5, "rougeL": 10.25, "rougeLsum": 11.0, "bleu": 0.75,
                  "perplexity": 123.456, "n": 5},
    "sft_greedy": {"rouge1": 38.0, "rouge2": 14.125, "rougeL": 30.5, "rougeLsum": 33.333, "bleu": 9.87,
                   "perplexity": 12.5, "n": 5},
    "extractive_baseline": {"rouge1": 25.0, "rouge2": 7.0, "rougeL": 20.0, "rougeLsum": 22.0, "bleu": 4.0, "n": 5},
}
SETTINGS = {
    "zero_shot": {"model": "runs/x/pretrain/model", "shots": 0, "decoding": {"do_sample": False, "max_new_tokens": 64}},
    "sft_greedy": {"model": "runs/x/sft/model", "shots": 0, "decoding": {"do_sample": False, "max_new_tokens": 32}},
    "extractive_baseline": {"model": None, "baseline": "extractive", "shots": None, "decoding": None},
}


def _make_run(run_dir, relative_to_cwd: bool = False):
    """A run directory as the runner leaves it: config, metrics, artifacts, stage outputs."""
    (run_dir / "pretrain").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"name": "demo", "description": "a test run", "seed": 3}))
    rows = [{"stage": "pretrain", "time": 1000.0 + s, "step": s, "loss": 5.0 - 0.1 * s, "lr": 1e-3}
            for s in range(1, 11)]
    rows += [{"stage": "pretrain", "time": 1011.0, "step": 5, "eval_loss": 4.8},
             {"stage": "pretrain", "time": 1012.0, "step": 10, "eval_loss": 4.2},
             {"stage": "pretrain", "time": 1012.5, "event": "stage_end", "type": "pretrain", "seconds": 12.5},
             {"stage": "explore", "time": 1013.0, "event": "stage_end", "type": "explore", "seconds": 0.4}]
    artifacts = {"pretrain": {"model": str(run_dir / "pretrain" / "model")}}
    # An explore stage's plot: any PNG will do.
    (run_dir / "explore").mkdir()
    (run_dir / "explore" / "next_token.png").write_bytes(PNG_MAGIC + b"not really a png body")
    artifacts["explore"] = {"plot": str(run_dir / "explore" / "next_token.png"), "explore": "explore/x.json"}
    for stage, metrics in EVALS.items():
        d = run_dir / stage
        d.mkdir()
        settings = {**SETTINGS[stage], "rouge": {"package": "rouge-score 0.1.2", "stemmer": "Porter"},
                    "bleu": {"signature": f"nrefs:var|tok:13a|{stage}", "multi_ref": "streams"}}
        (d / "eval.json").write_text(json.dumps({"metrics": metrics, "settings": settings}))
        preds = [{"id": f"{stage}-{i}", "prompt": "p", "prediction": f"prediction {i} of {stage} " + "x" * 400,
                  "references": [f"reference {i}"], "rougeL": 1.0} for i in range(5)]
        (d / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
        base = (run_dir.name + "/" + stage) if relative_to_cwd else str(d)
        artifacts[stage] = {"eval": f"{base}/eval.json", "predictions": f"{base}/predictions.jsonl"}
        rows.append({"stage": stage, "time": 1014.0, "kind": "eval", **metrics})
        rows.append({"stage": stage, "time": 1015.0, "event": "stage_end", "type": "eval", "seconds": 75.0})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "artifacts.json").write_text(json.dumps(artifacts))
    (run_dir / "DONE").write_text("now\n")


def _table_rows(text: str) -> dict[str, list[str]]:
    section = text.split("## Evaluation", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] in EVALS:
            rows[cells[0]] = cells
    return rows


def test_report_table_has_every_eval_stage_with_its_values(tmp_path):
    run = tmp_path / "run"
    _make_run(run)
    path = write_report(run, sections=report_sections())
    text = path.read_text(encoding="utf-8")
    assert path == run / "report.md" and text.startswith("# lmcycle run: demo")

    rows = _table_rows(text)
    assert list(rows) == list(EVALS)  # stage order, side by side
    header = [c.strip() for c in re.search(r"\| Stage \| Scored \|.*\|", text).group(0).strip("|").split("|")]
    for stage, metrics in EVALS.items():
        cells = dict(zip(header, rows[stage], strict=True))
        for key, label in [("rouge1", "ROUGE-1"), ("rouge2", "ROUGE-2"), ("rougeL", "ROUGE-L"),
                           ("rougeLsum", "ROUGE-Lsum"), ("bleu", "BLEU"), ("perplexity", "Perplexity")]:
            expected = f"{metrics[key]:.2f}" if key in metrics else "—"
            assert cells[label] == expected, (stage, label)
        assert cells["n"] == "5" and cells["Shots"] == ("—" if stage == "extractive_baseline" else "0")
    assert "baseline: extractive" in rows["extractive_baseline"][1]

    # Plots: the bar chart and one loss-curve figure, real PNG files, linked relative to the run directory.
    for rel in ("plots/eval_scores.png", "plots/loss_pretrain.png"):
        assert f"]({rel})" in text
        data = (run / rel).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000
    assert "](explore/next_token.png)" in text

    # Settings travel with the numbers; wall time per stage; first examples, truncated.
    for stage in EVALS:
        assert f"nrefs:var\\|tok:13a\\|{stage}" in text or f"`nrefs:var|tok:13a|{stage}`" in text
        assert f"prediction 0 of {stage}" in text and f"prediction 2 of {stage}" in text
        assert f"prediction 3 of {stage}" not in text
    assert "x" * 400 not in text and "…" in text
    assert "12.5 s" in text and "1m 15s" in text
    assert "last eval loss 4.2000 at step 10" in text
    # Identical ROUGE options are written out once, then referred to.
    assert text.count("package: rouge-score 0.1.2") == 1 and text.count("ROUGE: same options as zero_shot") == 2


def test_report_is_rebuilt_from_a_moved_run_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _make_run(tmp_path / "run", relative_to_cwd=True)  # paths like "run/zero_shot/eval.json"
    moved = tmp_path / "elsewhere" / "run-copy"
    shutil.copytree(tmp_path / "run", moved)
    shutil.rmtree(tmp_path / "run")
    text = write_report(moved, title="Moved", sections=report_sections()).read_text(encoding="utf-8")
    assert text.startswith("# Moved")
    assert list(_table_rows(text)) == list(EVALS)
    assert "eval.json missing" not in text


def test_missing_eval_json_is_reported_not_fatal(tmp_path):
    run = tmp_path / "run"
    _make_run(run)
    (run / "sft_greedy" / "eval.json").unlink()
    text = write_report(run, sections=report_sections()).read_text(encoding="utf-8")
    assert "| sft_greedy | eval.json missing |" in text
    rows = _table_rows(text)
    assert list(rows) == list(EVALS) and not any(re.fullmatch(r"[\d.]+", c) for c in rows["sft_greedy"][1:])
    assert "10.25" in rows["zero_shot"] and "prediction 0 of sft_greedy" not in text


def test_report_stage_uses_the_in_memory_artifacts(tmp_path):
    run = tmp_path / "run"
    _make_run(run)
    artifacts = json.loads((run / "artifacts.json").read_text())
    (run / "artifacts.json").unlink()
    ctx = RunContext(run_dir=run, artifacts=artifacts)
    produced = run_report(ReportStage(title="From the stage"), ctx)
    text = open(produced["report"], encoding="utf-8").read()
    assert text.startswith("# From the stage") and list(_table_rows(text)) == list(EVALS)


def test_empty_run_directory_gives_a_minimal_report(tmp_path):
    text = write_report(tmp_path, sections=report_sections()).read_text(encoding="utf-8")
    assert text.startswith("# lmcycle run:") and "## Evaluation" not in text


def test_steps_an_older_resumed_run_logged_twice_count_once_with_the_rerun_loss(tmp_path):
    run_dir = tmp_path / "run"
    rows = [{"stage": "sft", "step": s, "loss": 3.0 - 0.1 * s} for s in (1, 2, 3, 4)]
    rows += [{"stage": "sft", "step": s, "loss": 2.0 - 0.1 * s} for s in (3, 4, 5, 6)]  # resumed from step 2
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = write_report(run_dir, sections=report_sections()).read_text()
    assert "6 logged steps, last train loss 1.4000 at step 6" in text


def test_a_train_start_row_drops_the_rows_an_interrupted_attempt_logged_after_the_checkpoint(tmp_path):
    ctx = RunContext(run_dir=tmp_path / "run")
    for s in (1, 2, 3):
        ctx.log("sft", step=s, loss=1.0)
    ctx.log("other", step=9, loss=1.0)  # another stage's rows stay
    ctx.log("sft", event="train_start", step=2)
    assert [(r["stage"], r.get("step")) for r in ctx.read_metrics()] == [
        ("sft", 1), ("sft", 2), ("other", 9), ("sft", 2)]


def test_score_signatures_are_printed_under_settings_and_change_nothing_when_absent(tmp_path):
    run = tmp_path / "run"
    _make_run(run)
    before = write_report(run, sections=report_sections()).read_text(encoding="utf-8")
    eval_path = run / "zero_shot" / "eval.json"
    data = json.loads(eval_path.read_text())
    data["settings"]["rouge"]["signature"] = "rouge|agg:max|refs:1|stem:porter|v:0.1.2"
    data["settings"]["perplexity"] = {"signature": "ppl|ref:first|v:1", "keys": {"ref": "first", "v": "1"},
                                      "tokens": "reference"}
    data["settings"]["toxicity"] = {"signature": "tox|clf:roberta|v:2"}
    eval_path.write_text(json.dumps(data))
    text = write_report(run, sections=report_sections()).read_text(encoding="utf-8")
    settings = text.split("## Settings", 1)[1].split("### sft_greedy", 1)[0]
    assert "- ROUGE: signature `rouge|agg:max|refs:1|stem:porter|v:0.1.2`; package: rouge-score 0.1.2" in settings
    assert "- Perplexity: signature `ppl|ref:first|v:1`; tokens: reference" in settings  # "keys" only in eval.json
    assert "- toxicity: signature `tox|clf:roberta|v:2`" in settings
    # The other stages' options differ from zero_shot's now (its signature), so they are written out again.
    assert text.count("package: rouge-score 0.1.2") == 2
    assert before.split("## Settings", 1)[0] == text.split("## Settings", 1)[0]


def test_every_kind_with_a_section_is_on_the_page_once():
    """The registry's page order names every kind that has a report section, and each resolves to a function."""
    named = [n for entry in PAGE_ORDER for n in (entry[1:] if isinstance(entry, tuple) else (entry,))]
    with_section = {k.name for k in KINDS if k.section is not None}
    assert with_section <= {n.partition(".")[0] for n in named}
    kinds_named = [n for n in named if n in with_section]
    assert len(kinds_named) == len(set(kinds_named))
    assert all(callable(part) for part in report_sections())
