"""The retrieval and harness recipe stages: eval.json, records, and their section of the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_lm import make_tokenizer, run_context, tiny_llama

from lmcycle.errors import LmcycleError
from lmcycle.report import write_report
from lmcycle.stages import STAGES, report_sections
from lmcycle.stages.harness import HarnessStage, run_harness
from lmcycle.stages.retrieval import RetrievalStage, run_retrieval

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


@pytest.fixture
def ctx(tmp_path):
    tok = make_tokenizer()
    return run_context(tmp_path, tiny_llama(tok), tok)


def _gsm8k(tmp_path) -> Path:
    folder = tmp_path / "gsm8k"
    folder.mkdir()
    rows = [{"question": f"What is {a} plus {b}?", "answer": f"{a} + {b} = <<{a}+{b}={a + b}>>{a + b}\n#### {a + b}"}
            for a, b in ((2, 3), (4, 5), (10, 7))]
    (folder / "test.first500.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _truthfulqa(tmp_path) -> Path:
    items = [{"question": "Is water wet?", "mc1_targets": {"Yes": 1, "No": 0, "Never": 0}},
             {"question": "Can pigs fly?", "mc1_targets": {"No": 1, "Yes": 0}}]
    path = tmp_path / "mc_task.json"
    path.write_text(json.dumps(items))
    return path


def test_harness_stages_write_scores_records_and_report(ctx, tmp_path):
    cfg = HarnessStage(benchmark="gsm8k", method="pal", path=str(_gsm8k(tmp_path)),
                       decoding={"max_new_tokens": 8})
    out = run_harness(cfg, ctx)
    ctx.add_artifacts("harness", out)
    scored = json.loads(Path(out["eval"]).read_text())
    records = [json.loads(line) for line in Path(out["records"]).read_text().splitlines()]
    assert scored["metrics"]["n"] == 3 == len(records)
    assert scored["metrics"]["gsm8k_accuracy"] == 100 * sum(r["correct"] for r in records) / 3
    assert scored["settings"]["method"] == "pal" and scored["settings"]["shots"] == 3
    tqa = run_harness(HarnessStage(name="tqa", benchmark="truthfulqa", method="likelihood",
                                   path=str(_truthfulqa(tmp_path))), ctx)
    ctx.add_artifacts("tqa", tqa)
    (ctx.run_dir / "config.yaml").write_text(
        "stages:\n  - {type: harness, name: harness}\n  - {type: harness, name: tqa}\n")
    report = write_report(ctx.run_dir, artifacts=ctx.artifacts, sections=report_sections()).read_text()
    section = report.split("## Applications", 1)[1]
    assert "| harness | gsm8k | pal |" in section and "| tqa | truthfulqa | likelihood |" in section
    assert "chance 41.7%" in section  # (1/3 + 1/2) / 2
    assert "## Evaluation" not in report  # not rows among the generation evals
    with pytest.raises(LmcycleError, match="gsm8k has no method 'letter'"):
        run_harness(HarnessStage(benchmark="gsm8k", method="letter", path="x"), ctx)


def test_retrieval_stage_on_a_slice_of_xquad(ctx):
    if not (SHARED / "xquad_en").exists():
        pytest.skip(reason="the shared XQuAD data (../shared/data/xquad_en) is absent")
    out = run_retrieval(RetrievalStage(path=str(SHARED / "xquad_en"), articles=2), ctx)
    ctx.add_artifacts("retrieval", out)
    m = json.loads(Path(out["eval"]).read_text())["metrics"]
    for mode in ("bm25", "dense", "hybrid"):
        assert 0 < m[f"{mode}.recall@1"] <= m[f"{mode}.recall@5"] <= m[f"{mode}.recall@10"] <= 1
    (ctx.run_dir / "config.yaml").write_text("stages:\n  - {type: retrieval}\n")
    report = write_report(ctx.run_dir, artifacts=ctx.artifacts, sections=report_sections()).read_text()
    assert f"| hybrid | {m['hybrid.recall@1']:.3f} |" in report
    assert (ctx.run_dir / "plots" / "retrieval_retrieval.png").stat().st_size > 1000


def test_stages_are_registered():
    assert STAGES["retrieval"].config_class is RetrievalStage and STAGES["harness"].config_class is HarnessStage
