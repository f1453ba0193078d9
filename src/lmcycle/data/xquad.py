"""XQuAD-en (the 1,190-question, 48-article subset of the SQuAD v1.1 dev set) as extractive QA.

The file is SQuAD v1.1 JSON: ``data[].title``, ``data[].paragraphs[].context`` and
``data[].paragraphs[].qas[].{id, question, answers[].text}``. It has no train/test split, so this module cuts one
by ARTICLE (title), so no paragraph (and no article) is in both: the sorted titles are shuffled with
:data:`SPLIT_SEED` and the first ``round(25%)`` are test. On the real file that is 12 test articles and 36
train articles (the question counts per split are in the tests, computed from the file). ``all`` is every
question in file order.

An example's ``input`` is ``"Context: <paragraph>\\nQuestion: <question>"``; its targets are the distinct gold
answer texts in file order (XQuAD has one per question; SQuAD-format files with several work too). ``meta`` has
``title``, ``context``, ``question`` and ``answer_starts`` (character offsets of the targets in the context).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from lmcycle.data.examples import Example
from lmcycle.errors import LmcycleError

FILE_NAME = "xquad.en.json"
SPLIT_SEED = 2020
TEST_FRACTION = 0.25
SPLITS = ("train", "test", "all")


def load_xquad(path: str | Path, split: str, seed: int = SPLIT_SEED) -> list[Example]:
    """The examples of one split (``train``, ``test`` or ``all``), task ``xquad``, in file order.

    ``path`` is the XQuAD directory (holding ``xquad.en.json``) or a SQuAD v1.1-format JSON file.
    ``id`` is the question's SQuAD id.
    """
    if split not in SPLITS:
        raise LmcycleError(f"unknown XQuAD split '{split}' (known: {', '.join(SPLITS)})", field="split")
    file = _json_file(Path(path))
    articles = _articles(file)
    titles = [_text(article, "title", file, f"data[{i}]") for i, article in enumerate(articles)]
    if len(set(titles)) != len(titles):
        raise LmcycleError("two articles share a title, so the split by article would be ambiguous",
                           file=file, field="data[].title")
    chosen = set(titles) if split == "all" else set(split_titles(titles, seed)[split])
    return [ex for i, (article, title) in enumerate(zip(articles, titles, strict=True)) if title in chosen
            for ex in _article_examples(article, title, file, f"data[{i}]")]


def split_titles(titles: list[str], seed: int = SPLIT_SEED) -> dict[str, list[str]]:
    """``train``/``test`` article titles: the sorted titles shuffled with ``seed``; the first
    ``max(1, round(TEST_FRACTION * n))`` are test, the rest train."""
    order = sorted(titles)
    random.Random(seed).shuffle(order)
    n_test = max(1, round(TEST_FRACTION * len(order)))
    return {"test": order[:n_test], "train": order[n_test:]}


def _json_file(path: Path) -> Path:
    file = path / FILE_NAME if path.is_dir() else path
    if not file.is_file():
        raise LmcycleError(f"XQuAD data not found (expected {FILE_NAME} or a path to a SQuAD-format JSON file)",
                           file=file)
    return file


def _articles(file: Path) -> list[dict[str, Any]]:
    try:
        doc = json.loads(file.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise LmcycleError(f"invalid JSON: {e.msg} (column {e.colno})", file=file, line=e.lineno) from None
    except UnicodeDecodeError as e:
        raise LmcycleError(f"not valid UTF-8 ({e.reason} at byte {e.start})", file=file) from None
    articles = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(articles, list):
        raise LmcycleError("expected a SQuAD JSON object with a list 'data'", file=file, field="data")
    for i, article in enumerate(articles):
        _expect(article, dict, file, f"data[{i}]")
    return articles


def _article_examples(article: dict, title: str, file: Path, where: str) -> list[Example]:
    examples = []
    paragraphs = _expect(article.get("paragraphs"), list, file, f"{where}.paragraphs")
    for p, paragraph in enumerate(paragraphs):
        at = f"{where}.paragraphs[{p}]"
        paragraph = _expect(paragraph, dict, file, at)
        context = _text(paragraph, "context", file, at)
        for q, qa in enumerate(_expect(paragraph.get("qas"), list, file, f"{at}.qas")):
            examples.append(_to_example(_expect(qa, dict, file, f"{at}.qas[{q}]"), title, context, file,
                                        f"{at}.qas[{q}]"))
    return examples


def _to_example(qa: dict, title: str, context: str, file: Path, where: str) -> Example:
    question = _text(qa, "question", file, where)
    qid = _text(qa, "id", file, where)
    answers = _expect(qa.get("answers"), list, file, f"{where}.answers")
    if not answers:
        raise LmcycleError("no gold answers", file=file, field=f"{where}.answers")
    targets: list[str] = []
    starts: list[int | None] = []
    for a, answer in enumerate(answers):
        answer = _expect(answer, dict, file, f"{where}.answers[{a}]")
        text = _text(answer, "text", file, f"{where}.answers[{a}]")
        if text not in targets:  # distinct, first occurrence kept
            targets.append(text)
            starts.append(answer.get("answer_start"))
    return Example(input=f"Context: {context}\nQuestion: {question}", targets=targets, task="xquad", id=qid,
                   meta={"title": title, "context": context, "question": question, "answer_starts": starts})


def _expect(value: Any, kind: type, file: Path, where: str) -> Any:
    if not isinstance(value, kind):
        got = "nothing" if value is None else type(value).__name__
        raise LmcycleError(f"expected a JSON {'object' if kind is dict else 'list'}, got {got}", file=file,
                           field=where)
    return value


def _text(obj: dict, key: str, file: Path, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        got = "nothing" if value is None else type(value).__name__
        raise LmcycleError(f"expected a string, got {got}", file=file, field=f"{where}.{key}")
    if not value.strip():
        raise LmcycleError("empty text", file=file, field=f"{where}.{key}")
    return value
