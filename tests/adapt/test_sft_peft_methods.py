"""The sft stage with `peft: {method: qlora}` and `{method: prompt_tuning}`: what trains, what is saved, and
that later stages load the result (an adapter folder is a model reference like any other)."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import tiny_lm
import torch
from safetensors.torch import load_file
from test_sft_stage import context, held_out_loss

from lmcycle.adapt.prompt_tuning import PromptTunedModel
from lmcycle.artifacts import load_model
from lmcycle.config import validate
from lmcycle.stages.eval import EvalStage, run_eval
from lmcycle.stages.sft import SftStage, run_sft


def sft_cfg(peft_cfg: dict, lr: float) -> SftStage:
    return validate(SftStage, {"data": [{"dataset": "reverse"}], "max_len": 64, "eval_data": "dev", "peft": peft_cfg,
                               "train": {"max_steps": 20, "batch_size": 8, "lr": lr, "eval_every": 10}})


@pytest.mark.parametrize(("arch", "bits"), [("llama", 4), ("t5", 8)])
def test_qlora_stage_trains_over_a_quantized_base_and_merges_into_full_precision(arch, bits, tok, t5_tok,
                                                                                  tmp_path):
    seq2seq = arch == "t5"
    tokenizer = t5_tok if seq2seq else tok
    ctx = context(tmp_path, tiny_lm.tiny_t5(tokenizer) if seq2seq else tiny_lm.tiny_llama(tokenizer), tokenizer)
    base_dir = ctx.artifact("build", "model")
    produced = run_sft(sft_cfg({"method": "qlora", "bits": bits, "r": 4, "alpha": 8}, lr=1e-2), ctx)

    rows = ctx.read_metrics("sft")
    quantize = next(r for r in rows if r.get("event") == "quantize")
    assert quantize["bits"] == bits and quantize["bytes_after"] < quantize["bytes_before"] / (3 if bits == 8 else 6)
    logged = next(r for r in rows if r.get("event") == "peft")
    base_params = sum(t.numel() for t in load_file(str(Path(base_dir) / "model.safetensors")).values())
    assert logged["method"] == "qlora" and logged["total_params"] == base_params
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert evals[-1] < evals[0]

    # The merged model is a plain full-precision model with the base's keys and dtype, and it is what
    # full-precision base + adapter compute (merging never touched quantized weights).
    merged_sd = load_file(str(Path(produced["model"]) / "model.safetensors"))
    assert set(merged_sd) == set(load_file(str(Path(base_dir) / "model.safetensors")))
    assert all(t.dtype == torch.float32 for t in merged_sd.values())
    merged, _ = load_model(produced["model"])
    base, _ = load_model(base_dir)
    with_adapter = peft.PeftModel.from_pretrained(base, produced["adapter"]).eval()
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(3))
    extra = {"decoder_input_ids": ids[:, :4]} if seq2seq else {}
    with torch.no_grad():
        diff = (merged(input_ids=ids, **extra).logits - with_adapter(input_ids=ids, **extra).logits).abs().max()
    assert diff <= 1e-5


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_prompt_tuning_stage_saves_a_soft_prompt_that_eval_loads_with_its_base(arch, tok, t5_tok, tmp_path):
    seq2seq = arch == "t5"
    tokenizer = t5_tok if seq2seq else tok
    ctx = context(tmp_path, tiny_lm.tiny_t5(tokenizer) if seq2seq else tiny_lm.tiny_llama(tokenizer), tokenizer)
    base_dir = ctx.artifact("build", "model")
    produced = run_sft(sft_cfg({"method": "prompt_tuning", "num_virtual_tokens": 8, "init": "text",
                                "init_text": "reverse the words"}, lr=3e-2), ctx)

    # Nothing to merge: the stage's model is the adapter folder, in PEFT's format, and the base is untouched.
    assert produced["model"] == produced["adapter"]
    config = json.loads((Path(produced["adapter"]) / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["num_virtual_tokens"] == 8
    assert Path(config["base_model_name_or_path"]).resolve() == Path(base_dir).resolve()
    rows = ctx.read_metrics("sft")
    logged = next(r for r in rows if r.get("event") == "peft")
    assert logged["trainable_params"] == 8 * tiny_lm.tiny_llama(tok).config.hidden_size * (2 if seq2seq else 1)
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert evals[-1] < evals[0]
    assert any(r.get("event") == "train_end" for r in rows)

    # load_model(adapter folder) gives base + prompt; its held-out loss is the one training logged.
    model, _ = load_model(produced["model"])
    assert isinstance(model, PromptTunedModel)
    assert held_out_loss(model, tokenizer, ctx.dataset("dev"), seq2seq) == pytest.approx(evals[-1], rel=1e-4)

    # An eval stage scores it through `model: latest`, like any other model.
    ctx.add_artifacts("sft", produced)
    ctx._datasets["test"] = tiny_lm.examples(6, seed=11)
    out = run_eval(validate(EvalStage, {"data": "test", "decoding": {"max_new_tokens": 6}}), ctx)
    result = json.loads(Path(out["eval"]).read_text())
    assert result["metrics"]["n"] == 6 and result["settings"]["model"] == produced["model"]
