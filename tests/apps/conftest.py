"""Shared by the application tests: a scripted LLM for tests about the plumbing around a model (the real
backends have their own tests in test_llm.py), and a tiny real model folder."""

from __future__ import annotations

import pytest
from scripted import ScriptedLLM
from tiny_lm import make_tokenizer, save_tiny, tiny_llama


@pytest.fixture
def scripted():
    return ScriptedLLM


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    tok = make_tokenizer()
    return save_tiny(tiny_llama(tok), tok, tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="session")
def wide_model_dir(tmp_path_factory):
    """A tiny Llama with a 2,048-token window: room for RAG, ReAct and PAL prompts."""
    tok = make_tokenizer()
    model = tiny_llama(tok)
    model.config.max_position_embeddings = 2048  # rotary positions: only the config limit changes
    return save_tiny(model, tok, tmp_path_factory.mktemp("wide") / "llama")
