"""Devices and attention: ``auto`` picks this process's GPU or the CPU, bad values fail where they are written,
and the attention implementation a recipe names reaches every model loaded or built.

CUDA is faked (``torch.cuda.is_available`` / ``device_count`` monkeypatched) to check the choice on any machine;
nothing is allocated on it. The tests that need a real GPU are marked ``gpu`` and skipped without one.
"""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

import lmcycle.models.device as device_module
from lmcycle.artifacts import load_model
from lmcycle.cli import main
from lmcycle.errors import LmcycleError
from lmcycle.models.build import build_model, train_tokenizer
from lmcycle.models.device import check_attn_implementation, describe_device, resolve_device
from lmcycle.models.generate import DecodingConfig, generate
from lmcycle.models.load import load_pretrained
from lmcycle.stages.context import RunContext
from lmcycle.stages.recipe import load_recipe, run_recipe
from tests.train.tiny_lm import make_tokenizer, save_tiny, tiny_llama, tiny_t5

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch sees none)")


@pytest.fixture
def no_cuda(monkeypatch):
    """A machine without CUDA, whatever this one has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture
def four_gpus(monkeypatch):
    """A machine with four GPUs, as far as the resolver can tell (nothing is allocated on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("LOCAL_RANK", raising=False)


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    tok = make_tokenizer()
    return save_tiny(tiny_llama(tok, seed=3), tok, tmp_path_factory.mktemp("llama") / "m")


# -- the resolver --------------------------------------------------------------------------------------------------
def test_auto_is_the_cpu_without_cuda_and_cpu_is_always_accepted(no_cuda):
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


def test_cuda_without_cuda_is_one_clear_error_naming_the_field(no_cuda):
    for spec in ("cuda", "cuda:0"):
        with pytest.raises(LmcycleError) as err:
            resolve_device(spec, file="r.yaml", line=3)
        assert err.value.field == "device"
        assert str(err.value).startswith(f"r.yaml:3: field 'device': {spec} asked for but torch sees no CUDA device")


@pytest.mark.parametrize("spec", ["cudda", "gpu", "cuda:x", "cuda:-1", "", "cuda:0:1", "mps0"])
def test_strings_that_name_no_device_are_refused(spec, no_cuda):
    with pytest.raises(LmcycleError, match=r"unknown device .* \(expected auto, cpu, cuda or cuda:N\)"):
        resolve_device(spec)


def test_auto_takes_this_process_s_gpu_under_torchrun(four_gpus, monkeypatch):
    assert resolve_device("auto") == torch.device("cuda", 0)  # outside torchrun: the first GPU
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert resolve_device("auto") == torch.device("cuda", 2)
    assert resolve_device("cuda") == torch.device("cuda", 2)  # "cuda" is this process's GPU too
    assert resolve_device("cuda:3") == torch.device("cuda", 3)  # a number is taken as it is


def test_a_gpu_the_machine_does_not_have_is_refused(four_gpus, monkeypatch):
    with pytest.raises(LmcycleError, match=r"cuda:4 asked for but torch sees 4 CUDA device\(s\)"):
        resolve_device("cuda:4")
    monkeypatch.setenv("LOCAL_RANK", "4")  # a fifth process on a four-GPU machine
    with pytest.raises(LmcycleError, match=r"LOCAL_RANK=4 has no GPU of its own.*at most 4 process"):
        resolve_device("auto")


def test_run_context_carries_the_resolved_device(tmp_path, four_gpus, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert RunContext(run_dir=tmp_path / "a").device == "cuda:1"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert RunContext(run_dir=tmp_path / "b").device == "cpu"
    with pytest.raises(LmcycleError, match="cuda asked for but torch sees no CUDA device"):
        RunContext(run_dir=tmp_path / "c", device="cuda")


# -- recipes -------------------------------------------------------------------------------------------------------
RECIPE = """\
name: devices
seed: 0
device: {device}
attn_implementation: {attention}
data:
  train: {{format: synthetic, n: 24, seed: 1}}
stages:
  - {{type: build, arch: llama, size: 100k, corpus: [train], vocab_size: 300, max_len: 64}}
"""


def _recipe(tmp_path, device="auto", attention="sdpa"):
    path = tmp_path / "r.yaml"
    path.write_text(textwrap.dedent(RECIPE.format(device=device, attention=attention)))
    return path


def test_a_misspelt_device_fails_at_load_with_file_line_and_field(tmp_path):
    path = _recipe(tmp_path, device="cudda")
    with pytest.raises(LmcycleError) as err:
        load_recipe(path)
    assert str(err.value).startswith(f"{path}:3: field 'device': unknown device 'cudda'")


def test_cuda_on_a_machine_without_it_fails_at_load(tmp_path, no_cuda):
    path = _recipe(tmp_path, device="cuda")
    with pytest.raises(LmcycleError, match=rf"^{path}:3: field 'device': cuda asked for but torch sees no CUDA"):
        load_recipe(path)


def test_attention_is_checked_at_load(tmp_path, no_cuda, monkeypatch):
    path = _recipe(tmp_path, attention="flashy")
    with pytest.raises(LmcycleError, match=rf"^{path}:4: field 'attn_implementation': unknown attention"):
        load_recipe(path)
    monkeypatch.setattr(device_module, "flash_attn_installed", lambda: False)
    with pytest.raises(LmcycleError, match=r":4: field 'attn_implementation': flash_attention_2 needs the "
                                           r"flash_attn package, which is not installed"):
        load_recipe(_recipe(tmp_path, attention="flash_attention_2"))
    monkeypatch.setattr(device_module, "flash_attn_installed", lambda: True)  # installed, but this is a CPU
    with pytest.raises(LmcycleError, match=r":4: field 'attn_implementation': flash_attention_2 runs on CUDA only"):
        load_recipe(_recipe(tmp_path, attention="flash_attention_2"))


def test_config_yaml_keeps_auto_and_the_log_and_report_say_what_it_became(tmp_path, no_cuda):
    recipe, stages = load_recipe(_recipe(tmp_path, attention="eager"))
    assert recipe.device == "auto"  # as written, not resolved
    run_dir = run_recipe(recipe, stages, out=tmp_path / "run", recipe_file=tmp_path / "r.yaml", echo=lambda *a: None)
    config = (run_dir / "config.yaml").read_text()
    assert "device: auto\n" in config and "attn_implementation: eager\n" in config
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["device"] for r in rows if r.get("event") == "stage_start"] == ["cpu"]
    assert "- Seed 0, device auto: cpu" in (run_dir / "report.md").read_text()


def test_cli_serve_names_a_bad_device_or_attention_flag(capsys, no_cuda):
    pytest.importorskip("uvicorn")
    assert main(["serve", "--model", "nowhere", "--device", "cudda"]) == 1
    assert "field '--device': unknown device 'cudda'" in capsys.readouterr().err
    assert main(["serve", "--model", "nowhere", "--device", "cuda"]) == 1
    assert "cuda asked for but torch sees no CUDA device" in capsys.readouterr().err
    assert main(["serve", "--model", "nowhere", "--attn-implementation", "fast"]) == 1
    assert "field '--attn-implementation': unknown attention implementation 'fast'" in capsys.readouterr().err


# -- attention reaches the models ----------------------------------------------------------------------------------
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_the_loaded_model_computes_attention_as_asked(saved_llama, attention):
    model, _ = load_pretrained(saved_llama, device="cpu", attn_implementation=attention)
    assert model.config._attn_implementation == attention
    model, _ = load_model(saved_llama, device="cpu", attn_implementation=attention)
    assert model.config._attn_implementation == attention


def test_sdpa_and_eager_give_the_same_logits(saved_llama):
    sdpa, tok = load_pretrained(saved_llama, device="cpu")
    eager, _ = load_pretrained(saved_llama, device="cpu", attn_implementation="eager")
    batch = tok(["the cat sees the dog", "a"], return_tensors="pt", padding=True)
    torch.testing.assert_close(sdpa(**batch).logits, eager(**batch).logits, rtol=1e-4, atol=1e-5)


def test_built_models_get_the_attention_too():
    tokenizer = train_tokenizer(["some text to train on", "and more of it"] * 4, 300, seq2seq=False)
    assert build_model("llama", "100k", tokenizer, 64, seed=0, attn_implementation="eager"
                       ).config._attn_implementation == "eager"
    assert build_model("gpt2", "100k", tokenizer, 64, seed=0).config._attn_implementation == "sdpa"


def test_t5_loads_with_sdpa_and_refuses_flash_attention_clearly(tmp_path, monkeypatch):
    tok = make_tokenizer(seq2seq=True)
    path = save_tiny(tiny_t5(tok), tok, tmp_path / "t5")
    model, _ = load_pretrained(path, device="cpu")
    assert model.config._attn_implementation == "sdpa"
    monkeypatch.setattr(device_module, "flash_attn_installed", lambda: True)
    t5_tokenizer = train_tokenizer(["some text to train on"] * 4, 400, seq2seq=True)
    with pytest.raises(LmcycleError, match="T5ForConditionalGeneration: .*Flash") as err:
        build_model("t5", "100k", t5_tokenizer, 64, seed=0, attn_implementation="flash_attention_2")
    assert err.value.field == "attn_implementation"


def test_flash_attention_without_the_package_is_one_clear_error(saved_llama, monkeypatch):
    monkeypatch.setattr(device_module, "flash_attn_installed", lambda: False)
    with pytest.raises(LmcycleError, match="flash_attention_2 needs the flash_attn package") as err:
        load_pretrained(saved_llama, device="cpu", attn_implementation="flash_attention_2")
    assert err.value.field == "attn_implementation"
    with pytest.raises(LmcycleError, match="unknown attention implementation 'flash'"):
        check_attn_implementation("flash")


# -- no CPU assumptions --------------------------------------------------------------------------------------------
def test_ppo_scores_stay_on_their_device():
    """A CPU tensor mixed into a CUDA one fails; meta tensors fail the same way, so they stand in for CUDA."""
    from lmcycle.align.ppo import PpoSettings, finish_scores, per_token_rewards

    scores = torch.zeros(3, device="meta")
    final = finish_scores(scores, ["eos", "length", "stop"], PpoSettings(missing_eos_penalty=1.0, score_clip=5.0))
    assert final.device.type == "meta"
    rewards = per_token_rewards(final, torch.zeros(3, 4, device="meta"), torch.ones(3, 4, device="meta"), 0.1)
    assert rewards.device.type == "meta"


def test_describe_device_names_the_gpu(monkeypatch):
    assert describe_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: f"Fake GPU {index}")
    assert describe_device("cuda:1") == "cuda:1 (Fake GPU 1)"


# -- on a real GPU -------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@needs_gpu
def test_auto_loads_on_the_gpu_and_greedy_generation_matches_the_cpu(saved_llama):
    gpu_model, tok = load_model(saved_llama)  # the default device is auto
    assert next(gpu_model.parameters()).device.type == "cuda"
    cpu_model, _ = load_model(saved_llama, device="cpu")
    cfg = DecodingConfig(max_new_tokens=8)
    prompts = ["the cat sees the dog :", "a"]
    assert generate(gpu_model, tok, prompts, cfg) == generate(cpu_model, tok, prompts, cfg)


@pytest.mark.gpu
@needs_gpu
def test_a_recipe_runs_on_the_gpu_by_default(tmp_path):
    recipe, stages = load_recipe(_recipe(tmp_path))
    run_dir = run_recipe(recipe, stages, out=tmp_path / "run", recipe_file=tmp_path / "r.yaml", echo=lambda *a: None)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["device"].startswith("cuda:") for r in rows if r.get("event") == "stage_start")
