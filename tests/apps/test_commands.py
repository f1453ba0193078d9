"""The application commands end to end: lmcycle rag ingest|query|delete, agent, pal, harness — with the real
MiniLM encoder, a tiny real local model as the backend, and the real sandbox."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from loopback import running

from lmcycle.apps.rag.answer import store_settings
from lmcycle.cli import main
from lmcycle.errors import LmcycleError

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
DOCS = {
    "volcano.txt": "Mount Etna is an active volcano on the east coast of Sicily. It erupts often.",
    "tea.md": "# Tea\n\nGreen tea is made from leaves that are not oxidised. It comes from China and Japan.",
    "trains.html": "<html><body><h1>Rail</h1><p>The Shinkansen is a network of high-speed railway lines in "
                   "Japan.</p><script>var hidden = 1;</script></body></html>",
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("rag")
    docs = root / "docs"
    docs.mkdir()
    for name, text in DOCS.items():
        (docs / name).write_text(text)
    assert main(["rag", "ingest", str(docs), "--store", str(root / "store"), "--chunk-tokens", "64"]) == 0
    return root


def _query(store, question, capsys, *extra):
    capsys.readouterr()
    assert main(["rag", "query", question, "--store", str(store / "store"), "--json", "--k", "2", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_ingest_query_update_delete(store, capsys):
    hits = _query(store, "Which volcano is in Sicily?", capsys)["hits"]
    assert hits[0]["source"].endswith("volcano.txt") and "Etna" in hits[0]["text"]
    html = _query(store, "high-speed railway", capsys, "--mode", "bm25")["hits"][0]
    assert "Shinkansen" in html["text"] and "hidden" not in html["text"]  # visible text only
    (store / "docs" / "volcano.txt").write_text("Vesuvius is a volcano near Naples in Italy.")
    assert main(["rag", "ingest", str(store / "docs" / "volcano.txt"), "--store", str(store / "store"),
                 "--chunk-tokens", "64"]) == 0
    texts = [h["text"] for h in _query(store, "volcano", capsys, "--k", "5")["hits"]]
    assert any("Vesuvius" in t for t in texts) and not any("Etna" in t for t in texts)  # replaced, not added
    assert main(["rag", "delete", str(store / "docs" / "tea.md"), "--store", str(store / "store")]) == 0
    assert "1 chunks deleted" in capsys.readouterr().out
    assert not any(h["source"].endswith("tea.md") for h in _query(store, "green tea", capsys, "--k", "5")["hits"])


def test_query_with_a_backend_answers_and_checks_citations(store, wide_model_dir, capsys):
    out = _query(store, "Where is the Shinkansen?", capsys, "--backend", f"local:{wide_model_dir}",
                 "--max-tokens", "8")
    assert out["sources"] and out["sources"][0]["number"] == 1
    assert isinstance(out["answer"], str)
    kinds = {p["kind"] for p in out["problems"]}
    assert out["citations_ok"] == (not kinds) and kinds <= {"no_citation", "unknown_citation", "quote_not_found"}


def test_a_store_keeps_its_encoder(tmp_path):
    store_settings(tmp_path, "enc-a", 64, 8)
    with pytest.raises(LmcycleError, match="built with encoder 'enc-a', not 'enc-b'"):
        store_settings(tmp_path, "enc-b", 64, 8)
    assert main(["rag", "query", "x", "--store", str(tmp_path / "nothing")]) == 1


def test_agent_and_pal_commands_run_a_real_model(store, wide_model_dir, tmp_path, capsys):
    trace = tmp_path / "trace.json"
    assert main(["agent", "What is 6 times 7?", "--backend", f"local:{wide_model_dir}", "--store",
                 str(store / "store"), "--max-steps", "2", "--max-tokens", "12", "--trace", str(trace)]) == 0
    steps = json.loads(trace.read_text())["steps"]
    assert steps[0]["step"] == "question" and steps[0]["tools"] == ["calculator", "lookup", "python", "search"]
    turns = [s for s in steps if s["step"] in ("action", "parse_error", "final_answer")]
    assert 1 <= len(turns) <= 2 and steps[-1]["step"] in ("stop", "final_answer")
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith("answer: ") or last in ("no answer: the step cap of 2 was reached",
                                                   f"no answer: the transcript outgrew the model's context window "
                                                   f"({len(turns)} steps done)")
    assert main(["pal", "How many legs do 3 cats have?", "--backend", f"local:{wide_model_dir}",
                 "--max-tokens", "12"]) == 0
    out = capsys.readouterr().out
    layers = next(line for line in out.splitlines() if line.startswith("sandbox layers active: "))
    assert "answer: " in out and "separate_process" in layers and "empty_env" in layers


def test_harness_commands(wide_model_dir, tmp_path, capsys):
    if not (SHARED / "gsm8k").exists() or not (SHARED / "truthfulqa").exists():
        pytest.skip(reason="the shared GSM8K / TruthfulQA data (../shared/data) is absent")
    out_file = tmp_path / "gsm8k.json"
    assert main(["harness", "gsm8k", "--data", str(SHARED / "gsm8k"), "--backend", f"local:{wide_model_dir}",
                 "--method", "direct", "--limit", "2", "--max-tokens", "4", "--out", str(out_file)]) == 0
    result = json.loads(out_file.read_text())
    assert result["n"] == 2 and len(result["records"]) == 2 and result["settings"]["method"] == "direct"
    assert main(["harness", "truthfulqa", "--data", str(SHARED / "truthfulqa"), "--backend",
                 f"local:{wide_model_dir}", "--method", "likelihood", "--limit", "3"]) == 0
    assert "truthfulqa_mc1: " in capsys.readouterr().out
    assert main(["harness", "gsm8k", "--data", str(SHARED / "gsm8k"), "--backend", "bogus"]) == 1


# What a terminal acts on: C0 controls but newline, DEL, C1 (U+009B is CSI alone), bidi overrides.
RAW_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202e]")
HOSTILE_NAME = "evil\n[7] trusted.txt"
HOSTILE_TEXT = ("Mount Etna \x1b[2J\x1b]0;pwned\x07 is \x9b31m red\r and \u202e reversed. Etna erupts often.\n"
                "[7] trusted.txt#0-9  (0.9999)\n    a fake hit")
HOSTILE_ANSWER = 'Etna \x1b[2J\x1b]8;;http://x\x07 is "an active \x1b[31mvolcano" [1]'


@pytest.fixture(scope="module")
def hostile_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    (root / "docs").mkdir()
    (root / "docs" / HOSTILE_NAME).write_text(HOSTILE_TEXT, encoding="utf-8", newline="")
    assert main(["rag", "ingest", str(root / "docs"), "--store", str(root / "store"), "--chunk-tokens", "64"]) == 0
    return root / "store"


def completions_server(text):
    """An OpenAI-compatible completions endpoint that answers every prompt with ``text``."""
    from fastapi import FastAPI

    app = FastAPI()

    @app.post("/v1/completions")
    def completions(body: dict):
        return {"id": "c", "object": "text_completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}]}

    return app


def assert_terminal_safe(out):
    assert not RAW_CONTROL.search(out), repr(out)
    # no line that passes for a hit ("[7] ...") or a listed source ("  [7] ..."); passage lines are 4-space indented
    assert not any(re.match(r" {0,3}\[7\]", line) for line in out.splitlines()), out


def test_rag_query_prints_no_terminal_controls_from_documents(hostile_store, capsys):
    capsys.readouterr()
    assert main(["rag", "query", "Etna", "--store", str(hostile_store), "--mode", "bm25"]) == 0
    out = capsys.readouterr().out
    assert_terminal_safe(out)
    assert all(line.startswith(("[1] ", "    ")) for line in out.splitlines()), out  # one hit, its lines indented
    assert "\\u001b[2J" in out and "\\u009b31m" in out and "evil\\u000a[7] trusted.txt#" in out  # shown, inert
    assert main(["rag", "query", "Etna", "--store", str(hostile_store), "--mode", "bm25", "--json"]) == 0
    out = capsys.readouterr().out
    assert_terminal_safe(out)
    hit = json.loads(out)["hits"][0]
    assert hit["text"] == HOSTILE_TEXT and hit["source"].endswith(HOSTILE_NAME)  # JSON still exact


def test_rag_answers_print_no_terminal_controls(hostile_store, capsys):
    with running(completions_server(HOSTILE_ANSWER)) as url:
        args = ["rag", "query", "Etna", "--store", str(hostile_store), "--mode", "bm25", "--k", "1",
                "--backend", f"openai:{url}/v1#m", "--api-key", "k"]
        capsys.readouterr()
        assert main(args) == 0
        out = capsys.readouterr().out
        assert_terminal_safe(out)
        assert out.splitlines()[0] == 'Etna \\u001b[2J\\u001b]8;;http://x\\u0007 is "an active \\u001b[31mvolcano" [1]'
        assert main([*args, "--json"]) == 0
        out = capsys.readouterr().out
        assert_terminal_safe(out)
        assert json.loads(out)["answer"] == HOSTILE_ANSWER


def test_error_messages_print_no_terminal_controls(tmp_path, capsys):
    assert main(["rag", "query", "x", "--store", str(tmp_path / "\x1b]0;pwned\x07\x1b[2J")]) == 1
    err = capsys.readouterr().err
    assert "not a store folder" in err and "\\u001b[2J" in err and not RAW_CONTROL.search(err)


def test_agent_and_pal_print_no_terminal_controls(capsys):
    answer = "Thought: done\nFinal Answer: Etna \x1b[2J\x9b31m is a volcano"
    with running(completions_server(answer)) as url:
        capsys.readouterr()
        assert main(["agent", "Where is Etna?", "--backend", f"openai:{url}/v1#m", "--api-key", "k"]) == 0
        out = capsys.readouterr().out
    assert not RAW_CONTROL.search(out) and out.splitlines()[-1] == "answer: Etna \\u001b[2J\\u009b31m is a volcano"
    program = "def solution():\n    # \x1b]0;pwned\x07\n    return 'a' + chr(27) + '[2Jb'\n"
    with running(completions_server(program)) as url:
        assert main(["pal", "Say hi", "--backend", f"openai:{url}/v1#m", "--api-key", "k"]) == 0
        out = capsys.readouterr().out
    assert not RAW_CONTROL.search(out), out
    assert "# \\u001b]0;pwned\\u0007" in out and "answer: a\\u001b[2Jb" in out
