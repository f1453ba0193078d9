"""Harnesses: GSM8K (direct, CoT, self-consistency, PAL) and TruthfulQA MC1 scored for any backend."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lmcycle.apps.harness import first_letter, gsm8k_harness, load_truthfulqa_mc, truthfulqa_mc1
from lmcycle.apps.llm import LocalLLM
from lmcycle.data.examples import Example
from lmcycle.errors import LmcycleError
from lmcycle.models.generate import DecodingConfig

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
PROBLEMS = [Example("What is 2 plus 3?", ["2 + 3 = 5\n#### 5"], id="a"),
            Example("What is 4 times 6?", ["4 * 6 = 24\n#### 24"], id="b")]


def test_cot_scores_extracted_answers(scripted):
    llm = scripted(["2 + 3 = 5. The answer is 5.", "4 * 6 = 25. The answer is 25."])
    result = gsm8k_harness(llm, PROBLEMS, "cot", progress=False)
    assert result["gsm8k_accuracy"] == 50.0 and result["n"] == 2
    assert [r["correct"] for r in result["records"]] == [True, False]
    assert result["settings"]["method"] == "cot" and result["settings"]["shots"] == 4
    assert llm.prompts[0].endswith("Q: What is 2 plus 3?\nA:")


def test_direct_pal_and_self_consistency(scripted):
    direct = scripted([" 5.", " 24"])
    assert gsm8k_harness(direct, PROBLEMS, "direct", progress=False)["gsm8k_accuracy"] == 100.0
    assert direct.prompts[0].endswith("A: The answer is")
    pal = scripted(["def solution():\n    return 2 + 3\n", "def solution():\n    return 4 * 5\n"])
    result = gsm8k_harness(pal, PROBLEMS, "pal", progress=False)
    assert [r["correct"] for r in result["records"]] == [True, False]
    votes = scripted(["The answer is 5."] * 2 + ["The answer is 4."] + ["The answer is 24."] * 3)
    result = gsm8k_harness(votes, PROBLEMS, "self_consistency", n=3, progress=False,
                           cfg=DecodingConfig(do_sample=True, temperature=0.7))
    assert result["gsm8k_accuracy"] == 100.0 and result["records"][0]["votes"] == {"5": 2, "4": 1}
    with pytest.raises(LmcycleError, match="unknown GSM8K method"):
        gsm8k_harness(votes, PROBLEMS, "magic")


ITEMS = [{"question": "Is the sky green?", "options": ["No", "Yes", "Sometimes"], "correct": "No"},
         {"question": "Do fish fly?", "options": ["Mostly not", "Always", "Never swim"], "correct": "Mostly not"}]


def test_truthfulqa_letter_mode_shuffles_and_reads_the_letter(scripted):
    def oracle(prompt: str) -> str:  # picks the true option's letter from the shown list
        letters = dict(re.findall(r"^([A-P])\. (.+)$", prompt, re.MULTILINE))
        truth = next(it["correct"] for it in ITEMS if it["question"] in prompt)
        return f" ({next(k for k, v in letters.items() if v == truth)})"

    result = truthfulqa_mc1(scripted(oracle), ITEMS, progress=False)
    assert result["truthfulqa_mc1"] == 100.0
    assert result["settings"]["chance_accuracy"] == pytest.approx(33.33, abs=0.01)
    always_a = truthfulqa_mc1(scripted(lambda p: "A"), ITEMS * 10, progress=False, seed=1)
    assert always_a["truthfulqa_mc1"] < 100.0  # the true option is not always shown first
    assert first_letter("I think (B) is right", 3) == 1 and first_letter("none", 3) is None


def test_truthfulqa_likelihood_mode_needs_and_uses_an_in_process_model(scripted, tiny_model_dir):
    with pytest.raises(LmcycleError, match="in-process model"):
        truthfulqa_mc1(scripted(["A"]), ITEMS, "likelihood")
    llm = LocalLLM(tiny_model_dir)
    result = truthfulqa_mc1(llm, ITEMS, "likelihood", progress=False)
    for item, record in zip(ITEMS, result["records"], strict=True):
        scores = llm.continuation_logprobs(f"Q: {item['question']}\nA:", [f" {o}" for o in item["options"]])
        assert record["prediction"] == item["options"][max(range(3), key=scores.__getitem__)]


def test_truthfulqa_loader_on_the_shared_data():
    path = SHARED / "truthfulqa" / "mc_task.json"
    if not path.exists():
        pytest.skip(reason="the shared TruthfulQA data (../shared/data/truthfulqa) is absent")
    items = load_truthfulqa_mc(path.parent)
    assert len(items) == 790 and all(it["correct"] == it["options"][0] for it in items)


def test_truthfulqa_loader_names_the_bad_item(tmp_path):
    bad = tmp_path / "mc.json"
    bad.write_text(json.dumps([{"question": "q", "mc1_targets": {"a": 1, "b": 1}}]))
    with pytest.raises(LmcycleError, match="item 0 has no mc1_targets with exactly one true option"):
        load_truthfulqa_mc(bad)
