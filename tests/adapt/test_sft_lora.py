"""SFT with LoRA: it learns, trains only the adapters, saves a PEFT-loadable adapter and a plain merged model."""

from __future__ import annotations

import shutil
from pathlib import Path

import peft
import pytest
import tiny_lm
import torch
from safetensors.torch import load_file
from test_sft_stage import context, held_out_loss
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from lmcycle.adapt.lora import LoraConfig, add_lora, count_trainable
from lmcycle.config import validate
from lmcycle.errors import LmcycleError
from lmcycle.stages.sft import SftStage, run_sft


def lora_cfg(max_steps: int, **train) -> SftStage:
    return validate(SftStage, {"data": [{"dataset": "reverse"}], "max_len": 64, "eval_data": "dev",
                               "peft": {"method": "lora", "r": 4, "alpha": 8},
                               "train": {"max_steps": max_steps, "batch_size": 8, "lr": 1e-2, **train}})


def sample_logits(model, seq2seq: bool) -> torch.Tensor:
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        if seq2seq:
            return model(input_ids=ids, decoder_input_ids=ids[:, :5]).logits
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_lora_sft_learns_and_saves_adapter_and_plain_merged_model(arch, tok, t5_tok, tmp_path):
    seq2seq = arch == "t5"
    tokenizer = t5_tok if seq2seq else tok
    model = tiny_lm.tiny_t5(tokenizer) if seq2seq else tiny_lm.tiny_llama(tokenizer)
    ctx = context(tmp_path, model, tokenizer)
    base_dir = ctx.artifact("build", "model")
    before = held_out_loss(model, tokenizer, ctx.dataset("dev"), seq2seq)
    produced = run_sft(lora_cfg(30, eval_every=15), ctx)

    metrics = ctx.read_metrics("sft")
    evals = [m["eval_loss"] for m in metrics if "eval_loss" in m]
    assert len(evals) == 2 and evals[-1] < evals[0] < before

    auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    base = auto.from_pretrained(base_dir).eval()
    merged = auto.from_pretrained(produced["model"]).eval()
    # The merged model is a plain one: exactly the base's tensors, no adapter keys left behind.
    merged_keys = set(load_file(str(Path(produced["model"]) / "model.safetensors")))
    assert not [k for k in merged_keys if "lora_" in k or "base_layer" in k]
    assert merged_keys == set(load_file(str(Path(base_dir) / "model.safetensors")))
    assert held_out_loss(merged, tokenizer, ctx.dataset("dev"), seq2seq) == pytest.approx(evals[-1], rel=1e-4)

    # Only the adapted projections moved; every other base weight is bit-identical to the base model.
    base_sd, merged_sd = base.state_dict(), merged.state_dict()
    targets = ("q", "v") if seq2seq else ("q_proj", "v_proj")
    adapted = [k for k in base_sd if k.split(".")[-2] in targets]
    assert adapted and all(not torch.equal(base_sd[k], merged_sd[k]) for k in adapted)
    assert all(torch.equal(base_sd[k], merged_sd[k]) for k in base_sd if k not in adapted)

    # PEFT applies the saved adapter to the base and gets the merged model's logits.
    with_adapter = peft.PeftModel.from_pretrained(auto.from_pretrained(base_dir), produced["adapter"]).eval()
    torch.testing.assert_close(sample_logits(with_adapter, seq2seq), sample_logits(merged, seq2seq),
                               atol=1e-5, rtol=1e-5)

    logged = next(m for m in metrics if m.get("event") == "peft")
    trainable, total = count_trainable(add_lora(auto.from_pretrained(base_dir), LoraConfig(r=4, alpha=8)))
    assert (logged["trainable_params"], logged["total_params"]) == (trainable, total)
    assert 0 < logged["trainable_percent"] < 100


def test_lora_sft_resumes_from_a_checkpoint_to_the_same_result(tok, tmp_path):
    ctx = context(tmp_path, tiny_lm.tiny_llama(tok), tok)
    cfg = lora_cfg(4, save_every=2, keep_checkpoints=2, log_every=1)
    produced = run_sft(cfg, ctx)
    straight = load_file(str(Path(produced["model"]) / "model.safetensors"))
    adapter = load_file(str(Path(produced["adapter"]) / "adapter_model.safetensors"))

    # As if killed after step 2: the last checkpoint and the outputs are gone; the rerun resumes at step 2.
    stage_dir = ctx.stage_dir("sft")
    for d in (stage_dir / "checkpoints" / "step-4", Path(produced["model"]), Path(produced["adapter"])):
        shutil.rmtree(d)
    again = run_sft(cfg, ctx)
    resumed = load_file(str(Path(again["model"]) / "model.safetensors"))
    assert set(resumed) == set(straight) and all(torch.equal(resumed[k], straight[k]) for k in straight)
    readapter = load_file(str(Path(again["adapter"]) / "adapter_model.safetensors"))
    assert all(torch.equal(readapter[k], adapter[k]) for k in adapter)
    steps = [m["step"] for m in ctx.read_metrics("sft") if "loss" in m]
    assert steps == [1, 2, 3, 4]  # the rerun started after step 2 and replaced the rows of steps 3-4


def test_full_sft_without_peft_saves_no_adapter(tok, tmp_path):
    ctx = context(tmp_path, tiny_lm.tiny_llama(tok), tok)
    cfg = validate(SftStage, {"data": [{"dataset": "reverse"}], "max_len": 64, "train": {"max_steps": 1}})
    assert cfg.peft is None
    produced = run_sft(cfg, ctx)
    assert set(produced) == {"model"} and not (ctx.stage_dir("sft") / "adapter").exists()


@pytest.mark.parametrize(("peft_cfg", "field"), [({"r": 0}, "peft.r"), ({"method": "dora"}, "peft.method"),
                                                  ({"rank": 4}, "peft.rank")])
def test_bad_peft_settings_are_config_errors_naming_the_field(peft_cfg, field):
    with pytest.raises(LmcycleError) as err:
        validate(SftStage, {"data": [{"dataset": "d"}], "peft": peft_cfg, "train": {"max_steps": 1}})
    assert err.value.field == field
