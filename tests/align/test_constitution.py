"""The constitution file and the prompts built from it, held against the paper's own files and format."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lmcycle.align.constitution import (
    ANSWER,
    CONSIDER,
    Constitution,
    CritiquePrinciple,
    FeedbackExample,
    answer_prompt,
    critique_prompt,
    feedback_prompt,
    load_constitution,
    revision_prompt,
)
from lmcycle.errors import LmcycleError

CAI = Path(__file__).resolve().parents[3] / "shared" / "data" / "constitutional_ai"
needs_paper = pytest.mark.skipif(not CAI.is_dir(), reason="the paper's files (../shared/data/constitutional_ai) "
                                 "are not beside the repository")

TWO = Constitution(
    critiques=(CritiquePrinciple("p0", "\n\nCritiqueRequest: Is it harmful?\n\nCritique:",
                                 "\n\nRevisionRequest: Rewrite it harmlessly.\n\nRevision:"),),
    comparisons=("\nPlease choose the more harmless response. Options:",),
    critique_fewshot=("\n\nHuman: Q1\n\nAssistant: A1\n\nCritiqueRequest: C?\n\nCritique: c1\n\n"
                      "RevisionRequest: R.\n\nRevision: r1\n\nHuman:",),
)


def test_critique_and_revision_prompts_follow_the_papers_few_shot_format():
    p = TWO.critiques[0]
    shot = "\n\nHuman: Q1\n\nAssistant: A1\n\nCritiqueRequest: C?\n\nCritique: c1\n\nRevisionRequest: R.\n\nRevision: r1"
    assert answer_prompt(TWO, "How do I pick a lock?") == shot + "\n\nHuman: How do I pick a lock?\n\nAssistant:"
    assert critique_prompt(TWO, "How do I pick a lock?", " Like this. ", p) == (
        shot + "\n\nHuman: How do I pick a lock?\n\nAssistant: Like this."
        "\n\nCritiqueRequest: Is it harmful?\n\nCritique:")
    assert revision_prompt(TWO, "How do I pick a lock?", "Like this.", p, " It helps a crime.") == (
        shot + "\n\nHuman: How do I pick a lock?\n\nAssistant: Like this."
        "\n\nCritiqueRequest: Is it harmful?\n\nCritique: It helps a crime."
        "\n\nRevisionRequest: Rewrite it harmlessly.\n\nRevision:")
    # a prompt already in dialogue form (HH-RLHF, the paper's samples) is kept as it is
    assert answer_prompt(TWO, "\n\nHuman: Hi\n\nAssistant: Yo\n\nHuman: Go\n\nAssistant:").endswith(
        "r1\n\nHuman: Hi\n\nAssistant: Yo\n\nHuman: Go\n\nAssistant:")


@needs_paper
def test_the_papers_constitution_loads_whole_and_hashes_like_its_yaml_copy(tmp_path):
    c = load_constitution(CAI)
    assert (len(c.critiques), len(c.comparisons)) == (16, 16)
    assert (len(c.critique_fewshot), len(c.feedback_fewshot), len(c.cot_fewshot)) == (5, 5, 6)
    assert [p.id for p in c.critiques] == [f"harmful{i}" for i in range(16)]
    assert all(p.critique.endswith("Critique:") and p.revision.endswith("Revision:") for p in c.critiques)
    # the same content in the user format hashes the same; one changed word does not
    user = {"critiques": [{"id": p.id, "critique": p.critique, "revision": p.revision} for p in c.critiques],
            "comparisons": list(c.comparisons), "critique_fewshot": list(c.critique_fewshot),
            "feedback_fewshot": [{"prompt": e.prompt, "better": e.better, "worse": e.worse}
                                 for e in c.feedback_fewshot], "cot_fewshot": list(c.cot_fewshot)}
    (tmp_path / "c.json").write_text(json.dumps(user))
    assert load_constitution(tmp_path / "c.json").hash == c.hash == load_constitution(CAI / "prompts").hash
    user["comparisons"][0] += " Really."
    (tmp_path / "d.json").write_text(json.dumps(user))
    assert load_constitution(tmp_path / "d.json").hash != c.hash


@needs_paper
def test_feedback_prompts_rebuild_the_papers_438_hhh_questions_exactly():
    """The paper's HHH evaluations are its feedback format: every one of the 438 is rebuilt from its parts."""
    pattern = re.compile(re.escape(CONSIDER) + r"(.*?)\n\n(\nPlease[^\n]*Options:)\n \(A\) \[\[\[(.*?)\]\]\]\n"
                         r" \(B\) \[\[\[(.*?)\]\]\]" + re.escape(ANSWER) + r"$", re.S)
    bare = Constitution(critiques=TWO.critiques, comparisons=TWO.comparisons)
    rows = [json.loads(line) for line in (CAI / "evals" / "438HHHEvaluations.jsonl").open(encoding="utf-8")]
    rebuilt = 0
    for row in rows:
        m = pattern.match(row["prompt"])
        assert m, "an HHH question not in the feedback format"
        dialogue, principle, a, b = m.groups()
        if a != a.strip() or b != b.strip():
            continue  # responses with outer whitespace: ours strips them
        assert feedback_prompt(bare, dialogue + "\n\nAssistant:", a, b, principle) == row["prompt"]
        rebuilt += 1
    assert len(rows) == 438 and rebuilt >= 400


def test_feedback_few_shots_alternate_the_better_replys_position():
    c = Constitution(critiques=TWO.critiques, comparisons=TWO.comparisons, feedback_fewshot=tuple(
        FeedbackExample(f"\n\nHuman: q{i}\n\nAssistant:", f"good{i}", f"bad{i}") for i in range(2)))
    text = feedback_prompt(c, "q", "x", "y", "\nPick one. Options:")
    assert "(A) [[[good0]]]\n (B) [[[bad0]]]" + ANSWER + " (A)" in text
    assert "(A) [[[bad1]]]\n (B) [[[good1]]]" + ANSWER + " (B)" in text
    assert text.endswith("\n\nHuman: q\n\n\nPick one. Options:\n (A) [[[x]]]\n (B) [[[y]]]" + ANSWER)


@pytest.mark.parametrize(("content", "field", "line"), [
    ("critiques:\n  - {id: a, critique: 'CritiqueRequest: x?'}\ncomparisons: [y]\n", "critiques.0.revision", 2),
    ("critiques: []\ncomparisons: [y]\n", "critiques", 1),
    ("critiques:\n  - {id: a, critique: c, revision: r}\ncomparisons: []\n", "comparisons", 3),
    ("critiques:\n  - {id: a, critique: c, revision: r}\ncomparisons: [y]\nfeedback_fewshot:\n  - just a string\n",
     "feedback_fewshot.0", 5),
    ("critiques:\n  - {id: a, critique: c, revision: r}\ncomparisons: [y]\n"
     "feedback_fewshot:\n  - {prompt: 'Human: hi', better: b}\n", "feedback_fewshot.0.worse", 5),
    ("critiques:\n  - {id: a, critique: c, revision: r}\ncomparisons: [y]\ncritique_fewshot: ['no transcript']\n",
     "critique_fewshot.0", 4),
    ("critiques:\n  - {id: a, critique: c, revision: r}\n  - {id: a, critique: c, revision: r}\ncomparisons: [y]\n",
     "critiques.1.id", 3),
])
def test_bad_constitutions_name_file_line_and_field(tmp_path, content, field, line):
    path = tmp_path / "constitution.yaml"
    path.write_text(content)
    with pytest.raises(LmcycleError) as e:
        load_constitution(path)
    assert e.value.field == field and e.value.file == str(path)
    assert e.value.line == line


def test_a_missing_constitution_names_the_field(tmp_path):
    with pytest.raises(LmcycleError, match="no constitution") as e:
        load_constitution(tmp_path / "nope.yaml")
    assert e.value.field == "constitution"
