"""report.md's optimization section: the compare table with its ratios and settings, and its plot."""

from __future__ import annotations

import json

import yaml

from lmcycle.optimize.compare import with_ratios
from lmcycle.report import write_report
from lmcycle.stages import report_sections

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _row(label: str, f1: float, size: int, p50: float, throughput: float, zeros: int | None = 0) -> dict:
    return {"label": label, "model": f"{label}/model", "kind": "classifier", "params": 22_000_000,
            "zero_params": zeros, "size_bytes": size, "peak_memory_mb": 100.0, "latency_p50_ms": p50,
            "latency_p95_ms": p50 * 1.5, "throughput": throughput, "batch_size": 32,
            "quality": {"davidson_test.macro_f1": f1, "davidson_test.accuracy": 90.0}}


def test_compare_table_shows_every_variant_with_ratios_and_settings(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "compare").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"name": "compress", "stages": [{"type": "compare"}]}))
    (run_dir / "metrics.jsonl").write_text("")
    rows = with_ratios([_row("teacher", 88.6, 90_000_000, 5.0, 600.0),
                        _row("int8", 88.1, 23_000_000, 2.5, 1500.0, zeros=None),
                        _row("pruned", 80.0, 90_000_000, 5.0, 600.0, zeros=11_000_000)])
    settings = {"threads": 2, "torch": "2.13.0", "compile": False, "latency": "batch 1, 100 timed"}
    (run_dir / "compare" / "compare.json").write_text(json.dumps({"rows": rows, "settings": settings}))
    (run_dir / "artifacts.json").write_text(json.dumps({"compare": {"compare": str(run_dir / "compare" /
                                                                                  "compare.json")}}))
    text = write_report(run_dir, sections=report_sections()).read_text()
    section = text[text.index("## Optimization"):]
    table = [line for line in section.splitlines() if line.startswith("| ")]
    assert "davidson_test.macro_f1" in table[0]
    assert "accuracy" not in table[0]  # one quality column per dataset: the headline metric
    teacher, int8, pruned = table[1:]
    assert "88.60" in teacher and "1.00×" in teacher
    assert "88.10" in int8 and "0.26×" in int8 and "2.00×" in int8 and "2.50×" in int8
    assert "50.0%" in pruned  # 11M of 22M parameters are zero
    assert "2 thread(s)" in section and "eager" in section
    assert (run_dir / "plots" / "compare_compare.png").read_bytes().startswith(PNG_MAGIC)


def test_distill_prune_and_quantize_stages_get_their_tables_not_eval_rows(tmp_path):
    run_dir = tmp_path / "run"
    stages = [{"type": "distill", "name": "student"}, {"type": "prune", "name": "wanda"},
              {"type": "quantize", "name": "int8"}]
    (run_dir / "student").mkdir(parents=True)
    (run_dir / "wanda").mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"name": "opt", "stages": stages}))
    rows = [{"stage": "wanda", "event": "prune", "sparsity": 0.5, "model_sparsity": 0.44, "params": 11_000_000},
            {"stage": "int8", "event": "quantize", "method": "int8_dynamic", "size_mb_before": 90.9,
             "size_mb_after": 23.7, "n_linear_quantized": 38, "n_embeddings_quantized": 3}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "student" / "eval.json").write_text(json.dumps({
        "metrics": {"test.macro_f1": 86.0, "teacher.test.macro_f1": 88.0, "student_params": 10_900_000,
                    "teacher_params": 22_700_000},
        "settings": {"student_layers": [0, 2, 4]}}))
    (run_dir / "wanda" / "eval.json").write_text(json.dumps({
        "perplexity": {"before": {"test": 50.93}, "after_prune": {"test": 50.98}, "after_heal": {"test": 48.2}},
        "settings": {"method": "wanda"}}))
    (run_dir / "artifacts.json").write_text(json.dumps({
        "student": {"eval": str(run_dir / "student" / "eval.json")},
        "wanda": {"eval": str(run_dir / "wanda" / "eval.json")}, "int8": {"model": "int8/model"}}))
    text = write_report(run_dir, sections=report_sections()).read_text()
    assert "## Evaluation" not in text  # their eval.json files are not generation evals
    section = text[text.index("## Optimization"):]
    student = next(line for line in section.splitlines() if line.startswith("| student"))
    assert "88.00 → 86.00 (97.7%)" in student and "(48.0%)" in student and "\\[0, 2, 4\\]" in student
    wanda = next(line for line in section.splitlines() if line.startswith("| wanda"))
    assert "50.0%" in wanda and "44.0%" in wanda and "| 50.93 | 50.98 | 48.20 |" in wanda
    int8 = next(line for line in section.splitlines() if line.startswith("| int8"))
    assert "| 90.9 | 23.7 | 38 | 3 |" in int8


def _prune_run(tmp_path, perplexity: dict | None) -> str:
    run_dir = tmp_path / "run"
    (run_dir / "wanda").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"name": "p", "stages": [{"type": "prune", "name": "wanda"}]}))
    (run_dir / "metrics.jsonl").write_text(json.dumps({"stage": "wanda", "event": "prune", "sparsity": 0.5,
                                                       "model_sparsity": 0.44, "params": 11_000_000}) + "\n")
    (run_dir / "wanda" / "eval.json").write_text(json.dumps({"perplexity": perplexity, "settings": {"method": "wanda"}}))
    (run_dir / "artifacts.json").write_text(json.dumps({"wanda": {"eval": str(run_dir / "wanda" / "eval.json")}}))
    text = write_report(run_dir, sections=report_sections()).read_text()
    return text[text.index("### Pruning"):].split("\n\n##")[0]


def test_the_pruning_table_shows_only_the_perplexities_measured(tmp_path):
    unhealed = _prune_run(tmp_path / "a", {"before": {"test": 50.93}, "after_prune": {"test": 50.98},
                                           "after_heal": None})
    assert "| Data | Before | Pruned |" in unhealed and "Healed" not in unhealed and "healing" not in unhealed
    assert "| wanda | wanda | 50.0% | 44.0% | 11.00M | test | 50.93 | 50.98 |" in unhealed
    unmeasured = _prune_run(tmp_path / "b", None)
    assert "Before" not in unmeasured and "Perplexity" not in unmeasured and "—" not in unmeasured
    assert "| wanda | wanda | 50.0% | 44.0% | 11.00M |" in unmeasured


def test_an_eagerly_timed_quantized_model_that_is_slower_says_why(tmp_path):
    def run(compiled: bool) -> str:
        run_dir = tmp_path / str(compiled)
        for label in ("fp32", "int8"):
            (run_dir / label / "model").mkdir(parents=True)
        (run_dir / "int8" / "model" / "quantization.json").write_text("{}")
        (run_dir / "compare").mkdir()
        (run_dir / "config.yaml").write_text(yaml.safe_dump({"name": "q", "stages": [{"type": "compare"}]}))
        (run_dir / "metrics.jsonl").write_text("")
        rows = with_ratios([_row("fp32", 88.6, 90_000_000, 2.0, 600.0), _row("int8", 88.1, 23_000_000, 8.0, 500.0)])
        settings = {"threads": 2, "torch": "2.13.0", "compile": compiled}
        (run_dir / "compare" / "compare.json").write_text(json.dumps({"rows": rows, "settings": settings}))
        (run_dir / "artifacts.json").write_text(json.dumps({"compare": {"compare": str(run_dir / "compare" /
                                                                                      "compare.json")}}))
        return write_report(run_dir, sections=report_sections()).read_text()

    eager = run(False)
    assert "Quantized and slower at batch 1: int8 (0.25×)" in eager and "`compile: true`" in eager
    assert "Quantized and slower" not in run(True)  # compiled timings are what a deployment runs: no excuse
