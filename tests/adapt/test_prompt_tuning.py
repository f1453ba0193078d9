"""Prompt tuning: frozen base, training moves only the prompt, PEFT parity both ways, decoding with padding."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from tiny_lm import make_tokenizer, save_tiny, tiny_gpt2, tiny_llama, tiny_t5

from lmcycle.adapt.prompt_tuning import (
    PromptTunedModel,
    PromptTuningConfig,
    add_prompt_tuning,
    count_trainable,
    load_prompt_tuning,
    save_prompt_tuning,
    unwrap,
)
from lmcycle.config import validate
from lmcycle.errors import LmcycleError
from lmcycle.models.generate import DecodingConfig, generate, generate_ids, logit_stream
from lmcycle.models.kv_cache import cache_of
from lmcycle.train.checkpoint import load_checkpoint, save_checkpoint
from lmcycle.train.loop import lm_loss_sum

V = 3
BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "t5": tiny_t5}


@pytest.fixture(scope="module")
def toks(tok, t5_tok):
    return {"llama": tok, "gpt2": tok, "t5": t5_tok}


def wrapped(kind: str, toks, v: int = V, seed: int = 1) -> PromptTunedModel:
    base = BUILDERS[kind](toks[kind]).eval()  # seeds torch itself
    torch.manual_seed(seed)  # the random prompt
    return add_prompt_tuning(base, PromptTuningConfig(num_virtual_tokens=v))


def batch(tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    """Right-padded ids and mask (B, T)."""
    rows = [tokenizer(t)["input_ids"] for t in texts]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return {"input_ids": ids, "attention_mask": mask}


TEXTS = ["the cat sees the dog and the sun .", "red moon"]


def our_and_peft_logits(ours, theirs, tokenizer, v: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits of both on the same padded batch (PEFT's virtual positions cut off) and the real-token mask.

    Both also get labels; their losses (the base model's own) must agree too.
    """
    b = batch(tokenizer, TEXTS)
    with torch.no_grad():
        if ours.config.is_encoder_decoder:
            dec = torch.tensor([[0, 5, 9, 11], [0, 7, 8, 2]])
            a, p = (m(**b, decoder_input_ids=dec, labels=dec) for m in (ours, theirs))
            real = torch.ones(dec.shape, dtype=torch.bool)
        else:
            labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
            a, p = (m(**b, labels=labels) for m in (ours, theirs))
            assert a.logits.shape[:2] == b["input_ids"].shape  # the caller's positions only
            assert p.logits.shape[1] == a.logits.shape[1] + v
            p.logits, real = p.logits[:, v:], b["attention_mask"].bool()
    assert abs(float(a.loss) - float(p.loss)) <= 1e-5
    return a.logits, p.logits, real


# -- config and wrapping ------------------------------------------------------------------------------------
def test_config_validation_names_the_field():
    with pytest.raises(LmcycleError, match="init_text"):
        validate(PromptTuningConfig, {"init": "text"})
    with pytest.raises(LmcycleError, match="num_virtual_tokens"):
        validate(PromptTuningConfig, {"num_virtual_tokens": 0})
    assert validate(PromptTuningConfig, {"init": "text", "init_text": "hi"}).init_text == "hi"


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_only_the_prompt_trains(kind, toks):
    m = wrapped(kind, toks, v=4)
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable == ["prompt_embeddings"]
    submodules = 2 if kind == "t5" else 1
    assert m.prompt_embeddings.shape == (4 * submodules, 32)
    n_trainable, n_base = count_trainable(m)
    assert n_trainable == 4 * submodules * 32
    assert n_base == sum(p.numel() for p in unwrap(m).parameters())
    assert unwrap(m) is m.base_model and m.config is m.base_model.config
    assert m.get_input_embeddings() is m.base_model.get_input_embeddings()
    with pytest.raises(LmcycleError, match="already"):
        add_prompt_tuning(m, PromptTuningConfig())


@pytest.mark.parametrize("kind", ["llama", "gpt2", "t5"])
def test_training_lowers_loss_and_leaves_base_untouched(kind, toks):
    m = wrapped(kind, toks)
    before = {k: v.clone() for k, v in m.base_model.state_dict().items()}
    tokenizer = toks[kind]
    b = batch(tokenizer, TEXTS)
    labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
    if kind == "t5":
        labels = batch(tokenizer, ["sun", "the moon"])["input_ids"]
        labels = labels.masked_fill(labels == 0, -100)
    b["labels"] = labels
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=0.1)
    m.train()
    losses = []
    for _ in range(8):
        loss, n = lm_loss_sum(m, b)
        (loss / n).backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach() / n))
    # A random tiny base predicts nearly uniformly, so a prompt moves the loss little, but steadily.
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
    assert losses[-1] < losses[0] - 0.01
    for k, v in m.base_model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_checkpoint_round_trip(tmp_path, toks):
    m = wrapped("llama", toks)
    opt = torch.optim.AdamW([m.prompt_embeddings])
    save_checkpoint(tmp_path, 1, m, opt)
    other = wrapped("llama", toks, seed=7)
    assert not torch.equal(other.prompt_embeddings, m.prompt_embeddings)
    load_checkpoint(tmp_path / "checkpoints" / "step-1", other, torch.optim.AdamW([other.prompt_embeddings]))
    assert torch.equal(other.prompt_embeddings, m.prompt_embeddings)


# -- init ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_text_init_is_the_token_embeddings_repeated(kind, toks):
    tokenizer = toks[kind]
    base = BUILDERS[kind](tokenizer)
    ids = tokenizer("red moon")["input_ids"]
    v = len(ids) + 2  # longer than the text: the ids repeat
    m = add_prompt_tuning(base, PromptTuningConfig(num_virtual_tokens=v, init="text", init_text="red moon"), tokenizer)
    rows = v * (2 if kind == "t5" else 1)
    want_ids = (ids * rows)[:rows]
    assert torch.equal(m.prompt_embeddings.data, base.get_input_embeddings().weight[want_ids].float())
    short = add_prompt_tuning(BUILDERS[kind](tokenizer),
                              PromptTuningConfig(num_virtual_tokens=1, init="text", init_text="red moon"), tokenizer)
    assert torch.equal(short.prompt_embeddings.data[0], base.get_input_embeddings().weight[ids[0]])
    with pytest.raises(LmcycleError, match="tokenizer"):
        add_prompt_tuning(BUILDERS[kind](tokenizer), PromptTuningConfig(init="text", init_text="x"))


def test_text_init_matches_peft(tmp_path, toks):
    tokenizer = toks["llama"]
    tok_dir = save_tiny(tiny_llama(tokenizer), tokenizer, tmp_path / "base")
    text = "the cat sees the dog"
    theirs = peft.get_peft_model(tiny_llama(tokenizer), peft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=9, prompt_tuning_init="TEXT", prompt_tuning_init_text=text,
        tokenizer_name_or_path=tok_dir))
    ours = add_prompt_tuning(tiny_llama(tokenizer), PromptTuningConfig(num_virtual_tokens=9, init="text",
                                                                       init_text=text), tokenizer)
    assert torch.equal(ours.prompt_embeddings.data, theirs.prompt_encoder["default"].embedding.weight.data)


# -- PEFT parity --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "gpt2", "t5"])
def test_peft_loads_our_adapter(kind, toks, tmp_path):
    ours = wrapped(kind, toks)
    out = save_prompt_tuning(ours, tmp_path / "pt", base_model_name_or_path="tiny")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["token_dim"] == 32
    assert config["num_transformer_submodules"] == (2 if kind == "t5" else 1)
    theirs = peft.PeftModel.from_pretrained(BUILDERS[kind](toks[kind]).eval(), str(out))
    a, p, real = our_and_peft_logits(ours, theirs, toks[kind], V)
    assert (a - p)[real].abs().max() <= 1e-5
    assert not ours.training and (out / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("kind", ["llama", "gpt2", "t5"])
def test_peft_saved_adapter_loads_into_ours(kind, toks, tmp_path):
    torch.manual_seed(3)
    task = "SEQ_2_SEQ_LM" if kind == "t5" else "CAUSAL_LM"
    theirs = peft.get_peft_model(BUILDERS[kind](toks[kind]).eval(),
                                 peft.PromptTuningConfig(task_type=task, num_virtual_tokens=V))
    with torch.no_grad():
        theirs.prompt_encoder["default"].embedding.weight.normal_(0, 2)
    theirs.save_pretrained(tmp_path / "pt")
    ours = load_prompt_tuning(BUILDERS[kind](toks[kind]).eval(), tmp_path / "pt")
    assert torch.equal(ours.prompt_embeddings.data, theirs.prompt_encoder["default"].embedding.weight.data)
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == ["prompt_embeddings"]
    theirs.eval()
    a, p, real = our_and_peft_logits(ours, theirs, toks[kind], V)
    assert (a - p)[real].abs().max() <= 1e-5


def test_text_init_is_recorded_for_peft(toks, tmp_path):
    tokenizer = toks["llama"]
    tok_dir = save_tiny(tiny_llama(tokenizer), tokenizer, tmp_path / "base")
    m = add_prompt_tuning(tiny_llama(tokenizer), PromptTuningConfig(num_virtual_tokens=2, init="text",
                                                                    init_text="red moon"), tokenizer)
    with_tok = json.loads((save_prompt_tuning(m, tmp_path / "a", tokenizer_name_or_path=tok_dir)
                           / "adapter_config.json").read_text())
    assert (with_tok["prompt_tuning_init"], with_tok["prompt_tuning_init_text"]) == ("TEXT", "red moon")
    # Without a tokenizer path PEFT would refuse TEXT, so RANDOM is written; PEFT still loads it.
    bare = save_prompt_tuning(m, tmp_path / "b")
    assert json.loads((bare / "adapter_config.json").read_text())["prompt_tuning_init"] == "RANDOM"
    for d in (tmp_path / "a", bare):
        theirs = peft.PeftModel.from_pretrained(tiny_llama(tokenizer), str(d))
        assert torch.equal(theirs.prompt_encoder["default"].embedding.weight.data, m.prompt_embeddings.data)


# -- decoding -----------------------------------------------------------------------------------------------
def stream_logits(model, rows: list[list[int]], steps: int = 4) -> list[torch.Tensor]:
    """Next-token logits (B, vocab) of ``steps`` greedy steps of lmcycle's decoding loop."""
    out = []
    with torch.no_grad():
        stream = logit_stream(model, rows, pad_id=0)
        logits = next(stream)
        for _ in range(steps):
            out.append(logits)
            logits = stream.send(logits.argmax(-1))
        stream.close()
    return out


@pytest.mark.parametrize("kind", ["llama", "gpt2", "t5"])
def test_padded_batch_decodes_like_the_prompt_alone(kind, toks):
    m = wrapped(kind, toks)
    tokenizer = toks[kind]
    short, long = (tokenizer(t)["input_ids"] for t in ("red moon", "the cat sees the dog and the sun"))
    alone = stream_logits(m, [short])
    padded = stream_logits(m, [long, short])
    for a, p in zip(alone, padded, strict=True):
        assert torch.allclose(a[0], p[1], atol=1e-5)
    base_first = stream_logits(unwrap(m), [short], steps=1)[0]
    assert (base_first - alone[0]).abs().max() > 1e-2  # the prompt changes what the model predicts
    cfg = DecodingConfig(max_new_tokens=6)
    prompts = ["red moon", "the cat sees the dog and the sun"]
    assert generate(m, tokenizer, prompts, cfg)[0] == generate(m, tokenizer, prompts[:1], cfg)[0]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_cached_decoding_equals_a_full_forward(kind, toks):
    """Each step of the cached, left-padded decoding loop predicts what one uncached forward pass over the
    prompt plus the tokens chosen so far predicts (that forward is PEFT's, see the parity tests)."""
    m = wrapped(kind, toks)
    tokenizer = toks[kind]
    short, long = (tokenizer(t)["input_ids"] for t in ("red moon", "the cat sees the dog and the sun"))
    steps = stream_logits(m, [long, short])
    seq = list(short)
    for logits in steps:
        with torch.no_grad():
            full = m(input_ids=torch.tensor([seq])).logits[0, -1]
        assert torch.allclose(logits[1], full, atol=1e-5)
        seq.append(int(logits[1].argmax()))


@pytest.mark.parametrize("kind", ["llama", "t5"])
@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_a_cache_under_either_name_continues_the_prompted_sequence(kind, name, toks):
    """transformers 5.24 calls the cache ``cache``, older versions and PEFT ``past_key_values``: one decoding
    step from a prefill's cache, passed under either name, predicts what an uncached forward predicts."""
    m = wrapped(kind, toks)
    ids = torch.tensor([toks[kind]("the cat sees the dog")["input_ids"]])
    with torch.no_grad():
        if kind == "t5":
            start = torch.tensor([[0]])
            first = m(input_ids=ids, decoder_input_ids=start, use_cache=True)
            cached = cache_of(first).get_seq_length()
            nxt = first.logits[:, -1].argmax(-1, keepdim=True)
            step = m(input_ids=ids, decoder_input_ids=nxt, use_cache=True, **{name: cache_of(first)})
            full = m(input_ids=ids, decoder_input_ids=torch.cat([start, nxt], 1)).logits[0, -1]
        else:
            first = m(input_ids=ids, use_cache=True)
            cached = cache_of(first).get_seq_length()  # the cache grows in place
            nxt = first.logits[:, -1].argmax(-1, keepdim=True)
            step = m(input_ids=nxt, attention_mask=torch.ones(1, ids.shape[1] + 1, dtype=torch.long),
                     use_cache=True, **{name: cache_of(first)})
            full = m(input_ids=torch.cat([ids, nxt], 1)).logits[0, -1]
    assert cache_of(step).get_seq_length() == cached + 1
    assert torch.allclose(step.logits[0, -1], full, atol=1e-5)


def sharpen(model) -> None:
    """Scale the attention outputs of a random tiny model up: otherwise each token's own embedding dominates the
    residual stream and greedy decoding repeats the input whatever the context (prompt included)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "SelfAttention.o.weight", "EncDecAttention.o.weight")):
                p.mul_(30)


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_generation_in_a_batch_equals_alone_and_differs_from_base(kind, toks):
    tokenizer = toks[kind]
    base = BUILDERS[kind](tokenizer).eval()
    sharpen(base)
    torch.manual_seed(2)
    m = add_prompt_tuning(base, PromptTuningConfig(num_virtual_tokens=V))
    with torch.no_grad():
        m.prompt_embeddings.normal_(0, 10)
    cfg = DecodingConfig(max_new_tokens=8)
    prompts = ["the cat sees", "red moon and the", "the dog"]
    alone = [generate_ids(m, tokenizer, [p], cfg)[0] for p in prompts]
    assert generate_ids(m, tokenizer, prompts, cfg) == alone
    assert all(len(ids) == 8 for ids in alone)  # no early EOS: the comparison covers every step
    assert alone != generate_ids(base, tokenizer, prompts, cfg)


# -- bad adapters -------------------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path, toks):
    return save_prompt_tuning(wrapped("llama", toks), tmp_path / "pt")


def edit_config(path, **changes):
    f = path / "adapter_config.json"
    config = json.loads(f.read_text())
    config.update(changes)
    f.write_text(json.dumps(config))


@pytest.mark.parametrize("missing", ["adapter_config.json", "adapter_model.safetensors"])
def test_missing_files(saved, toks, missing):
    (saved / missing).unlink()
    with pytest.raises(LmcycleError, match=missing):
        load_prompt_tuning(tiny_llama(toks["llama"]), saved)


@pytest.mark.parametrize(("changes", "field"), [
    ({"peft_type": "LORA"}, "peft_type"),
    ({"num_virtual_tokens": 0}, "num_virtual_tokens"),
    ({"num_virtual_tokens": 5}, "prompt_embeddings"),  # the tensor no longer matches the config
    ({"token_dim": 48}, "token_dim"),
    ({"task_type": "SEQ_2_SEQ_LM"}, "task_type"),
    ({"num_transformer_submodules": 2}, "num_transformer_submodules"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"some_future_option": "on"}, "some_future_option"),
])
def test_bad_config_is_rejected_before_any_change(saved, toks, changes, field):
    edit_config(saved, **changes)
    base = tiny_llama(toks["llama"])
    with pytest.raises(LmcycleError, match=f"field '{field}'") as e:
        load_prompt_tuning(base, saved)
    assert "adapter_" in str(e.value)  # names the file
    assert all(p.requires_grad for p in base.parameters())


def test_unset_unknown_keys_are_tolerated(saved, toks):
    edit_config(saved, some_future_option=None, peft_version="0.99", auto_mapping=None)
    m = load_prompt_tuning(tiny_llama(toks["llama"]), saved)
    assert m.prompt_embeddings.shape == (V, 32)


def test_adapter_for_a_different_base(tmp_path, toks):
    """An adapter saved on a 48-wide model does not fit a 32-wide one."""
    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    from transformers import LlamaConfig, LlamaForCausalLM
    wide = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    path = save_prompt_tuning(add_prompt_tuning(wide, PromptTuningConfig(num_virtual_tokens=2)), tmp_path / "w")
    with pytest.raises(LmcycleError, match="token_dim.*hidden size is 32"):
        load_prompt_tuning(tiny_llama(toks["llama"]), path)


def test_corrupt_weights_and_wrong_tensor(saved, toks):
    from safetensors.torch import save_file
    save_file({"prompt_embeddings": torch.full((V, 32), float("nan"))}, str(saved / "adapter_model.safetensors"))
    with pytest.raises(LmcycleError, match="finite"):
        load_prompt_tuning(tiny_llama(toks["llama"]), saved)
    save_file({"other": torch.zeros(V, 32)}, str(saved / "adapter_model.safetensors"))
    with pytest.raises(LmcycleError, match="prompt_embeddings"):
        load_prompt_tuning(tiny_llama(toks["llama"]), saved)
    (saved / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(LmcycleError, match="cannot read"):
        load_prompt_tuning(tiny_llama(toks["llama"]), saved)
    (saved / "adapter_config.json").write_text("{")
    with pytest.raises(LmcycleError, match="JSON"):
        load_prompt_tuning(tiny_llama(toks["llama"]), saved)


def test_save_needs_a_prompt_tuned_model(tmp_path, toks):
    with pytest.raises(LmcycleError, match="no soft prompt"):
        save_prompt_tuning(tiny_llama(toks["llama"]), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_virtual_tokens_take_positions_of_a_decoders_context_window(toks):
    from lmcycle.models.load import context_window

    model = tiny_llama(toks["llama"])
    window = context_window(model, toks["llama"])
    wrapped = add_prompt_tuning(model, PromptTuningConfig(num_virtual_tokens=7))
    assert context_window(wrapped, toks["llama"]) == window - 7
