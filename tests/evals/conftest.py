"""Tiny local models and a byte-level BPE tokenizer, built in the test (no hub downloads)."""

from pathlib import Path

import pytest
import torch

CORPUS = [
    "#Person1#: Hello, how are you today?\n#Person2#: I am fine, thank you. And you?",
    "#Person1#: Where is the train station?\n#Person2#: Go straight and turn left at the bank.",
    "#Person2# tells #Person1# the way to the station. #Person1# thanks #Person2#.",
    "Summarize the dialogue. The weather is nice. They meet at the cafe at noon.",
]


def make_tokenizer(vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def make_llama(tokenizer, max_positions: int = 256):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=max_positions,
                      pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def make_t5(tokenizer):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=16, d_ff=64, num_layers=1, num_decoder_layers=1,
                   num_heads=2, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                   decoder_start_token_id=tokenizer.pad_token_id)
    return T5ForConditionalGeneration(cfg).eval()


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def llama(tokenizer):
    return make_llama(tokenizer)


@pytest.fixture(scope="session")
def t5(tokenizer):
    return make_t5(tokenizer)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A saved tiny Llama + tokenizer (save_pretrained, safetensors)."""
    path = tmp_path_factory.mktemp("tiny") / "model"
    model = make_llama(tokenizer)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
