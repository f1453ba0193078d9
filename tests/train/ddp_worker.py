"""Started by test_ddp.py under ``torchrun --nproc_per_node=2``: train a tiny model data-parallel.

Usage: ddp_worker.py MODEL_DIR OUT_DIR [STRATEGY [STOP_AT]]. Each rank writes ``OUT_DIR/rank<r>.pt`` with its losses
and final weights; the checkpoints go to ``OUT_DIR/run``. With ``STOP_AT`` the run is one leg of an interrupted one
(:data:`RESUME_CFG`): it resumes from ``OUT_DIR/run`` and is killed when it reaches step ``STOP_AT`` (``end``: it
runs to the end), as a crash would, with a checkpoint after every step.
"""

from __future__ import annotations

import sys
from pathlib import Path

import tiny_lm
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmcycle.data.sft import collate_sft, encode_sft
from lmcycle.data.templates import get_template
from lmcycle.models.load import load_empty
from lmcycle.train.distributed import init_distributed
from lmcycle.train.engines import DistributedConfig
from lmcycle.train.loop import TrainConfig, lm_loss_sum, micro_batch_indices, train

# The global batch of each step is 8 examples: 2 ranks x 2 micro-batches x 2 examples.
CFG = TrainConfig(max_steps=3, batch_size=2, grad_accum=2, lr=1e-2, seed=0, log_every=1)
RESUME_CFG = CFG.model_copy(update={"max_steps": 4, "save_every": 1})


class Killed(Exception):
    """Where an interrupted leg stops, as if the process had been killed before that step."""


def sft_items(tokenizer):
    return encode_sft(tiny_lm.examples(32, seed=2), get_template("summarize"), tokenizer, max_len=64,
                      seq2seq=False)


def batches(items, cfg: TrainConfig, stop_at: int | None = None):
    def batch_at(step):
        if step == stop_at:
            raise Killed(step)
        return [collate_sft([items[i] for i in idx], 0)
                for idx in micro_batch_indices(len(items), step, cfg.batch_size, cfg.grad_accum, cfg.seed)]
    return batch_at


def main(model_dir: str, out_dir: str, strategy: str = "ddp", stop_at: str | None = None) -> None:
    rank, world = init_distributed()
    assert world == 2, world
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if strategy == "fsdp":  # as the stages load it: on the meta device, each rank reading only its shards
        model = load_empty(model_dir)[0]
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir)
    if rank == 1 and strategy == "ddp":
        with torch.no_grad():  # a different start on rank 1: the loop must broadcast rank 0's weights
            for p in model.parameters():
                p.add_(1.0)
    logged = []
    cfg = (CFG if stop_at is None else RESUME_CFG).model_copy(
        update={"distributed": DistributedConfig(strategy=strategy)})
    stop = None if stop_at in (None, "end") else int(stop_at)
    try:
        result = train(model, batches(sft_items(tokenizer), cfg, stop), lm_loss_sum, cfg, Path(out_dir) / "run",
                       log=lambda **m: logged.append(m))
    except Killed:
        return
    steps_logged = [m for m in logged if m.get("event") != "train_start"]
    torch.save({"losses": result.losses, "state": model.state_dict(), "logged": len(steps_logged)},
               Path(out_dir) / f"rank{rank}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
