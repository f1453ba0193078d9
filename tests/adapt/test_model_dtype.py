"""``model_dtype``: a 16-bit frozen base under float32 adapters (and their AdamW state), bfloat16 full fine-tuning,
the saved artifacts' dtypes, and the recipe's checks of a dtype the device or the stage cannot use."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import tiny_lm
import torch
from safetensors import safe_open
from test_sft_stage import context
from transformers import AutoModelForCausalLM

import lmcycle.stages.sft as sft_module
import lmcycle.train.loop as loop_module
from lmcycle.adapt.prompt_tuning import PromptTunedModel
from lmcycle.align.ppo import PolicyWithValue
from lmcycle.align.reward import load_reward_backbone
from lmcycle.artifacts import load_adapted, load_model
from lmcycle.config import validate
from lmcycle.errors import LmcycleError
from lmcycle.models.load import dtype_problem
from lmcycle.stages.common import model_dtype
from lmcycle.stages.distill import DistillStage, run_distill
from lmcycle.stages.eval import EvalStage, run_eval
from lmcycle.stages.generate import GenerateStage, run_generate
from lmcycle.stages.recipe import load_recipe
from lmcycle.stages.sft import SftStage, run_sft


def sft_cfg(max_steps: int, peft_cfg: dict | None, dtype: str = "bfloat16", lr: float = 1e-2) -> SftStage:
    return validate(SftStage, {"data": [{"dataset": "reverse"}], "max_len": 64, "model_dtype": dtype,
                               **({"peft": peft_cfg} if peft_cfg else {}),
                               "train": {"max_steps": max_steps, "batch_size": 8, "lr": lr, "log_every": 1}})


@pytest.fixture
def captured(monkeypatch):
    """What run_sft trained, as it was after the last step (before a LoRA merge): ``params`` (name -> (dtype,
    requires_grad)), ``moments`` (name -> the dtypes of AdamW's exp_avg / exp_avg_sq) and ``model``."""
    seen = {}
    real_train, real_optimizer = sft_module.train, loop_module.make_optimizer

    def train(model, *args, **kwargs):
        result = real_train(model, *args, **kwargs)
        names = {id(p): n for n, p in model.named_parameters()}
        seen["params"] = {n: (p.dtype, p.requires_grad) for n, p in model.named_parameters()}
        seen["moments"] = {names[id(p)]: {v.dtype for k, v in state.items() if k in ("exp_avg", "exp_avg_sq")}
                           for p, state in seen["optimizer"].state.items()}
        seen["model"] = model
        return result

    def make_optimizer(params, cfg):
        seen["optimizer"] = real_optimizer(params, cfg)
        return seen["optimizer"]

    monkeypatch.setattr(sft_module, "train", train)
    monkeypatch.setattr(loop_module, "make_optimizer", make_optimizer)
    return seen


def step_losses(ctx) -> list[float]:
    return [m["loss"] for m in ctx.read_metrics("sft") if "loss" in m]


def dtypes(params: dict, trainable: bool) -> set[torch.dtype]:
    return {dtype for dtype, grad in params.values() if grad == trainable}


def moment_dtypes(seen: dict) -> set[torch.dtype]:
    return set().union(*seen["moments"].values())


def saved_dtypes(path: Path) -> set[torch.dtype]:
    with safe_open(str(path), "pt") as f:
        return {f.get_tensor(k).dtype for k in f.keys()}


def test_lora_sft_in_bfloat16_trains_float32_adapters_on_a_bfloat16_base(tok, tmp_path, captured):
    ctx = context(tmp_path, tiny_lm.tiny_llama(tok), tok)
    base_dir = ctx.artifact("build", "model")
    produced = run_sft(sft_cfg(8, {"method": "lora", "r": 4, "alpha": 8}, lr=3e-2), ctx)

    params = captured["params"]
    adapters = {n for n in params if ".lora_A." in n or ".lora_B." in n}
    assert adapters and {params[n] for n in adapters} == {(torch.float32, True)}
    assert {params[n] for n in params if n not in adapters} == {(torch.bfloat16, False)}
    # AdamW keeps its moments in the parameter's dtype: float32, for exactly the adapter's tensors.
    assert set(captured["moments"]) == adapters and moment_dtypes(captured) == {torch.float32}
    losses = step_losses(ctx)
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.03
    # The same run in float32 (same seed, same batches) logs the same losses up to bfloat16's rounding.
    fp32 = context(tmp_path / "fp32", tiny_lm.tiny_llama(tok), tok)
    run_sft(sft_cfg(8, {"method": "lora", "r": 4, "alpha": 8}, dtype="float32", lr=3e-2), fp32)
    assert step_losses(fp32) == pytest.approx(losses, abs=2e-3) and step_losses(fp32) != losses

    # The adapter is saved in float32, and PEFT puts it on the bfloat16 base to the same logits as ours.
    adapter = Path(produced["adapter"])
    assert saved_dtypes(adapter / "adapter_model.safetensors") == {torch.float32}
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(3))
    ours, _ = load_adapted(adapter, dtype=torch.bfloat16, merge=False)
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16),
                                            str(adapter)).eval()
    assert {p.dtype for n, p in theirs.named_parameters() if "lora_" in n} == {torch.float32}
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=2e-2, rtol=2e-2)

    # The merged model is saved in model_dtype, and its config.json says so.
    merged = Path(produced["model"])
    assert saved_dtypes(merged / "model.safetensors") == {torch.bfloat16}
    assert json.loads((merged / "config.json").read_text())["dtype"] == "bfloat16"
    # A later stage loads it in its own model_dtype (float32 by default) and gets the merged model's logits.
    reloaded, _ = load_model(merged)
    assert {p.dtype for p in reloaded.parameters()} == {torch.float32}
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, ours(input_ids=ids).logits.float(),
                                   atol=5e-2, rtol=5e-2)


def test_t5_lora_steps_in_bfloat16(t5_tok, tmp_path, captured):
    ctx = context(tmp_path, tiny_lm.tiny_t5(t5_tok), t5_tok)
    produced = run_sft(sft_cfg(6, {"method": "lora", "r": 4, "alpha": 8}), ctx)
    params = captured["params"]
    assert dtypes(params, trainable=True) == {torch.float32} and dtypes(params, trainable=False) == {torch.bfloat16}
    assert moment_dtypes(captured) == {torch.float32}
    losses = step_losses(ctx)
    assert len(losses) == 6 and all(map(torch.isfinite, torch.tensor(losses))) and losses[-1] < losses[0]
    assert saved_dtypes(Path(produced["adapter"]) / "adapter_model.safetensors") == {torch.float32}


def test_qlora_over_a_bfloat16_base_merges_into_a_bfloat16_copy(tok, tmp_path, captured):
    ctx = context(tmp_path, tiny_lm.tiny_llama(tok), tok)
    produced = run_sft(sft_cfg(4, {"method": "qlora", "r": 4, "alpha": 8, "bits": 4}, lr=3e-2), ctx)
    assert dtypes(captured["params"], trainable=True) == {torch.float32} and moment_dtypes(captured) == {torch.float32}
    assert saved_dtypes(Path(produced["adapter"]) / "adapter_model.safetensors") == {torch.float32}
    assert saved_dtypes(Path(produced["model"]) / "model.safetensors") == {torch.bfloat16}
    losses = step_losses(ctx)
    assert len(losses) == 4 and losses[-1] < losses[0]


def test_prompt_tuning_keeps_a_float32_prompt_on_a_bfloat16_base(tok, tmp_path, captured):
    ctx = context(tmp_path, tiny_lm.tiny_llama(tok), tok)
    produced = run_sft(sft_cfg(6, {"method": "prompt_tuning", "num_virtual_tokens": 4}, lr=3e-2), ctx)
    model = captured["model"]
    assert isinstance(model, PromptTunedModel) and model.prompt_embeddings.dtype == torch.float32
    assert {p.dtype for p in model.base_model.parameters()} == {torch.bfloat16}
    assert set(captured["moments"]) == {"prompt_embeddings"} and moment_dtypes(captured) == {torch.float32}
    losses = step_losses(ctx)
    assert losses[-1] < losses[0]
    assert saved_dtypes(Path(produced["adapter"]) / "adapter_model.safetensors") == {torch.float32}


def test_full_fine_tuning_in_bfloat16_trains_bfloat16_weights_and_adam_state(tok, tmp_path, captured):
    # torchtune's dtype: bf16: weights, gradients and AdamW moments all in bfloat16, no float32 master copy.
    ctx = context(tmp_path, tiny_lm.tiny_llama(tok), tok)
    produced = run_sft(sft_cfg(8, None, lr=3e-3), ctx)
    assert set(captured["params"].values()) == {(torch.bfloat16, True)}
    assert set(captured["moments"]) == set(captured["params"]) and moment_dtypes(captured) == {torch.bfloat16}
    losses = step_losses(ctx)
    assert losses[-1] < losses[0] - 0.1
    assert saved_dtypes(Path(produced["model"]) / "model.safetensors") == {torch.bfloat16}


def test_float32_stays_the_default_and_lora_adapters_match_it(tok, tmp_path, captured):
    ctx = context(tmp_path, tiny_lm.tiny_llama(tok), tok)
    cfg = validate(SftStage, {"data": [{"dataset": "reverse"}], "peft": {"r": 4},
                              "train": {"max_steps": 1, "batch_size": 8}})
    assert cfg.model_dtype == "float32"
    produced = run_sft(cfg, ctx)
    assert dtypes(captured["params"], trainable=True) == dtypes(captured["params"], trainable=False) == {torch.float32}
    assert json.loads((Path(produced["model"]) / "config.json").read_text())["dtype"] == "float32"


def test_generation_runs_on_a_bfloat16_model_on_cpu(tok, tmp_path):
    ctx = context(tmp_path, tiny_lm.tiny_llama(tok), tok)
    cfg = validate(GenerateStage, {"prompts": ["abc", "de"], "model_dtype": "bf16",
                                   "decoding": {"max_new_tokens": 4}})
    assert cfg.model_dtype == "bfloat16"  # the alias is stored under its full name
    rows = [json.loads(line) for line in Path(run_generate(cfg, ctx)["generations"]).read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["abc", "de"] and all(isinstance(r["output"], str) for r in rows)


def test_eval_in_bfloat16_scores_like_float32_and_records_its_dtype(tok, tmp_path):
    ctx = context(tmp_path, tiny_lm.tiny_llama(tok), tok)
    reports = {}
    for dtype in ("float32", "bfloat16"):
        cfg = validate(EvalStage, {"name": dtype, "data": "dev", "limit": 4, "model_dtype": dtype,
                                   "reference_model": "build", "decoding": {"max_new_tokens": 4}})
        reports[dtype] = json.loads(Path(run_eval(cfg, ctx)["eval"]).read_text())
    fp32, bf16 = reports["float32"], reports["bfloat16"]
    assert "model_dtype" not in fp32["settings"] and bf16["settings"]["model_dtype"] == "bfloat16"
    for key in ("perplexity", "reference_perplexity"):
        assert bf16["metrics"][key] == pytest.approx(fp32["metrics"][key], rel=0.02)
        assert bf16["metrics"][key] != fp32["metrics"][key]  # it did run in bfloat16


def test_distillation_holds_the_teacher_in_bfloat16_and_trains_a_float32_student(tok, tmp_path, monkeypatch):
    import lmcycle.stages.distill as distill_module

    seen = {}
    real = distill_module.finish_training_stage

    def finish(stage, result):
        seen["student"] = {p.dtype for p in stage.model.parameters()}
        return real(stage, result)

    def freeze(teacher):
        seen["teacher"] = {p.dtype for p in teacher.parameters()}
        real_freeze(teacher)

    real_freeze = distill_module.freeze
    monkeypatch.setattr(distill_module, "finish_training_stage", finish)
    monkeypatch.setattr(distill_module, "freeze", freeze)
    ctx = context(tmp_path, tiny_lm.tiny_llama(tok), tok)
    cfg = validate(DistillStage, {"teacher": "build", "data": ["reverse"], "eval_data": ["dev"], "max_len": 64,
                                  "template": "summarize", "model_dtype": "bfloat16", "hidden_weight": 0.1,
                                  "student_layers": [0],
                                  "train": {"max_steps": 8, "batch_size": 8, "lr": 3e-3, "log_every": 1}})
    produced = run_distill(cfg, ctx)
    assert seen == {"teacher": {torch.bfloat16}, "student": {torch.float32}}
    losses = [m["loss"] for m in ctx.read_metrics("distill") if "loss" in m]
    assert len(losses) == 8 and losses[-1] < losses[0]
    assert saved_dtypes(Path(produced["model"]) / "model.safetensors") == {torch.float32}


def test_an_in_process_llm_for_the_harness_loads_in_the_dtype_asked_for(tok, tmp_path):
    from lmcycle.apps.llm import LocalLLM
    from lmcycle.models.generate import DecodingConfig

    llm = LocalLLM(tiny_lm.save_tiny(tiny_lm.tiny_llama(tok), tok, tmp_path / "lm"), dtype=torch.bfloat16)
    assert {p.dtype for p in llm.model.parameters()} == {torch.bfloat16}
    assert len(llm.complete(["abc"], DecodingConfig(max_new_tokens=3))) == 1


def test_the_ppo_value_head_stays_float32_on_a_bfloat16_policy(tok):
    policy = tiny_lm.tiny_llama(tok).to(torch.bfloat16)
    agent = PolicyWithValue(policy, beta=0.1)
    assert agent.value_head.weight.dtype == torch.float32
    query, response = torch.randint(3, 30, (2, 5)), torch.randint(3, 30, (2, 3))
    logits, values = agent(query, torch.ones_like(query), response, torch.ones_like(response))
    assert values.dtype == torch.float32 and values.shape == (2, 3)
    values.sum().backward()
    assert agent.value_head.weight.grad.dtype == torch.float32


def test_a_causal_reward_model_gets_a_float32_head_on_a_bfloat16_backbone(tok, tmp_path):
    source = tiny_lm.save_tiny(tiny_lm.tiny_llama(tok), tok, tmp_path / "lm")
    model, tokenizer = load_reward_backbone(source, "causal_lm", dtype=torch.bfloat16)
    assert model.head.weight.dtype == torch.float32
    assert {p.dtype for p in model.backbone.parameters()} == {torch.bfloat16}
    ids = torch.randint(3, 30, (2, 6))
    rewards = model(ids, torch.ones_like(ids))
    assert rewards.dtype == torch.float32 and rewards.shape == (2,)


# -- checks ------------------------------------------------------------------------------------------------------


def write_recipe(tmp_path, stage: str, device: str = "cpu") -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(f"name: t\ndevice: {device}\ndata: {{x: {{format: synthetic, n: 8}}}}\nstages:\n  - {{type: build, arch: llama, size: 1m, corpus: [x]}}\n"
                    f"  - type: sft\n    data: [{{dataset: x}}]\n    train: {{max_steps: 1}}\n{stage}")
    return path


def test_an_unknown_dtype_names_its_file_line_and_field(tmp_path):
    path = write_recipe(tmp_path, "    model_dtype: bfloat17\n")
    with pytest.raises(LmcycleError) as e:
        load_recipe(path)
    assert e.value.file == str(path) and e.value.line == 9 and e.value.field == "stages.1.model_dtype"
    assert "'float32', 'bfloat16' or 'float16'" in e.value.message


def test_float16_is_refused_for_training_every_parameter_but_not_under_peft(tmp_path):
    path = write_recipe(tmp_path, "    model_dtype: float16\n")
    with pytest.raises(LmcycleError, match="loss scaling") as e:
        load_recipe(path)
    assert (e.value.line, e.value.field) == (9, "stages.1.model_dtype")
    _, stages = load_recipe(write_recipe(tmp_path, "    model_dtype: fp16\n    peft: {r: 4}\n"))
    assert stages[1].model_dtype == "float16"


def test_bfloat16_on_a_gpu_without_it_is_refused_before_anything_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # the device resolver counts GPUs too
    path = write_recipe(tmp_path, "    model_dtype: bfloat16\n", device="cuda")
    with pytest.raises(LmcycleError, match=r"Tesla V100.*no native bfloat16") as e:
        load_recipe(path)
    assert (e.value.line, e.value.field) == (9, "stages.1.model_dtype")
    # float16 needs no such support (every CUDA GPU has it), and float32 is never probed.
    assert dtype_problem(torch.float32, "cuda") is None


def test_a_stage_run_on_its_own_checks_its_dtype_before_loading(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # the device resolver counts GPUs too
    from lmcycle.stages.context import RunContext

    ctx = RunContext(run_dir=tmp_path / "run", device="cuda:0", recipe_file="r.yaml")
    cfg = validate(GenerateStage, {"prompts": ["a"], "model_dtype": "bfloat16", "model": str(tmp_path / "none")})
    with pytest.raises(LmcycleError, match="Tesla T4") as e:
        model_dtype(cfg, ctx)
    assert (e.value.file, e.value.field) == ("r.yaml", "model_dtype")


def test_bfloat16_and_float16_run_on_this_cpu():
    assert dtype_problem(torch.bfloat16, "cpu") is None
    assert dtype_problem(torch.float16, "cpu") is None
