"""Tiny models and tokenizers for the model tests, built here from configs (no Hub access needed).

Weights are initialised with a larger scale than the library default so that the random models' next-token
distributions are neither uniform nor one-hot: greedy and sampled outputs then vary from prompt to prompt.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from lmcycle.models.build import train_tokenizer

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "#Person1#: Hello there, how are you today?",
    "#Person2#: I am fine, thank you very much. And you?",
    "Summary: two friends greet each other and talk about the weather.",
    "Numbers like 42 and 1999 appear too; so do commas, colons: and dashes - here.",
] * 4


@pytest.fixture(scope="session")
def decoder_tokenizer():
    return train_tokenizer(TEXTS, 400, seq2seq=False, max_len=128)


@pytest.fixture(scope="session")
def t5_tokenizer():
    return train_tokenizer(TEXTS, 460, seq2seq=True, max_len=128)


def tiny_model(arch: str, tokenizer, seed: int = 0):
    """A 2-layer, 32-wide model of ``arch`` in eval mode."""
    ids = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
                          initializer_range=0.2, bos_token_id=tokenizer.bos_token_id, **ids)
        model = LlamaForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=128,
                         initializer_range=0.2, bos_token_id=tokenizer.bos_token_id, **ids)
        model = GPT2LMHeadModel(cfg)
    else:
        cfg = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=16, num_heads=2, num_layers=2, d_ff=64,
                       decoder_start_token_id=tokenizer.pad_token_id, initializer_factor=2.0, **ids)
        model = T5ForConditionalGeneration(cfg)
    return model.eval()


@pytest.fixture(scope="session")
def models(decoder_tokenizer, t5_tokenizer):
    """``{arch: (model, tokenizer)}`` for llama, gpt2 and t5."""
    return {
        "llama": (tiny_model("llama", decoder_tokenizer), decoder_tokenizer),
        "gpt2": (tiny_model("gpt2", decoder_tokenizer), decoder_tokenizer),
        "t5": (tiny_model("t5", t5_tokenizer), t5_tokenizer),
    }


@pytest.fixture(scope="session")
def make_model():
    """The :func:`tiny_model` factory, for tests that need a fresh model (to save, or to change)."""
    return tiny_model
