"""Shared by the RAG tests: all-MiniLM-L6-v2's tokenizer and encoder (the local copy)."""

import pytest


@pytest.fixture(scope="session")
def minilm_tokenizer():
    from transformers import AutoTokenizer

    from lmcycle.models.load import MINILM, local_copy

    return AutoTokenizer.from_pretrained(local_copy(MINILM))


@pytest.fixture(scope="session")
def minilm_encoder():
    from lmcycle.apps.rag.encoder import Encoder

    return Encoder()
