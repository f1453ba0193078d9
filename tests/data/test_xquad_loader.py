"""The XQuAD-en loader: a split by article on the real file, SQuAD-format errors on small files in tmp."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmcycle.data.loaders import DatasetConfig, load_examples
from lmcycle.data.xquad import load_xquad, split_titles
from lmcycle.errors import LmcycleError

SHARED_XQUAD = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "xquad_en"


def squad(n_articles: int = 4) -> dict:
    articles = []
    for a in range(n_articles):
        context = f"Article {a} says the bridge opened in {1900 + a}."
        qas = [{"id": f"q{a}-{k}", "question": f"When did bridge {a} open ({k})?",
                "answers": [{"answer_start": context.index("19"), "text": str(1900 + a)},
                            {"answer_start": 0, "text": "Article"},
                            {"answer_start": context.index("19"), "text": str(1900 + a)}]} for k in range(2)]
        articles.append({"title": f"Title_{a}", "paragraphs": [{"context": context, "qas": qas}]})
    return {"version": "1.1", "data": articles}


def write(path: Path, doc) -> Path:
    path.write_text(json.dumps(doc, indent=1) if not isinstance(doc, str) else doc, encoding="utf-8")
    return path


def test_examples_and_split_by_article(tmp_path):
    file = write(tmp_path / "xquad.en.json", squad(4))
    train, test = load_xquad(tmp_path, "train"), load_xquad(tmp_path, "test")
    # 25% of 4 articles is 1 article (2 questions) for test, 3 (6 questions) for train.
    assert (len(test), len(train)) == (2, 6)
    assert len({ex.meta["title"] for ex in test}) == 1
    assert not {ex.meta["title"] for ex in test} & {ex.meta["title"] for ex in train}
    assert {ex.meta["title"] for ex in test} == set(split_titles([f"Title_{a}" for a in range(4)])["test"])
    ex = next(e for e in load_xquad(file, "all") if e.id == "q2-1")
    # Distinct gold answers, in file order, each found in the context at its offset.
    assert ex.targets == ["1902", "Article"] and ex.meta["answer_starts"] == [ex.meta["context"].index("1902"), 0]
    assert ex.input == f"Context: {ex.meta['context']}\nQuestion: {ex.meta['question']}" and ex.task == "xquad"


def test_split_titles_is_deterministic_and_ignores_file_order():
    titles = [f"T{i}" for i in range(20)]
    assert split_titles(titles) == split_titles(list(reversed(titles)))
    assert len(split_titles(titles)["test"]) == 5 and split_titles(titles, seed=1) != split_titles(titles)


def test_errors_name_file_and_field(tmp_path):
    with pytest.raises(LmcycleError, match="not found"):
        load_xquad(tmp_path, "test")
    doc = squad(2)
    doc["data"][1]["paragraphs"][0]["context"] = "  "
    file = write(tmp_path / "a.json", doc)
    with pytest.raises(LmcycleError, match="empty text") as err:
        load_xquad(file, "all")
    assert (err.value.file, err.value.field) == (str(file), "data[1].paragraphs[0].context")

    doc = squad(2)
    doc["data"][0]["paragraphs"][0]["qas"][1]["answers"] = []
    with pytest.raises(LmcycleError, match="no gold answers") as err:
        load_xquad(write(tmp_path / "b.json", doc), "all")
    assert err.value.field == "data[0].paragraphs[0].qas[1].answers"

    doc = squad(2)
    del doc["data"][0]["paragraphs"][0]["qas"][0]["question"]
    with pytest.raises(LmcycleError, match="expected a string") as err:
        load_xquad(write(tmp_path / "c.json", doc), "all")
    assert err.value.field == "data[0].paragraphs[0].qas[0].question"

    bad = write(tmp_path / "d.json", '{"data": [\n  {"title": "x",\n   "paragraphs": [}\n]}')
    with pytest.raises(LmcycleError, match="invalid JSON") as err:
        load_xquad(bad, "all")
    assert (err.value.file, err.value.line) == (str(bad), 3)

    with pytest.raises(LmcycleError, match="list 'data'"):
        load_xquad(write(tmp_path / "e.json", [1, 2]), "all")
    with pytest.raises(LmcycleError, match="unknown XQuAD split") as err:
        load_xquad(file, "dev")
    assert err.value.field == "split"


@pytest.mark.shared_data
def test_real_xquad_split_by_article():
    if not (SHARED_XQUAD / "xquad.en.json").is_file():
        pytest.skip(reason=f"shared XQuAD-en copy not found at {SHARED_XQUAD}")
    load = lambda split: load_examples(DatasetConfig(format="xquad", path=str(SHARED_XQUAD), split=split))  # noqa: E731
    everything, train, test = load("all"), load("train"), load("test")
    assert len(everything) == 1190 and len(train) + len(test) == 1190
    titles = {s: {ex.meta["title"] for ex in exs} for s, exs in (("train", train), ("test", test))}
    assert (len(titles["train"]), len(titles["test"])) == (36, 12) and not titles["train"] & titles["test"]
    assert not {ex.meta["context"] for ex in train} & {ex.meta["context"] for ex in test}
    assert len({ex.meta["context"] for ex in everything}) == 240
    assert not {ex.id for ex in train} & {ex.id for ex in test}
    assert [ex.id for ex in load("test")] == [ex.id for ex in test]
    for ex in everything:
        for text, start in zip(ex.targets, ex.meta["answer_starts"], strict=True):
            assert ex.meta["context"][start:start + len(text)] == text
