"""Build small models from scratch: named sizes, and a byte-level BPE tokenizer trained on a corpus of texts.

Sizes are named after their parameter count *including* embeddings with the default 2048-token vocabulary
(input and output embeddings are tied, so they count once). A larger vocabulary adds ``vocab * hidden``.

Tokenizer conventions follow the architecture the model imitates:

- decoders (Llama, GPT-2): special tokens ``<pad>`` (id 0), ``<eos>`` (1), ``<bos>`` (2); like GPT-2 the
  tokenizer adds none of them by itself, so whoever builds training sequences appends ``<eos>`` explicitly.
- T5: ``<pad>`` (0, also the decoder start token), ``<eos>`` (1) and the span-corruption sentinels
  ``<extra_id_0>`` ... ``<extra_id_99>``; like T5's own tokenizer it appends ``<eos>`` to every encoded text.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

from lmcycle.errors import LmcycleError
from lmcycle.models.device import check_attn_implementation, hf_attn_implementation

Arch = Literal["llama", "gpt2", "t5"]
PAD, EOS, BOS = "<pad>", "<eos>", "<bos>"
N_SENTINELS = 100


def sentinel(i: int) -> str:
    """The i-th T5 span-corruption sentinel token, ``<extra_id_i>``."""
    return f"<extra_id_{i}>"


@dataclass(frozen=True)
class Shape:
    """Width and depth of a model. For T5, ``layers`` is the depth of the encoder and of the decoder each."""

    hidden: int
    layers: int
    heads: int
    ffn: int  # feed-forward inner width (Llama SwiGLU, T5 gated-GELU, GPT-2 GELU MLP: 4 * hidden)


SIZES: dict[str, dict[str, Shape]] = {
    "llama": {
        "100k": Shape(hidden=32, layers=2, heads=2, ffn=86),
        "1m": Shape(hidden=128, layers=4, heads=4, ffn=344),
        "10m": Shape(hidden=320, layers=8, heads=5, ffn=864),
    },
    "gpt2": {
        "100k": Shape(hidden=32, layers=2, heads=2, ffn=128),
        "1m": Shape(hidden=128, layers=4, heads=4, ffn=512),
        "10m": Shape(hidden=320, layers=8, heads=5, ffn=1280),
    },
    "t5": {
        "100k": Shape(hidden=32, layers=1, heads=2, ffn=64),
        "1m": Shape(hidden=128, layers=2, heads=4, ffn=256),
        "10m": Shape(hidden=256, layers=4, heads=4, ffn=1024),
    },
}


def count_params(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied embeddings count once)."""
    return sum(p.numel() for p in model.parameters())


# -- tokenizer --------------------------------------------------------------------------------------------
def special_tokens(seq2seq: bool) -> list[str]:
    """Special tokens in id order: ``<pad>``, ``<eos>``, then ``<bos>`` (decoders) or the T5 sentinels."""
    return [PAD, EOS] + ([sentinel(i) for i in range(N_SENTINELS)] if seq2seq else [BOS])


def min_vocab_size(seq2seq: bool) -> int:
    """The 256 byte tokens plus the special tokens."""
    return 256 + len(special_tokens(seq2seq))


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, *, seq2seq: bool, max_len: int = 512
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` (any byte sequence is encodable, nothing is unknown).

    The vocabulary has at most ``vocab_size`` entries (fewer when the corpus has too few distinct merges);
    ``model_max_length`` is ``max_len``. See the module docstring for special tokens per architecture.
    """
    specials = special_tokens(seq2seq)
    minimum = min_vocab_size(seq2seq)
    if vocab_size < minimum:
        raise LmcycleError(f"vocab_size {vocab_size} is too small: byte-level BPE needs at least {minimum} "
                           f"(256 bytes + {len(specials)} special tokens)", field="vocab_size")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_nonempty(texts), trainer)
    if seq2seq:
        eos_id = tok.token_to_id(EOS)
        tok.post_processor = processors.TemplateProcessing(
            single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, eos_id)]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, pad_token=PAD, eos_token=EOS, model_max_length=max_len,
            extra_special_tokens=[sentinel(i) for i in range(N_SENTINELS)],
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, bos_token=BOS, model_max_length=max_len
    )


def _nonempty(texts: Iterable[str]) -> Iterator[str]:
    for t in texts:
        if t:
            yield t


# -- model ------------------------------------------------------------------------------------------------
def model_config(arch: Arch, size: str, tokenizer: PreTrainedTokenizerFast, max_len: int):
    """The transformers config of a named size, with vocabulary and special ids taken from ``tokenizer``."""
    shape = SIZES[arch][size]
    ids = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    vocab = len(tokenizer)
    if arch == "llama":
        return LlamaConfig(
            vocab_size=vocab, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
            num_attention_heads=shape.heads, num_key_value_heads=shape.heads, intermediate_size=shape.ffn,
            max_position_embeddings=max_len, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, **ids,
        )
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab, n_embd=shape.hidden, n_layer=shape.layers, n_head=shape.heads, n_inner=shape.ffn,
            n_positions=max_len, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, **ids,
        )
    if arch == "t5":
        return T5Config(
            vocab_size=vocab, d_model=shape.hidden, d_kv=shape.hidden // shape.heads, num_heads=shape.heads,
            num_layers=shape.layers, num_decoder_layers=shape.layers, d_ff=shape.ffn,
            feed_forward_proj="gated-gelu", tie_word_embeddings=True,
            decoder_start_token_id=tokenizer.pad_token_id, **ids,
        )
    raise LmcycleError(f"unknown architecture '{arch}' (known: {', '.join(SIZES)})", field="arch")


def build_model(arch: Arch, size: str, tokenizer: PreTrainedTokenizerFast, max_len: int, seed: int,
                attn_implementation: str = "sdpa") -> PreTrainedModel:
    """A freshly initialised model of a named size, on the CPU, computing attention with ``attn_implementation``
    (``sdpa``, ``eager`` or ``flash_attention_2``); the same seed gives the same weights.

    It is built on the CPU on every machine: CUDA's random streams differ from the CPU's, and a seed must give
    the same model wherever it runs. The attention implementation is a loading choice, not a weight: config.json
    does not record it, and whoever loads the saved model chooses again.
    """
    if arch not in SIZES:
        raise LmcycleError(f"unknown architecture '{arch}' (known: {', '.join(SIZES)})", field="arch")
    if size not in SIZES[arch]:
        raise LmcycleError(f"unknown size '{size}' for {arch} (known: {', '.join(SIZES[arch])})", field="size")
    check_attn_implementation(attn_implementation)
    config = model_config(arch, size, tokenizer, max_len)
    config._attn_implementation = hf_attn_implementation(attn_implementation)
    model_cls = {"llama": LlamaForCausalLM, "gpt2": GPT2LMHeadModel, "t5": T5ForConditionalGeneration}[arch]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = model_cls(config)
        except ValueError as e:  # an implementation this architecture lacks (T5 has no flash attention)
            raise LmcycleError(f"{model_cls.__name__}: {(str(e).strip().splitlines() or [''])[0]}",
                               field="attn_implementation") from None
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model
