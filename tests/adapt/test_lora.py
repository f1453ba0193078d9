"""LoRA: parameter counts, no-op start, frozen base, merge/unmerge, adapter switching, PEFT parity both ways."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from lmcycle.adapt.lora import (
    LoraConfig,
    add_lora,
    count_trainable,
    default_targets,
    load_lora,
    lora_layers,
    merge_lora,
    per_row_adapters,
    save_lora,
    set_active_adapter,
    unmerge_lora,
)
from lmcycle.config import validate
from lmcycle.errors import LmcycleError

VOCAB = 101


def tiny(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "llama":
        m = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    elif kind == "gpt2":
        m = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    else:
        m = T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                num_decoder_layers=2, num_heads=4, decoder_start_token_id=0))
    return m.eval()


def logits(model: nn.Module, rows: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (rows, 7), generator=g)
    with torch.no_grad():
        if getattr(model.config, "is_encoder_decoder", False):
            return model(input_ids=ids, decoder_input_ids=ids[:, :5]).logits
        return model(input_ids=ids).logits


def randomise_b(model: nn.Module, seed: int = 2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def test_course_parameter_count():
    layer = nn.Sequential()
    layer.add_module("proj", nn.Linear(64, 512, bias=False))  # W is 512 x 64
    add_lora(layer, LoraConfig(r=8, target_modules=["proj"]))
    trainable, total = count_trainable(layer)
    assert (trainable, total) == (8 * 64 + 512 * 8, 512 * 64)
    assert round(100 * (1 - trainable / total)) == 86


def test_defaults_and_counts_on_models():
    assert default_targets(tiny("llama")) == ["q_proj", "v_proj"]
    assert default_targets(tiny("gpt2")) == ["c_attn"]
    assert default_targets(tiny("t5")) == ["q", "v"]
    model = tiny("t5")
    before = sum(p.numel() for p in model.parameters())
    add_lora(model, LoraConfig(r=4))
    # T5 q and v: 2 per attention block; blocks: encoder self (2) + decoder self and cross (4).
    assert len(lora_layers(model)) == 2 * (2 + 4)
    trainable, total = count_trainable(model)
    assert total == before and trainable == 12 * (4 * 32 + 32 * 4)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "t5"])
def test_starts_as_noop_trains_only_adapter_and_merges(kind):
    model = tiny(kind)
    base_logits = logits(model)
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    add_lora(model, LoraConfig(r=4, alpha=8))
    assert torch.equal(logits(model), base_logits)
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    after = {n.replace(".base_layer", ""): p for n, p in model.named_parameters() if "lora_" not in n}
    assert after.keys() == base_weights.keys()
    assert all(torch.equal(after[n], base_weights[n]) for n in base_weights)
    adapted = logits(model)
    assert (adapted - base_logits).abs().max() > 1e-4  # training moved B off zero

    merge_lora(model)
    assert (logits(model) - adapted).abs().max() <= 1e-5
    assert any((after[n] - base_weights[n]).abs().max() > 0 for n in base_weights)  # merged into the weights
    unmerge_lora(model)
    assert all((after[n] - base_weights[n]).abs().max() <= 1e-6 for n in base_weights)
    assert (logits(model) - adapted).abs().max() <= 1e-5


def test_two_adapters_switch_and_disable():
    model = tiny("llama")
    base_logits = logits(model)
    add_lora(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), name="summarize")
    randomise_b(model, seed=5)
    add_lora(model, LoraConfig(r=2, target_modules=[r"layers\.0\..*_proj"]), name="translate")
    # Only the newest adapter trains.
    assert all(p.requires_grad == (".translate." in n) for n, p in model.named_parameters())
    randomise_b(model, seed=6)  # also re-randomises 'summarize'
    translate_logits = logits(model)
    set_active_adapter(model, "summarize")
    summarize_logits = logits(model)
    assert (summarize_logits - translate_logits).abs().max() > 1e-3
    assert (summarize_logits - base_logits).abs().max() > 1e-3
    set_active_adapter(model, None)
    assert torch.allclose(logits(model), base_logits, atol=1e-6)
    set_active_adapter(model, "translate")
    assert torch.equal(logits(model), translate_logits)
    with pytest.raises(LmcycleError, match="no LoRA adapter named 'chat'"):
        set_active_adapter(model, "chat")


@pytest.mark.parametrize("kind", ["llama", "gpt2", "t5"])
def test_per_row_adapters_give_each_row_its_adapters_output(kind):
    model = tiny(kind)
    add_lora(model, LoraConfig(r=4), name="a")
    add_lora(model, LoraConfig(r=2), name="b")
    randomise_b(model, seed=3)
    alone = {}
    for name in ("a", "b", None):
        set_active_adapter(model, name)
        alone[name] = logits(model, 3)  # (3, T, vocab)
    set_active_adapter(model, "a")
    # Contiguous rows per adapter (slices) and scattered ones (gather / scatter-add).
    for names in (["b", None, None], [None, "a", "a"], ["b", "b", "b"], ["a", None, "a"], ["b", "a", "b"]):
        with per_row_adapters(model, names):
            mixed = logits(model, 3)
        for row, name in enumerate(names):
            assert torch.allclose(mixed[row], alone[name][row], atol=1e-5), (names, row)
    assert torch.equal(logits(model, 3), alone["a"])  # the active adapter is back after the block
    with pytest.raises(LmcycleError, match=r"no LoRA adapter named \['c'\]"), per_row_adapters(model, ["a", "c"]):
        pass
    with pytest.raises(LmcycleError, match="set for 3 rows, the batch has 2"), per_row_adapters(model, ["a"] * 3):
        logits(model)
    assert all(layer.row_groups is None for layer in lora_layers(model).values())


@pytest.mark.parametrize("kind", ["llama", "gpt2", "t5"])
def test_ours_loads_in_peft(kind, tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny(kind)
    model = copy.deepcopy(base)
    add_lora(model, LoraConfig(r=4, alpha=12, use_rslora=kind == "t5"))
    randomise_b(model)
    save_lora(model, "default", tmp_path / "adapter", base_model_name_or_path="tiny")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] == (kind == "gpt2")
    assert config["modules_to_save"] is None and config["peft_type"] == "LORA"
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert (logits(theirs) - logits(model)).abs().max() <= 1e-5


@pytest.mark.parametrize("kind", ["llama", "gpt2", "t5"])
def test_peft_adapter_loads_in_ours(kind, tmp_path):
    peft = pytest.importorskip("peft")
    targets = {"llama": ["q_proj", "v_proj", "o_proj"], "gpt2": ["c_attn", "c_proj"], "t5": ["q", "v"]}[kind]
    theirs = peft.get_peft_model(tiny(kind), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=kind == "gpt2",
        task_type="SEQ_2_SEQ_LM" if kind == "t5" else "CAUSAL_LM")).eval()
    randomise_b(theirs)
    theirs.save_pretrained(tmp_path / "adapter")
    ours = load_lora(tiny(kind), tmp_path / "adapter")
    diff = (logits(ours) - logits(theirs)).abs().max()
    assert diff <= 1e-5
    assert (logits(ours) - logits(tiny(kind))).abs().max() > 1e-3  # the adapter really does something


def test_bad_input_leaves_model_untouched(tmp_path):
    model = tiny("llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}

    with pytest.raises(LmcycleError, match=r"no Linear/Conv1D module matches target_modules \['c_attn'\]"):
        add_lora(model, LoraConfig(r=4, target_modules=["c_attn"]))
    for r in (0, -2):
        with pytest.raises(LmcycleError, match="'r'"):
            validate(LoraConfig, {"r": r})
    with pytest.raises(LmcycleError, match="missing"):
        load_lora(model, tmp_path / "nowhere")

    # An adapter for a wider model: shapes do not fit.
    wide = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))
    add_lora(wide, LoraConfig(r=4))
    save_lora(wide, "default", tmp_path / "wide")
    with pytest.raises(LmcycleError, match="shape"):
        load_lora(model, tmp_path / "wide")

    # Unknown adapter type.
    save_lora(add_lora(tiny("llama"), LoraConfig(r=4)), "default", tmp_path / "other")
    cfg_file = tmp_path / "other" / "adapter_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "peft_type": "PROMPT_TUNING"}))
    with pytest.raises(LmcycleError, match="peft_type"):
        load_lora(model, tmp_path / "other")

    assert not lora_layers(model)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_regex_targets_save_exactly_for_peft(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny("llama")
    model = add_lora(copy.deepcopy(base), LoraConfig(r=2, target_modules=[r"layers\.0\..*_proj"]))
    randomise_b(model)
    save_lora(model, "default", tmp_path / "a")
    targets = json.loads((tmp_path / "a" / "adapter_config.json").read_text())["target_modules"]
    assert isinstance(targets, str) and "layers\\.1" not in targets  # layer 1 is not adapted by PEFT either
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "a").eval()
    assert sum("lora_A" in n for n, _ in theirs.named_parameters()) == len(lora_layers(model))
    assert (logits(theirs) - logits(model)).abs().max() <= 1e-5
    # Loading it back into a fresh model adapts the same layers.
    assert sorted(lora_layers(load_lora(tiny("llama"), tmp_path / "a"))) == sorted(lora_layers(model))


def test_settings_from_a_newer_peft_load_only_while_unset(tmp_path):
    model = add_lora(tiny("llama"), LoraConfig(r=4))
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B["default"].weight.normal_()
    save_lora(model, "default", tmp_path / "a")
    cfg_file = tmp_path / "a" / "adapter_config.json"
    saved = json.loads(cfg_file.read_text())

    # Unknown but unset (what a newer PEFT writes for a feature that is off): loads, same outputs.
    cfg_file.write_text(json.dumps({**saved, "some_future_option": None, "use_dora": False, "lora_bias": False}))
    loaded = load_lora(tiny("llama"), tmp_path / "a")
    ids = torch.tensor([[3, 5, 7, 9]])
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-6)

    # Set, it would change what the adapter computes: refused, naming the field, the model untouched.
    for key, value in (("some_future_option", 3), ("lora_bias", True), ("use_dora", True)):
        cfg_file.write_text(json.dumps({**saved, key: value}))
        target = tiny("llama")
        with pytest.raises(LmcycleError, match="unsupported") as err:
            load_lora(target, tmp_path / "a")
        assert err.value.field == key and not lora_layers(target)
