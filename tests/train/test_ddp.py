"""Data parallelism: 2 processes under torchrun (gloo, CPU) train exactly like one process on the same batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import tiny_lm
import torch
from ddp_worker import CFG, RESUME_CFG, Killed, batches, sft_items
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from lmcycle.train.checkpoint import list_checkpoints
from lmcycle.train.loop import lm_loss_sum, train

WORKER = Path(__file__).resolve().parent / "ddp_worker.py"


def torchrun(model_dir, out_dir, *args: str) -> subprocess.CompletedProcess:
    """``ddp_worker.py MODEL_DIR OUT_DIR ARGS`` on 2 ranks."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parent)}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(WORKER),
         str(model_dir), str(out_dir), *args], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_match_one_process_with_the_same_global_batch(tok, tmp_path, strategy):
    model_dir = tiny_lm.save_tiny(tiny_lm.tiny_llama(tok), tok, tmp_path / "model")
    proc = torchrun(model_dir, tmp_path, strategy)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))

    # One process, the same 8 examples per step as one micro-batch of 4 twice.
    single_cfg = CFG.model_copy(update={"batch_size": 4})
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    single = train(model, batches(sft_items(tok), single_cfg), lm_loss_sum, single_cfg, tmp_path / "single",
                   log=lambda **m: None)

    assert rank0["losses"] == pytest.approx(single.losses, abs=1e-5)
    assert rank1["losses"] == rank0["losses"]
    for k, v in model.state_dict().items():
        assert torch.allclose(rank0["state"][k], v, atol=1e-5), k
        assert torch.equal(rank1["state"][k], rank0["state"][k]), k  # replicas stay identical
    assert rank0["logged"] == CFG.max_steps and rank1["logged"] == 0  # only rank 0 logs
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [CFG.max_steps]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_run_killed_after_every_step_resumes_exactly_on_any_world_size(tok, tmp_path, strategy):
    """1 process, then 2 ranks, then 2 ranks again, then 1 process, each leg killed at its last step and the next
    resuming from the DCP checkpoint: the same losses and weights as one uninterrupted run."""
    model_dir = tiny_lm.save_tiny(tiny_lm.tiny_llama(tok), tok, tmp_path / "model")
    items = sft_items(tok)
    single_cfg = RESUME_CFG.model_copy(update={"batch_size": 4})  # 2 ranks x 2 = 4: the same global batch

    def one_process(stop_at: int | None = None):
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        result = train(model, batches(items, single_cfg, stop_at), lm_loss_sum, single_cfg, tmp_path / "legs" / "run",
                       log=lambda **m: None)
        return model, result

    whole_model = AutoModelForCausalLM.from_pretrained(model_dir)
    whole = train(whole_model, batches(items, single_cfg), lm_loss_sum, single_cfg, tmp_path / "whole",
                  log=lambda **m: None)

    def saved_steps():
        return [s for s, _ in list_checkpoints(tmp_path / "legs" / "run")]

    with pytest.raises(Killed):
        one_process(stop_at=1)
    assert saved_steps() == [1]
    for stop_at in (2, 3):  # 1 -> 2 ranks, then 2 -> 2 ranks
        proc = torchrun(model_dir, tmp_path / "legs", strategy, str(stop_at))
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert saved_steps() == [stop_at - 1, stop_at]
    model, last = one_process()  # 2 ranks -> 1
    assert last.step == RESUME_CFG.max_steps
    assert last.losses == pytest.approx(whole.losses, abs=1e-5)
    for k, v in whole_model.state_dict().items():
        assert torch.allclose(model.state_dict()[k], v, atol=1e-5), k


@pytest.mark.slow
def test_two_ranks_refuse_to_resume_a_checkpoint_of_another_model_in_one_line(tok, tmp_path):
    model_dir = tiny_lm.save_tiny(tiny_lm.tiny_llama(tok), tok, tmp_path / "model")
    proc = torchrun(model_dir, tmp_path, "fsdp", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = AutoModelForCausalLM.from_pretrained(model_dir).config
    config.intermediate_size = 48  # another model: its MLP weights have other shapes
    other_dir = tiny_lm.save_tiny(LlamaForCausalLM(config), tok, tmp_path / "other")
    proc = torchrun(other_dir, tmp_path, "fsdp", "end")
    assert proc.returncode != 0
    checkpoint = tmp_path / "run" / "checkpoints" / "step-1"
    errors = [line for line in proc.stderr.splitlines() if "LmcycleError: " in line]
    assert len(errors) == 2, proc.stderr[-3000:]  # one line from each rank, no hang
    for line in errors:
        assert f"{checkpoint}: cannot resume from this checkpoint" in line
        assert "mlp.gate_proj.weight" in line and "mismatch" in line, line  # which tensor differs, not only which ranks failed
    assert not (tmp_path / "rank0.pt").exists()


def test_fsdp_refuses_a_model_without_transformer_blocks_in_one_line():
    from torch import nn

    from lmcycle.errors import LmcycleError
    from lmcycle.train.engines import fsdp_blocks

    with pytest.raises(LmcycleError) as e:
        fsdp_blocks(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)))
    assert e.value.field == "distributed.strategy" and "Sequential has no repeated blocks" in e.value.message
    assert "use strategy ddp" in e.value.message
