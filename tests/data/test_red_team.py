"""Red-team prompt formats: the paper's sample prompts and HH-RLHF's opening human turns (never printed)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from lmcycle.data.red_team import load_cai_prompts, load_hh_red_team
from lmcycle.errors import LmcycleError

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


def test_cai_prompts_are_distinct_conversations_with_their_source(tmp_path):
    rows = [{"rl_prompt": "\n\nHuman: a?\n\nAssistant:", "comparison_dataset": "PALMS"},
            {"rl_prompt": "\n\nHuman: b?\n\nAssistant:", "comparison_dataset": "PALMS"}]
    (tmp_path / "A.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "B.jsonl").write_text(json.dumps(rows[1]) + "\n")
    got = load_cai_prompts(tmp_path)
    assert [e.input for e in got] == [r["rl_prompt"] for r in rows]
    assert len({e.id for e in got}) == 2 and got[0].meta == {"dataset": "PALMS"} and got[0].targets == [""]
    (tmp_path / "C.jsonl").write_text('{"rl_prompt": "no turns"}\n')
    with pytest.raises(LmcycleError) as e:
        load_cai_prompts(tmp_path)
    assert (e.value.line, e.value.field) == (1, "rl_prompt") and e.value.file.endswith("C.jsonl")


def test_hh_red_team_takes_each_opening_human_turn_once(tmp_path):
    rows = [{"chosen": "\n\nHuman: first?\n\nAssistant: no\n\nHuman: more\n\nAssistant: fine",
             "rejected": "\n\nHuman: first?\n\nAssistant: no\n\nHuman: more\n\nAssistant: sure"},
            {"chosen": "\n\nHuman: first?\n\nAssistant: x", "rejected": "\n\nHuman: first?\n\nAssistant: y"},
            {"chosen": "\n\nHuman: second\n\nAssistant: x", "rejected": "\n\nHuman: second\n\nAssistant: y"}]
    path = tmp_path / "h.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    got = load_hh_red_team(path, "all")
    assert [e.input for e in got] == ["\n\nHuman: first?\n\nAssistant:", "\n\nHuman: second\n\nAssistant:"]


@pytest.mark.skipif(not (SHARED / "constitutional_ai").is_dir(), reason="../shared/data is not beside the repo")
def test_the_shared_red_team_prompts():
    cai = load_cai_prompts(SHARED / "constitutional_ai")
    assert len(cai) == 66 and {e.meta["dataset"] for e in cai} == {"PALMS", "LaMDA", "InstructGPT"}
    train, test = (load_hh_red_team(SHARED / "hh_rlhf", s) for s in ("train", "test"))
    assert len(train) > 900 and len(test) > 150 and not {e.input for e in train} & {e.input for e in test}
