"""Answer a question from retrieved chunks, with citations checked, and the store's on-disk settings.

:func:`answer_question` retrieves ``k`` chunks, numbers them inside the prompt's marked data section, drops the
lowest-ranked ones until the prompt and the answer fit the model's context window, asks the model, and checks
the answer's citations against exactly the sources it was shown.

A store folder also holds ``rag.json`` (encoder, chunk size, overlap), written at the first ingest: queries must
embed with the encoder that embedded the passages, so :func:`open_store` refuses a different one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lmcycle.apps.rag.cite import CitationReport, Source, build_prompt, check_citations, sources_from_hits
from lmcycle.apps.rag.encoder import Encoder
from lmcycle.apps.rag.retrieve import Retriever
from lmcycle.apps.rag.store import SqliteVectorStore
from lmcycle.atomic import atomic_write_text
from lmcycle.errors import LmcycleError
from lmcycle.models.generate import DecodingConfig

SETTINGS_FILE = "rag.json"


@dataclass(frozen=True)
class RagAnswer:
    question: str
    answer: str
    sources: list[Source]
    citations: CitationReport
    prompt: str


def answer_question(llm, retriever: Retriever, question: str, *, k: int = 5, mode: str = "hybrid",
                    cfg: DecodingConfig | None = None) -> RagAnswer:
    """Retrieve, prompt with numbered sources (as many as fit, at least one), answer, check the citations."""
    cfg = cfg or DecodingConfig(max_new_tokens=128)
    sources = sources_from_hits(retriever.retrieve(question, k, mode))
    if not sources:
        raise LmcycleError("the store returned no passages (is it empty?)", field="store")
    while True:
        prompt = build_prompt(question, sources)
        if llm.count_tokens(prompt) + cfg.max_new_tokens <= llm.context_window:
            break
        if len(sources) == 1:  # an answer without any source would be exactly what RAG is meant to prevent
            raise LmcycleError(f"not even the best passage fits the model's context window of {llm.context_window} "
                               f"tokens with {cfg.max_new_tokens} new tokens: use smaller chunks (rag ingest "
                               "--chunk-tokens), fewer new tokens, or a model with a longer window", field="question")
        sources = sources[:-1]  # the lowest-ranked source goes first
    answer = llm.complete([prompt], cfg)[0].strip()
    return RagAnswer(question, answer, sources, check_citations(answer, sources), prompt)


def store_settings(store_dir: str | Path, encoder: str, chunk_tokens: int, overlap_tokens: int) -> dict:
    """The store's settings: written at the first ingest, checked against later ingests."""
    path = Path(store_dir) / SETTINGS_FILE
    wanted = {"encoder": encoder, "chunk_tokens": chunk_tokens, "overlap_tokens": overlap_tokens}
    if path.exists():
        saved = read_settings(store_dir)
        if saved["encoder"] != encoder:
            raise LmcycleError(f"the store was built with encoder '{saved['encoder']}', not '{encoder}'",
                               file=path, field="encoder")
        return saved
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(wanted, indent=1) + "\n")
    return wanted


def read_settings(store_dir: str | Path) -> dict:
    path = Path(store_dir) / SETTINGS_FILE
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LmcycleError("not a store folder (no rag.json): ingest documents into it first", file=path) from None
    except json.JSONDecodeError as e:
        raise LmcycleError(f"not valid JSON: {e.msg}", file=path, line=e.lineno) from None
    if not isinstance(settings, dict) or not isinstance(settings.get("encoder"), str):
        raise LmcycleError("no 'encoder' setting", file=path, field="encoder")
    return settings


def open_store(store_dir: str | Path) -> Retriever:
    """A retriever over an existing store folder, with the encoder that built it."""
    settings = read_settings(store_dir)
    return Retriever(SqliteVectorStore(store_dir), Encoder(settings["encoder"]))
