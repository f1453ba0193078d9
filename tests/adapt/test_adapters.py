"""Adapter folders: `lmcycle adapters list|merge|export`, and any stage's `model` taking an adapter folder."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from tiny_lm import save_tiny, tiny_llama, tiny_t5

from lmcycle.adapt.adapters import describe_adapter, find_adapters
from lmcycle.adapt.lora import LoraConfig, add_lora, lora_state_dict, save_lora
from lmcycle.artifacts import load_adapted, load_model
from lmcycle.cli import main
from lmcycle.errors import LmcycleError


def _trained_lora(model) -> None:
    """Give the adapter non-zero B so that merging changes the outputs."""
    add_lora(model, LoraConfig(r=4, alpha=8))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)


@pytest.fixture
def llama_adapter(tmp_path, tok):
    """A saved base model and a LoRA adapter for it inside a run-like folder; the adapted model's logits."""
    base_dir = save_tiny(tiny_llama(tok), tok, tmp_path / "run" / "pretrain" / "model")
    model, _ = load_model(base_dir)
    _trained_lora(model)
    adapter = save_lora(model, "default", tmp_path / "run" / "sft" / "adapter", base_model_name_or_path=base_dir)
    ids = torch.tensor([[5, 9, 13, 2, 7]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    params = sum(t.numel() for t in lora_state_dict(model).values())
    return {"base": base_dir, "adapter": adapter, "ids": ids, "logits": logits, "params": params}


def test_list_finds_adapters_in_a_run_and_counts_their_parameters(llama_adapter, tmp_path, capsys):
    assert find_adapters(tmp_path / "run") == [llama_adapter["adapter"]]
    info = describe_adapter(llama_adapter["adapter"])
    assert (info.method, info.params, info.settings["r"]) == ("lora", llama_adapter["params"], 4)
    assert main(["adapters", "list", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert str(llama_adapter["adapter"]) in out and f"{llama_adapter['params']:,}" in out


def test_merge_writes_a_plain_model_with_the_adapted_outputs(llama_adapter, tmp_path):
    out = tmp_path / "merged"
    assert main(["adapters", "merge", str(llama_adapter["adapter"]), "--out", str(out)]) == 0
    assert not (out / "adapter_config.json").exists() and (out / "config.json").exists()
    merged, _ = load_model(out)
    assert not any("lora" in k for k in merged.state_dict())
    with torch.no_grad():
        diff = (merged(input_ids=llama_adapter["ids"]).logits - llama_adapter["logits"]).abs().max()
    assert diff <= 1e-5


def test_a_stage_model_may_be_an_adapter_folder_even_after_the_run_moved(llama_adapter, tmp_path):
    moved = tmp_path / "elsewhere" / "run"
    shutil.move(str(tmp_path / "run"), moved)  # the recorded absolute base path no longer exists
    model, _ = load_model(moved / "sft" / "adapter")
    with torch.no_grad():
        diff = (model(input_ids=llama_adapter["ids"]).logits - llama_adapter["logits"]).abs().max()
    assert diff <= 1e-5


def test_export_rewrites_the_base_and_peft_loads_the_export(llama_adapter, tmp_path):
    peft = pytest.importorskip("peft")
    out = tmp_path / "export"
    assert main(["adapters", "export", str(llama_adapter["adapter"]), "--out", str(out),
                 "--base-model-name", llama_adapter["base"]]) == 0
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == llama_adapter["base"]
    assert "library_name: peft" in (out / "README.md").read_text()
    base, _ = load_model(llama_adapter["base"])
    peft_model = peft.PeftModel.from_pretrained(base, str(out))
    with torch.no_grad():
        diff = (peft_model(input_ids=llama_adapter["ids"]).logits - llama_adapter["logits"]).abs().max()
    assert diff <= 1e-5


def test_unmerged_load_keeps_the_adapter_switchable(tmp_path, t5_tok):
    base_dir = save_tiny(tiny_t5(t5_tok), t5_tok, tmp_path / "base")
    model, _ = load_model(base_dir)
    _trained_lora(model)
    adapter = save_lora(model, "default", tmp_path / "adapter", base_model_name_or_path=base_dir)
    loaded, _ = load_adapted(adapter, merge=False)
    assert any("lora_A" in k for k in loaded.state_dict())
    ids, dec = torch.tensor([[4, 8, 15, 1]]), torch.tensor([[0, 6, 9]])
    with torch.no_grad():
        want = model(input_ids=ids, decoder_input_ids=dec).logits
        assert (loaded(input_ids=ids, decoder_input_ids=dec).logits - want).abs().max() <= 1e-5


def test_bad_adapter_folders_give_one_clear_error(llama_adapter, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(llama_adapter["adapter"], broken)
    cfg = json.loads((broken / "adapter_config.json").read_text())
    (broken / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    with pytest.raises(LmcycleError, match="peft_type 'IA3' is not supported"):
        describe_adapter(broken)
    (broken / "adapter_model.safetensors").unlink()
    assert main(["adapters", "merge", str(broken), "--out", str(tmp_path / "m")]) == 1
    assert "adapter_model.safetensors is missing" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
    assert main(["adapters", "list", str(tmp_path / "nothing")]) == 1
    assert main(["adapters", "merge", str(llama_adapter["adapter"]), "--base", str(tmp_path / "nope"),
                 "--out", str(tmp_path / "m")]) == 1
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "m").exists()


def test_a_soft_prompt_is_listed_and_loaded_but_never_merged(tmp_path, tok, capsys):
    from lmcycle.adapt.prompt_tuning import (
        PromptTunedModel,
        PromptTuningConfig,
        add_prompt_tuning,
        save_prompt_tuning,
    )

    base_dir = save_tiny(tiny_llama(tok), tok, tmp_path / "base")
    base, _ = load_model(base_dir)
    prompted = add_prompt_tuning(base, PromptTuningConfig(num_virtual_tokens=5))
    adapter = save_prompt_tuning(prompted, tmp_path / "pt", base_model_name_or_path=base_dir)
    info = describe_adapter(adapter)
    assert (info.method, info.params, info.settings["num_virtual_tokens"]) == ("prompt_tuning", 5 * 32, 5)
    loaded, _ = load_model(adapter)
    assert isinstance(loaded, PromptTunedModel) and torch.equal(loaded.prompt_embeddings, prompted.prompt_embeddings)
    assert main(["adapters", "merge", str(adapter), "--out", str(tmp_path / "m")]) == 1
    assert "cannot be merged" in capsys.readouterr().err and not (tmp_path / "m").exists()
