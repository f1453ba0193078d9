from __future__ import annotations

import inspect
import json

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from packaging.version import Version
from pydantic import ValidationError

from lmcycle.errors import LmcycleError
from lmcycle.models.generate import (
    DecodingConfig,
    apply_temperature,
    cut_at_stop,
    generate,
    generate_ids,
    logit_stream,
    top_k_filter,
    top_p_filter,
)
from lmcycle.models.kv_cache import CACHE_ARG, cache_of
from lmcycle.stages.context import RunContext
from lmcycle.stages.generate import GenerateStage, run_generate

PROMPTS = [
    "The quick brown",
    "#Person1#: Hello there, how are you today? #Person2#:",
    "I",
    "Summary: two friends",
    "Numbers like 42",
]
ARCHS = ["llama", "gpt2", "t5"]


def _hf_greedy(model, tokenizer, prompt: str, n: int) -> list[int]:
    enc = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**enc, do_sample=False, max_new_tokens=n, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)[0].tolist()
    new = out[1:] if model.config.is_encoder_decoder else out[enc.input_ids.shape[1]:]  # drop start / prompt
    return new[: new.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in new else new


# -- equivalence with transformers --------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_transformers_generate(models, arch):
    model, tokenizer = models[arch]
    ours = generate_ids(model, tokenizer, PROMPTS, DecodingConfig(max_new_tokens=12, batch_size=8))
    for prompt, row in zip(PROMPTS, ours, strict=True):
        assert row == _hf_greedy(model, tokenizer, prompt, 12), prompt
    assert len({tuple(r) for r in ours}) > 1  # the check is not vacuous: prompts lead to different outputs


@pytest.mark.parametrize("arch", ARCHS)
def test_the_cache_goes_by_the_name_this_transformers_uses(models, arch):
    """transformers 5.24 renamed ``past_key_values`` to ``cache`` (argument and output field)."""
    model, tokenizer = models[arch]
    assert CACHE_ARG == ("cache" if Version(transformers.__version__) >= Version("5.24") else "past_key_values")
    assert CACHE_ARG in inspect.signature(model.forward).parameters
    ids = torch.tensor([tokenizer("The quick brown")["input_ids"]])
    extra = {"decoder_input_ids": ids[:, :2]} if model.config.is_encoder_decoder else {}
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, **extra)
    assert cache_of(out).get_seq_length() == (2 if extra else ids.shape[1])


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("do_sample", [False, True])
def test_batched_equals_one_by_one(models, arch, do_sample):
    model, tokenizer = models[arch]
    cfg = DecodingConfig(do_sample=do_sample, max_new_tokens=10, batch_size=3, seed=7)
    batched = generate_ids(model, tokenizer, PROMPTS, cfg)
    alone = [generate_ids(model, tokenizer, PROMPTS, cfg.model_copy(update={"batch_size": 1}))[i]
             for i in range(len(PROMPTS))]
    assert batched == alone


def test_prompt_output_does_not_depend_on_its_batch_mates(models):
    model, tokenizer = models["llama"]
    cfg = DecodingConfig(do_sample=True, max_new_tokens=10, seed=3)
    full = generate(model, tokenizer, PROMPTS, cfg)
    # The same prompt at the same index, surrounded by different prompts.
    other = generate(model, tokenizer, [PROMPTS[0], "something else entirely", PROMPTS[2]], cfg)
    assert other[0] == full[0] and other[2] == full[2]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_left_padding_gives_the_same_logits_as_no_padding(models, arch):
    model, tokenizer = models[arch]
    short, long = tokenizer(["I", "The quick brown fox jumps over"]).input_ids
    assert len(short) < len(long)
    together = logit_stream(model, [short, long], tokenizer.pad_token_id)
    alone = logit_stream(model, [short], tokenizer.pad_token_id)
    with torch.no_grad():
        logits_together, logits_alone = next(together), next(alone)
        for _ in range(4):
            torch.testing.assert_close(logits_together[0], logits_alone[0], atol=1e-5, rtol=1e-4)
            token = logits_alone.argmax(-1)
            logits_together = together.send(torch.cat([token, logits_together[1:].argmax(-1)]))
            logits_alone = alone.send(token)


# -- sampling -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_same_seed_same_output_other_seed_other_output(models, arch):
    model, tokenizer = models[arch]
    cfg = DecodingConfig(do_sample=True, temperature=1.5, max_new_tokens=16, seed=1)
    first = generate_ids(model, tokenizer, PROMPTS, cfg)
    assert generate_ids(model, tokenizer, PROMPTS, cfg) == first
    assert generate_ids(model, tokenizer, PROMPTS, cfg.model_copy(update={"seed": 2})) != first


@pytest.mark.parametrize("arch", ARCHS)
def test_top_k_1_sampling_is_greedy(models, arch):
    model, tokenizer = models[arch]
    greedy = generate_ids(model, tokenizer, PROMPTS, DecodingConfig(max_new_tokens=10))
    sampled = generate_ids(model, tokenizer, PROMPTS,
                           DecodingConfig(do_sample=True, top_k=1, temperature=2.0, max_new_tokens=10, seed=5))
    assert sampled == greedy


def test_sampling_is_not_greedy(models):
    model, tokenizer = models["llama"]
    greedy = generate_ids(model, tokenizer, PROMPTS, DecodingConfig(max_new_tokens=10))
    sampled = generate_ids(model, tokenizer, PROMPTS, DecodingConfig(do_sample=True, max_new_tokens=10))
    assert sampled != greedy


# -- lengths and stops --------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_max_new_tokens_is_respected(models, arch):
    model, tokenizer = models[arch]
    short = generate_ids(model, tokenizer, PROMPTS, DecodingConfig(max_new_tokens=5))
    longer = generate_ids(model, tokenizer, PROMPTS, DecodingConfig(max_new_tokens=9))
    for s, long in zip(short, longer, strict=True):
        assert len(s) <= 5 and len(long) <= 9
        assert s == long[:5]  # a shorter budget cuts the same sequence


def test_generation_ends_at_eos(models):
    model, tokenizer = models["llama"]
    full = generate_ids(model, tokenizer, PROMPTS[:1], DecodingConfig(max_new_tokens=12))[0]
    eos_stand_in = full[3]
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = eos_stand_in  # pretend the 4th token is an end-of-sequence
    try:
        cut = generate_ids(model, tokenizer, PROMPTS[:1], DecodingConfig(max_new_tokens=12))[0]
    finally:
        model.generation_config.eos_token_id = saved
    assert cut == full[: full.index(eos_stand_in)]


def test_stop_string_cuts_text_and_ends_generation(models):
    model, tokenizer = models["gpt2"]
    cfg = DecodingConfig(max_new_tokens=16)
    prompt = PROMPTS[1]
    full_ids = generate_ids(model, tokenizer, [prompt], cfg)[0]
    full = tokenizer.decode(full_ids, skip_special_tokens=True)
    stop = tokenizer.decode(full_ids[4:6])  # a string that certainly occurs in the output
    assert stop and stop in full
    stopped = cfg.model_copy(update={"stop": [stop]})
    text = generate(model, tokenizer, [prompt], stopped)[0]
    assert text == full[: full.index(stop)]
    assert len(generate_ids(model, tokenizer, [prompt], stopped)[0]) <= 6 < len(full_ids)


def test_cut_at_stop_uses_the_earliest_stop():
    assert cut_at_stop("a summary.\n\nNext dialogue: ###", ["###", "\n\n"]) == "a summary."
    assert cut_at_stop("no stop here", ["###"]) == "no stop here"
    assert cut_at_stop("x", []) == "x"


def test_returns_only_new_text_in_input_order(models):
    model, tokenizer = models["llama"]
    cfg = DecodingConfig(max_new_tokens=6, batch_size=2)
    texts = generate(model, tokenizer, PROMPTS, cfg)
    ids = generate_ids(model, tokenizer, PROMPTS, cfg)
    assert texts == [tokenizer.decode(r, skip_special_tokens=True) for r in ids]
    assert texts[1] == generate(model, tokenizer, [PROMPTS[1]], cfg)[0]


def test_long_prompts_are_truncated_to_fit_the_position_table(models):
    model, tokenizer = models["gpt2"]  # 128 positions: an untruncated prompt would index past the table
    long_prompt = " ".join(["The quick brown fox"] * 60)
    assert len(tokenizer(long_prompt).input_ids) > 128
    out = generate_ids(model, tokenizer, [long_prompt], DecodingConfig(max_new_tokens=8))[0]
    limited = generate_ids(model, tokenizer, [long_prompt], DecodingConfig(max_new_tokens=8), max_input_tokens=120)
    assert len(out) == 8 and len(limited[0]) == 8


def test_budget_larger_than_the_context_window_is_a_clear_error(models):
    model, tokenizer = models["gpt2"]
    with pytest.raises(LmcycleError, match="context window of 128"):
        generate(model, tokenizer, ["x"], DecodingConfig(max_new_tokens=128))


def test_no_prompts_no_outputs(models):
    model, tokenizer = models["t5"]
    assert generate(model, tokenizer, [], DecodingConfig()) == []


# -- logits transforms --------------------------------------------------------------------------------------
logit_rows = st.lists(st.floats(-20, 20, allow_nan=False), min_size=1, max_size=40)


@settings(max_examples=200, deadline=None)
@given(values=logit_rows, p=st.floats(0.01, 1.0))
def test_top_p_keeps_the_smallest_most_likely_set_with_mass_at_least_p(values, p):
    logits = torch.tensor(values, dtype=torch.float64)
    probs = logits.softmax(-1)
    kept = torch.isfinite(top_p_filter(logits, p))
    assert kept.any()
    kept_mass = probs[kept].sum().item()
    assert kept_mass >= p - 1e-9 or kept.all()
    assert kept_mass - probs[kept].min().item() < p + 1e-9  # dropping its least likely token falls below p
    if (~kept).any():
        assert probs[kept].min() >= probs[~kept].max()  # the most likely tokens are the ones kept


@settings(max_examples=100, deadline=None)
@given(values=logit_rows, k=st.integers(0, 50))
def test_top_k_keeps_the_k_largest(values, k):
    logits = torch.tensor(values, dtype=torch.float64)
    kept = torch.isfinite(top_k_filter(logits, k))
    if k == 0 or k >= len(values):
        assert kept.all()
    else:
        kth_largest = torch.topk(logits, k).values[-1]
        assert kept.sum() >= k  # ties with the k-th value survive too
        assert torch.equal(kept, logits >= kth_largest)


def test_filters_work_row_by_row():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    assert torch.isfinite(top_k_filter(logits, 2)).tolist() == [[True, True, False, False], [False, False, True, True]]
    kept = torch.isfinite(top_p_filter(logits, 0.8))  # probs 0.64, 0.24, 0.09, 0.03
    assert kept[0, 0] and kept[1, 3] and kept.sum(-1).tolist() == [2, 2]


@settings(max_examples=100, deadline=None)
@given(values=st.lists(st.floats(-10, 10, allow_nan=False), min_size=2, max_size=30).filter(
    lambda v: max(v) - min(v) > 1e-3))
def test_temperature_sharpens_below_one_and_flattens_above(values):
    logits = torch.tensor(values, dtype=torch.float64)
    top = lambda t: apply_temperature(logits, t).softmax(-1).max().item()  # noqa: E731
    assert top(0.5) > top(1.0) > top(2.0)
    assert torch.equal(apply_temperature(logits, 1.0).argmax(), logits.argmax())


# -- config and stage -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [{"temperature": 0}, {"top_p": 0}, {"top_p": 1.5}, {"top_k": -1},
                                 {"max_new_tokens": 0}, {"stop": [""]}, {"batch_size": 0}, {"beams": 2}])
def test_decoding_config_rejects_bad_values(bad):
    with pytest.raises(ValidationError):
        DecodingConfig(**bad)


def test_generate_stage_writes_jsonl(models, tmp_path):
    model, tokenizer = models["llama"]
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    ctx = RunContext(run_dir=tmp_path / "run")
    cfg = GenerateStage(model=str(tmp_path / "m"), prompts=PROMPTS[:3], decoding={"max_new_tokens": 5})
    out = run_generate(cfg, ctx)
    rows = [json.loads(line) for line in open(out["generations"], encoding="utf-8")]
    assert out["generations"] == str(tmp_path / "run" / "generate" / "generations.jsonl")
    assert [r["prompt"] for r in rows] == PROMPTS[:3]
    assert [r["output"] for r in rows] == generate(model, tokenizer, PROMPTS[:3], cfg.decoding)
    assert rows[0]["settings"]["max_new_tokens"] == 5


@pytest.mark.parametrize("arch", ARCHS)
def test_decode_rows_says_why_each_row_ended_and_can_keep_the_eos(models, arch, make_model):
    from lmcycle.models.generate import decode_rows, encode_prompts

    model, tokenizer = models[arch]
    cfg = DecodingConfig(do_sample=True, max_new_tokens=5, seed=3)
    rows = encode_prompts(model, tokenizer, PROMPTS, cfg)
    ids, ends = decode_rows(model, tokenizer, rows, cfg)
    for row, end in zip(ids, ends, strict=True):
        assert (end == "length") == (len(row) == 5) and tokenizer.eos_token_id not in row
    assert ids == generate_ids(model, tokenizer, PROMPTS, cfg)

    eager = make_model(arch, tokenizer)  # a model that always says EOS first
    with torch.no_grad():
        eager.get_output_embeddings().bias = torch.nn.Parameter(torch.zeros(len(tokenizer)))
        eager.get_output_embeddings().bias[tokenizer.eos_token_id] = 1e4
    kept, ends = decode_rows(eager, tokenizer, rows[:2], cfg, keep_eos=True)
    assert ends == ["eos", "eos"] and kept == [[tokenizer.eos_token_id]] * 2
    assert decode_rows(eager, tokenizer, rows[:2], cfg)[0] == [[], []]
