"""Data parallelism: 2 processes under torchrun (gloo, CPU) train exactly like one process on the same batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import tiny_lm
import torch
from ddp_worker import CFG, batches, sft_items
from transformers import AutoModelForCausalLM

from lmcycle.train.checkpoint import list_checkpoints
from lmcycle.train.loop import lm_loss_sum, train

WORKER = Path(__file__).resolve().parent / "ddp_worker.py"


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_match_one_process_with_the_same_global_batch(tok, tmp_path, strategy):
    model_dir = tiny_lm.save_tiny(tiny_lm.tiny_llama(tok), tok, tmp_path / "model")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parent)}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(WORKER),
         model_dir, str(tmp_path), strategy], env=env, capture_output=True, text=True, timeout=300)
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
