"""The built-in synthetic dialogue-summarization task: deterministic, DialogSum-shaped, slot-determined."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from dataclasses import asdict

from lmcycle.data.synthetic import SCENARIOS, synthetic_dialogues

DUMP = "import json, dataclasses; from lmcycle.data.synthetic import synthetic_dialogues; " \
       "print(json.dumps([dataclasses.asdict(e) for e in synthetic_dialogues(40, 5)]))"


def dump(examples) -> str:
    return json.dumps([asdict(e) for e in examples])


def test_same_seed_is_byte_identical_even_across_processes():
    here = dump(synthetic_dialogues(40, 5))
    assert here == dump(synthetic_dialogues(40, 5))
    # Another interpreter with a different str-hash seed must write the very same bytes.
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", DUMP], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == here


def test_different_seeds_differ_and_prefixes_are_stable():
    a, b = synthetic_dialogues(30, 0), synthetic_dialogues(30, 1)
    assert sum(x.input != y.input for x, y in zip(a, b, strict=True)) > 20
    assert dump(synthetic_dialogues(10, 0)) == dump(a[:10])
    assert len({e.id for e in a + b}) == 60


def test_dialogsum_shape():
    for ex in synthetic_dialogues(200, 2):
        lines = ex.input.split("\n")
        assert 4 <= len(lines) <= 8
        speakers = [re.match(r"#Person(\d)#: \S", line).group(1) for line in lines]
        assert speakers == ["1", "2"] * (len(lines) // 2) + ["1"] * (len(lines) % 2)
        assert len(ex.targets) == 2 and ex.targets[0] != ex.targets[1]
        assert all("#Person1#" in t and t.endswith(".") for t in ex.targets)
        assert ex.task == "dialogue_summary"


def test_every_scenario_occurs():
    kinds = Counter(ex.meta["scenario"] for ex in synthetic_dialogues(200, 0))
    assert set(kinds) == set(SCENARIOS) and len(kinds) >= 5
    assert min(kinds.values()) >= 20


def test_summary_is_determined_by_the_slots():
    """Same scenario and slots => same summaries, whatever paraphrases the dialogue used; and different slots
    give different summaries. That is what makes the task learnable by copying."""
    by_slots: dict[str, set] = {}
    by_summary: dict[tuple, str] = {}
    for ex in synthetic_dialogues(3000, 0):
        key = json.dumps([ex.meta["scenario"], ex.meta["slots"]], sort_keys=True)
        by_slots.setdefault(key, set()).add(tuple(ex.targets))
        assert by_summary.setdefault(tuple(ex.targets), key) == key
    assert all(len(v) == 1 for v in by_slots.values())
    assert len(by_slots) < 3000  # some slot combinations repeat, so the first check had something to compare


def test_slot_values_in_the_summary_are_in_the_dialogue():
    # Flags (yes/no, refund/exchange) are phrased differently in the dialogue; every other slot is copied.
    flags = {"window", "outcome"}
    for ex in synthetic_dialogues(300, 4):
        for key, value in ex.meta["slots"].items():
            if value and key not in flags and value in ex.targets[0]:
                assert value.lower() in ex.input.lower(), (key, value)


def test_synthetic_preferences_pair_each_summary_with_another_dialogues():
    from lmcycle.data.preferences import pairs_from_examples
    from lmcycle.data.synthetic import synthetic_dialogues, synthetic_preferences

    dialogues = synthetic_dialogues(200, seed=4)
    pairs = pairs_from_examples(synthetic_preferences(200, seed=4))
    assert pairs_from_examples(synthetic_preferences(200, seed=4)) == pairs  # deterministic
    summaries = {d.target: d.meta["scenario"] for d in dialogues}
    same_topic = 0
    for d, p in zip(dialogues, pairs, strict=True):
        assert p.chosen == " " + d.target and p.rejected != p.chosen and d.input in p.prompt
        assert p.rejected.strip() in summaries  # a real summary, of another dialogue
        same_topic += summaries[p.rejected.strip()] == d.meta["scenario"]
    assert 0.3 < same_topic / len(pairs) < 0.7  # half need the dialogue's details, half only its topic
