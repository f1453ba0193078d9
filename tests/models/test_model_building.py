from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from lmcycle.config import validate
from lmcycle.data.examples import Example
from lmcycle.errors import LmcycleError
from lmcycle.models.build import SIZES, build_model, count_params, train_tokenizer
from lmcycle.stages.build import BuildStage, run_build
from lmcycle.stages.context import RunContext


def _nominal(size: str) -> float:
    return float(size[:-1]) * {"k": 1e3, "m": 1e6}[size[-1]]


@pytest.fixture(scope="module")
def full_vocab_tokenizers():
    """Tokenizers that reach the default 2048-entry vocabulary (random words give plenty of merges)."""
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(4000)]
    texts = [" ".join(words[i : i + 20]) for i in range(0, len(words), 20)]
    return {s2s: train_tokenizer(texts, 2048, seq2seq=s2s) for s2s in (False, True)}


@pytest.mark.parametrize("arch,size", [(a, s) for a in SIZES for s in SIZES[a]])
def test_named_sizes_match_their_parameter_count(arch, size, full_vocab_tokenizers):
    tokenizer = full_vocab_tokenizers[arch == "t5"]
    assert len(tokenizer) == 2048
    with torch.device("meta"):  # shapes only: no time spent initialising 10M weights
        model = build_model(arch, size, tokenizer, max_len=512, seed=0)
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight  # tied
    assert abs(count_params(model) / _nominal(size) - 1) <= 0.35


def test_decoder_tokenizer_conventions(decoder_tokenizer):
    tok = decoder_tokenizer
    assert (tok.pad_token, tok.eos_token, tok.bos_token) == ("<pad>", "<eos>", "<bos>")
    assert (tok.pad_token_id, tok.eos_token_id) == (0, 1)
    text = "The quick brown fox"
    ids = tok(text).input_ids
    assert tok.eos_token_id not in ids and tok.bos_token_id not in ids  # GPT-2 style: nothing added
    assert len(ids) < len(text.encode())  # merges were learned
    assert len(tok) <= 400
    assert tok.model_max_length == 128


def test_byte_level_encodes_any_text_losslessly(decoder_tokenizer):
    text = "Ünïcödé — never seen: 你好 🙂\n\ttabs  and  spaces"
    assert decoder_tokenizer.decode(decoder_tokenizer(text).input_ids) == text


def test_t5_tokenizer_has_sentinels_and_appends_eos(t5_tokenizer):
    tok = t5_tokenizer
    ids = tok("hello there").input_ids
    assert ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 1
    sentinel_ids = tok.convert_tokens_to_ids([f"<extra_id_{i}>" for i in range(100)])
    assert len(set(sentinel_ids)) == 100
    assert tok("a <extra_id_7> b").input_ids.count(sentinel_ids[7]) == 1  # a sentinel is one token
    assert tok.decode(tok("a <extra_id_7> b").input_ids, skip_special_tokens=True) == "a  b"
    assert tok.bos_token is None


def test_vocab_too_small_is_a_clear_error():
    with pytest.raises(LmcycleError, match="at least"):
        train_tokenizer(["x"], 300, seq2seq=True)


def test_same_seed_same_weights_other_seed_other_weights(decoder_tokenizer):
    a = build_model("llama", "100k", decoder_tokenizer, 64, seed=1)
    b = build_model("llama", "100k", decoder_tokenizer, 64, seed=1)
    c = build_model("llama", "100k", decoder_tokenizer, 64, seed=2)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name
    assert not all(torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters(), strict=True))


def test_build_leaves_the_global_rng_alone(decoder_tokenizer):
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    build_model("gpt2", "100k", decoder_tokenizer, 64, seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_stage_rejects_unknown_size_listing_the_known_ones():
    with pytest.raises(LmcycleError) as err:
        validate(BuildStage, {"arch": "gpt2", "size": "3b", "corpus": ["d"]}, file="r.yaml")
    assert "size" in str(err.value)
    for name in SIZES["gpt2"]:
        assert name in str(err.value)


def test_stage_rejects_a_vocab_smaller_than_the_bytes():
    with pytest.raises(LmcycleError, match="vocab_size"):
        validate(BuildStage, {"arch": "llama", "size": "1m", "corpus": ["d"], "vocab_size": 100}, file="r.yaml")


def _context(tmp_path):
    ctx = RunContext(run_dir=tmp_path / "run", seed=3)
    # Inject the examples the recipe's data section would have loaded.
    ctx._datasets["toy"] = [
        Example(input=f"#Person1#: line {i} about topic {i % 5}. #Person2#: reply {i}.",
                targets=[f"They talk about topic {i % 5}."])
        for i in range(40)
    ]
    return ctx


@pytest.mark.parametrize("arch,auto_cls", [("gpt2", AutoModelForCausalLM), ("t5", AutoModelForSeq2SeqLM)])
def test_run_build_saves_a_reloadable_model(arch, auto_cls, tmp_path):
    ctx = _context(tmp_path)
    cfg = BuildStage(name="b", arch=arch, size="100k", corpus=["toy"], vocab_size=500, max_len=64)
    out = run_build(cfg, ctx)
    model_dir = out["model"]
    assert model_dir.startswith(str(ctx.stage_dir("b")))
    assert (tmp_path / "run" / "b" / "model" / "model.safetensors").exists()
    model = auto_cls.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert model.config.vocab_size == len(tokenizer) <= 500
    assert "topic" in tokenizer.decode(tokenizer("topic").input_ids)
    expected = build_model(arch, "100k", tokenizer, 64, seed=ctx.seed)  # same seed -> same weights
    for p, q in zip(model.parameters(), expected.parameters(), strict=True):
        assert torch.equal(p, q)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["stage"] == "b"
    assert logged[-1]["params"] == count_params(model)
    assert logged[-1]["vocab_size"] == len(tokenizer)
    if arch == "t5":
        assert tokenizer.convert_ids_to_tokens(tokenizer.convert_tokens_to_ids("<extra_id_99>")) == "<extra_id_99>"
        assert model.config.decoder_start_token_id == tokenizer.pad_token_id
