"""GSM8K solutions as PAL programs: the calculations become a data-flow chain, the gold line is never read, and
the programs reach the gold answer in the sandbox on real data."""

import json
import random
from pathlib import Path

import pytest

from lmcycle.apps.sandbox import SandboxConfig, check_program, run_solution
from lmcycle.errors import LmcycleError
from lmcycle.evals.gsm8k_programs import answer_matches, evaluate_gsm8k_programs, program_from_solution

GSM8K = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "gsm8k" / "test.first500.jsonl"
JANET = ("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\n"
         "She makes 9 * 2 = $<<9*2=18>>18 every day at the farmer’s market.\n#### 18")
CFG = SandboxConfig(timeout_s=5)


def _run(program: str):
    r = run_solution(program, CFG)
    assert r.ok, r.error
    return r.value


def test_annotations_become_a_chain_of_variables():
    program = program_from_solution(JANET)
    check_program(program)  # the programs pass the pre-filter like any model's program
    assert "v2 = v1*2" in program and "return v2" in program
    assert program.count(" = ") == 2  # the text around each annotation is not counted a second time
    assert "18" not in program and _run(program) == 18


def test_gold_line_is_never_read():
    wrong_gold = JANET.replace("#### 18", "#### 999")
    assert program_from_solution(wrong_gold) == program_from_solution(JANET)
    assert not answer_matches(_run(program_from_solution(wrong_gold)), "999")


def test_unannotated_equations_are_used_when_they_hold():
    text = ("The second pair costs 33 * 2 = $<<33*2=66>>66.\nTogether 66 + 33 = $<<66+33=99>>99.\n"
            "The boots cost 99 + 5 = $104.\n#### 104")
    program = program_from_solution(text)
    assert "v3 = v2 + 5" in program and _run(program) == 104


@pytest.mark.parametrize(("text", "expected"), [
    ("It is 12/20 x 100% = 60% of the students.", 60),
    ("They raise 200 minus 174 equals 26.", 26),
    ("So 7 puppies / 20 puppies * 100% = 35%", 35),
    ("Total: $12 000 + $20 000 = $32 000", 32000),
    ("So X = 200/20 = 10, done.", 10),
    ("Female: 9(2/3)=6 unicorns", 6),
])
def test_written_arithmetic_is_normalised(text, expected):
    assert answer_matches(_run(program_from_solution(text)), expected)


def test_prose_equations_that_do_not_hold_are_ignored():
    text = ("He has 10 + 2 = <<10+2=12>>12.\nSo 3 + 4 = 9 is wrong, a x = y is prose, x * x = 4 is not linear,\n"
            "and x = 18 alone is no calculation.\n")
    program = program_from_solution(text)
    assert program.count(" = ") == 1 and _run(program) == 12


def test_linear_equations_in_one_unknown_are_solved_by_the_program():
    text = ("She had 10 + 2 = <<10+2=12>>12 left.\nNow we know that 2/3 * x = 12, where x is what she started with.\n"
            "So x = 18\n#### 18")
    program = program_from_solution(text)
    assert "solve(lambda x: (2/3 * x) - (v1))" in program and "18" not in program
    assert answer_matches(_run(program), 18)
    units = program_from_solution("She eats 60g * 4/5 = 240g/5 = 48 grams.")
    assert "solve" not in units and _run(units) == 48  # letters after numbers are units when the sums hold


def test_no_calculation_is_an_error():
    with pytest.raises(LmcycleError, match="no calculation"):
        program_from_solution("Let x be the price. Then x is twenty.\n#### 20")


@pytest.mark.parametrize(("value", "gold", "ok"), [
    (1080.0, "1,080", True), ("$1,080", "1080", True), (18.0000001, "18", True), (18.1, "18", False),
    (0.25, "25", False), (True, "1", False), ("abc", "3", False), (None, "3", False),
    (18, "She makes 9 * 2 = 18.\n#### 18", True), (float("nan"), "3", False),
])
def test_answer_matches(value, gold, ok):
    assert answer_matches(value, gold) is ok


@pytest.mark.skipif(not GSM8K.is_file(), reason=f"GSM8K test split not found at {GSM8K}")
def test_real_solutions_reach_gold_in_the_sandbox():
    report = evaluate_gsm8k_programs(GSM8K, CFG, limit=12)
    assert report["n"] == 12 and report["accuracy"] >= 11 / 12
    assert report["correct"] == 12 - len(report["failures"])
    assert 0 < report["latency_p50_s"] <= report["latency_p95_s"]
    first = json.loads(GSM8K.read_text(encoding="utf-8").splitlines()[0])["answer"]
    assert _run(program_from_solution(first)) == int(first.split("####")[1])


def test_evaluate_reports_bad_records(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"answer": JANET}) + "\n" + json.dumps({"question": "no answer"}) + "\n")
    with pytest.raises(LmcycleError, match="answer") as e:
        evaluate_gsm8k_programs(bad, CFG)
    assert e.value.line == 2


def test_arbitrary_text_gives_a_program_or_lmcycle_error():
    rng = random.Random(0)
    made = 0
    for _ in range(300):
        text = "".join(rng.choice("0123456789+-*/=()xX. <>$%,\n") for _ in range(50))
        try:
            program = program_from_solution(text)
        except LmcycleError:
            continue
        check_program(program)
        made += 1
    assert made > 0
