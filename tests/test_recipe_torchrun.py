"""A recipe under torchrun: 2 processes (gloo) train like one process with the same global batch."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

RECIPE = """\
name: ddp
seed: 3
data:
  train: {format: synthetic, n: 48, seed: 1}
stages:
  - {type: build, arch: llama, size: 100k, corpus: [train], vocab_size: 300, max_len: 128}
  - type: pretrain
    corpus: [train]
    seq_len: 32
    eval_fraction: 0.1
    train: {max_steps: 4, batch_size: 4, grad_accum: GRAD_ACCUM, lr: 1.0e-3, log_every: 1}
"""


def run(tmp_path, procs: int, grad_accum: int):
    recipe = tmp_path / f"r{procs}.yaml"
    recipe.write_text(textwrap.dedent(RECIPE).replace("GRAD_ACCUM", str(grad_accum)))
    out = tmp_path / f"run{procs}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if procs == 1:
        cmd = [sys.executable, "-m", "lmcycle.cli", "run", str(recipe), "--out", str(out)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
               "-m", "lmcycle.cli", "run", str(recipe), "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, proc, [r["loss"] for r in rows if r["stage"] == "pretrain" and "loss" in r]


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    out1, _, losses1 = run(tmp_path, 1, grad_accum=2)
    out2, proc2, losses2 = run(tmp_path, 2, grad_accum=1)
    assert len(losses1) == len(losses2) == 4
    assert losses1 == pytest.approx(losses2, rel=1e-4, abs=1e-5)
    assert (out2 / "DONE").exists()
    # only rank 0 wrote: one stage_start per stage in the log, one line per stage header on stdout
    rows = [json.loads(line) for line in (out2 / "metrics.jsonl").read_text().splitlines()]
    assert sum(r.get("event") == "stage_start" for r in rows) == 2
    assert proc2.stdout.count("(pretrain)") == 1
