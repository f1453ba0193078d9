"""The Constitutional AI paper's HHH comparisons as a harness benchmark: likelihood and letter scoring, the
position bias, the loader's errors, and the 438 shared items with a tiny real model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from scripted import ScriptedLLM
from tiny_lm import make_tokenizer, run_context, tiny_llama

from lmcycle.apps.harness import hhh_harness, hhh_letter, run_benchmark
from lmcycle.apps.llm import LocalLLM
from lmcycle.data.hhh import load_hhh
from lmcycle.errors import LmcycleError
from lmcycle.models.generate import DecodingConfig
from lmcycle.report import write_report
from lmcycle.stages import report_sections
from lmcycle.stages.harness import HarnessStage, run_harness

SHARED_HHH = Path(__file__).resolve().parents[3] / "shared" / "data" / "constitutional_ai" / "evals" / \
    "438HHHEvaluations.jsonl"
GOLDS = "BABB"


def _row(gold: str) -> dict:
    other = "A" if gold == "B" else "B"
    return {"prompt": "Which reply is kinder? Options:\n (A) [[[x]]]\n (B) [[[y]]]\n\nThe answer is:",
            "corrects": [f" ({gold})"], "incorrects": [f" ({other})"]}


def _write(tmp_path, rows: list, name: str = "hhh.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


class LetterJudge(ScriptedLLM):
    """Always prefers option ``favourite``: the higher log-prob for its answer string, and it as the reply."""

    def __init__(self, favourite: str | None):
        super().__init__(lambda prompt: f" ({favourite})" if favourite else " hmm")
        self.favourite, self.scored = favourite, []

    def continuation_logprobs(self, prompt: str, continuations: list[str]) -> list[float]:
        self.scored.append(continuations)
        return [-1.0 if self.favourite and f"({self.favourite})" in c else -3.0 for c in continuations]


@pytest.fixture
def items(tmp_path):
    # A blank line in the middle: ids stay the file's line numbers.
    return load_hhh(_write(tmp_path, [_row(GOLDS[0]), _row(GOLDS[1]), "", _row(GOLDS[2]), _row(GOLDS[3])]))


def test_likelihood_accuracy_and_position_bias_match_a_hand_count(items):
    assert [it["id"] for it in items] == [1, 2, 4, 5] and [it["gold"] for it in items] == list(GOLDS)
    for favourite, accuracy in (("A", 25.0), ("B", 75.0)):
        judge = LetterJudge(favourite)
        result = hhh_harness(judge, items, progress=False)
        assert result["hhh_accuracy"] == accuracy and result["n"] == 4
        assert result["picked_a"] == (1.0 if favourite == "A" else 0.0)
        assert result["settings"]["chance_accuracy"] == 50.0 and result["settings"]["gold_a"] == 0.25
        assert judge.scored[0] == [" (B)", " (A)"]  # the correct answer string first, as written in the file
        first = result["records"][0]
        assert list(first)[:4] == ["id", "pred", "gold", "correct"]
        assert first["pred"] == favourite and (first["logprob_correct"] > first["logprob_incorrect"]) == \
            (favourite == "B")
    tied = hhh_harness(LetterJudge(None), items, progress=False)  # equal log-probs pick neither: all wrong
    assert tied["hhh_accuracy"] == 0.0 and tied["ties"] == 4 and tied["picked_a"] == 0.0


def test_letter_method_parses_the_reply_and_counts_unparsable_as_wrong(items):
    assert hhh_letter(" (B)") == "B" and hhh_letter("A") == "A" and hhh_letter("I pick B.") == "B"
    assert hhh_letter("A better reply is (B)") == "B"  # a parenthesised letter beats an article
    assert hhh_letter(" Both are fine") is None and hhh_letter("(C)") is None
    llm = ScriptedLLM([" (B)", " A", " I pick B", " neither"])
    result = hhh_harness(llm, items, "letter", progress=False)
    assert [r["correct"] for r in result["records"]] == [True, True, True, False]
    assert result["hhh_accuracy"] == 75.0 and result["unparsed"] == 1 and result["picked_a"] == 0.25
    assert result["records"][3]["pred"] is None and result["records"][3]["logprob_correct"] is None
    assert llm.prompts[0].endswith("The answer is:")
    assert llm.configs[0].max_new_tokens == 8 and not llm.configs[0].do_sample  # a few greedy tokens
    with pytest.raises(LmcycleError, match="in-process model"):
        hhh_harness(ScriptedLLM([]), items, "likelihood")
    with pytest.raises(LmcycleError, match="hhh has no method 'cot'"):
        run_benchmark(llm, "hhh", "unused", "cot", llm.configs[0])


@pytest.mark.parametrize(("bad", "field"), [
    ({"corrects": [" (B)"], "incorrects": [" (A)"]}, "prompt"),
    ({"prompt": "Q", "corrects": " (B)", "incorrects": [" (A)"]}, "corrects"),
    ({"prompt": "Q", "corrects": [" (B)", " (A)"], "incorrects": [" (A)"]}, "corrects"),
    ({"prompt": "Q", "corrects": [" (B)"], "incorrects": [" yes"]}, "incorrects"),
    ({"prompt": "Q", "corrects": [" (B)"], "incorrects": [" (B)"]}, "incorrects"),
    ("{not json", None),
])
def test_a_malformed_row_names_file_line_and_field(tmp_path, bad, field):
    path = _write(tmp_path, [_row("A"), _row("B"), bad])
    with pytest.raises(LmcycleError) as caught:
        load_hhh(path)
    assert caught.value.file == str(path) and caught.value.line == 3 and caught.value.field == field
    assert f"{path}:3: " in str(caught.value)
    with pytest.raises(LmcycleError, match="missing: file not found"):
        load_hhh(tmp_path / "missing")


def test_hhh_stage_writes_picked_a_and_its_report_row(tmp_path):
    tok = make_tokenizer()
    ctx = run_context(tmp_path / "run", tiny_llama(tok), tok)
    folder = tmp_path / "cai" / "evals"
    folder.mkdir(parents=True)
    _write(folder, [_row(g) for g in GOLDS], name="438HHHEvaluations.jsonl")
    out = run_harness(HarnessStage(name="hhh", benchmark="hhh", method="likelihood", path=str(folder.parent)), ctx)
    ctx.add_artifacts("hhh", out)
    scored = json.loads(Path(out["eval"]).read_text())
    records = [json.loads(line) for line in Path(out["records"]).read_text().splitlines()]
    assert scored["metrics"]["n"] == 4 == len(records)
    assert scored["metrics"]["hhh_accuracy"] == 25 * sum(r["correct"] for r in records)
    assert scored["metrics"]["picked_a"] == sum(r["pred"] == "A" for r in records) / 4
    (ctx.run_dir / "config.yaml").write_text("stages:\n  - {type: harness, name: hhh}\n")
    section = write_report(ctx.run_dir, artifacts=ctx.artifacts, sections=report_sections()).read_text()
    section = section.split("## Applications", 1)[1]
    assert "| hhh | hhh | likelihood |" in section and "(chance 50.0%)" in section
    assert f"picked (A): {100 * scored['metrics']['picked_a']:.1f}% (gold (A): 25.0%)" in section


def test_the_438_shared_items_load_and_a_tiny_model_scores_eight(tiny_model_dir):
    if not SHARED_HHH.exists():
        pytest.skip(reason="the shared Constitutional AI data (../shared/data/constitutional_ai) is absent")
    items = load_hhh(SHARED_HHH)
    assert len(items) == 438 and [it["id"] for it in items] == list(range(1, 439))
    assert all({it["correct"], it["incorrect"]} == {" (A)", " (B)"} for it in items)
    result = run_benchmark(LocalLLM(tiny_model_dir), "hhh", SHARED_HHH.parents[1], "likelihood", DecodingConfig(), limit=8)
    assert result["n"] == 8 and [r["id"] for r in result["records"]] == list(range(1, 9))
    for r in result["records"]:
        assert math.isfinite(r["logprob_correct"]) and math.isfinite(r["logprob_incorrect"])
        assert r["correct"] == (r["logprob_correct"] > r["logprob_incorrect"])
    assert 0 <= result["picked_a"] <= 1 and result["settings"]["method"] == "likelihood"
