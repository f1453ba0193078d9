"""Tiny real models and tokenizers for the training tests, built locally (no Hub access).

Imported by the tests in tests/train and tests/adapt, and by ddp_worker.py (which torchrun starts as a script).
"""

from __future__ import annotations

import random

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

from lmcycle.data.examples import Example
from lmcycle.data.preferences import PreferencePair

WORDS = ("red green blue cat dog bird sun moon tree river stone wind fire snow rain leaf apple bread milk "
         "tea book door road ship hill lake star cloud").split()
SENTINELS = [f"<extra_id_{i}>" for i in range(20)]


def sentences(n: int, seed: int = 0) -> list[str]:
    """Short sentences with a regular shape (``the X sees the Y .``), easy to learn in a few steps."""
    rng = random.Random(seed)
    return [f"the {rng.choice(WORDS)} sees the {rng.choice(WORDS)} and the {rng.choice(WORDS)} ."
            for _ in range(n)]


def examples(n: int, seed: int = 0, task: str = "reverse") -> list[Example]:
    """A learnable task: the target lists the input's words in reverse order (or upper-cased for 'upper')."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 5))]
        target = " ".join(reversed(words)) if task == "reverse" else " ".join(words).upper()
        out.append(Example(input=" ".join(words), targets=[target], task=task, id=f"{task}-{i}"))
    return out


MARKER = "star"


def marker_pairs(n: int, seed: int, longer_rejected: bool = False) -> list[PreferencePair]:
    """A learnable preference: chosen is a short response with the marker word inserted, rejected the same
    response without it (with ``longer_rejected``, half the rejected ones get an extra word, so that length
    alone does not separate the two)."""
    rng = random.Random(seed)
    words = [w for w in WORDS if w != MARKER]
    out = []
    for i in range(n):
        prompt = f"the {rng.choice(words)} sees the {rng.choice(words)} :"
        body = [rng.choice(words) for _ in range(rng.randint(2, 4))]
        chosen = list(body)
        chosen.insert(rng.randint(0, len(body)), MARKER)
        rejected = body + [rng.choice(words)] if longer_rejected and rng.random() >= 0.5 else body
        out.append(PreferencePair(f"p{i}", prompt, " " + " ".join(chosen), " " + " ".join(rejected)))
    return out


def make_tokenizer(seq2seq: bool = False, add_bos: bool = False, vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """Byte-level BPE: <pad>=0, <eos>=1, <bos>=2 (decoder) or sentinels (T5, which appends <eos> like T5)."""
    specials = ["<pad>", "<eos>"] + (SENTINELS if seq2seq else ["<bos>"])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = sentences(300) + [t for ex in examples(300) + examples(300, task="upper") for t in (ex.input, ex.target)]
    tok.train_from_iterator(texts, trainer)
    if seq2seq:
        tok.post_processor = processors.TemplateProcessing(single="$A <eos>", special_tokens=[("<eos>", 1)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                       extra_special_tokens=SENTINELS)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")


def tiny_llama(tok, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


def tiny_gpt2(tok, seed: int = 0, dropout: float = 0.0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=128, resid_pdrop=dropout,
                     embd_pdrop=dropout, attn_pdrop=dropout, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    return GPT2LMHeadModel(cfg)


def tiny_t5(tok, seed: int = 0) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=len(tok), d_model=32, d_kv=16, d_ff=64, num_layers=1, num_decoder_layers=1,
                   num_heads=2, dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5ForConditionalGeneration(cfg)


def save_tiny(model, tok, path) -> str:
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def run_context(tmp_path, model, tok):
    """A run directory whose 'build' stage produced ``model``, with datasets reverse/upper (64) and dev (16)."""
    from lmcycle.stages.context import RunContext

    ctx = RunContext(run_dir=tmp_path / "run", recipe_file=str(tmp_path / "recipe.yaml"))
    ctx.add_artifacts("build", {"model": save_tiny(model, tok, tmp_path / "build")})
    ctx._datasets["reverse"] = examples(64, seed=1)
    ctx._datasets["upper"] = examples(64, seed=2, task="upper")
    ctx._datasets["dev"] = examples(16, seed=9)
    return ctx


# Session fixtures shared by tests/train and tests/adapt (their conftest files import these two names).
@pytest.fixture(scope="session")
def tok():
    """Decoder tokenizer (adds no special tokens itself)."""
    return make_tokenizer()


@pytest.fixture(scope="session")
def t5_tok():
    """T5-style tokenizer: appends <eos>, has <extra_id_*> sentinels."""
    return make_tokenizer(seq2seq=True)
