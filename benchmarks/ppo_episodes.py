"""PPO episodes/s of lmcycle's ``ppo`` stage alone (no TRL): ``ppo_vs_trl.py``'s "ours" side on a policy of any shape.

    python benchmarks/ppo_episodes.py --shape small           # ppo_vs_trl's ~1.8M policy, a quick check (CPU)
    python benchmarks/ppo_episodes.py --json ppo-1b.json      # a Llama-3.2-1B-shaped trunk (GPU check)

The policy, the reward and the timing are ``ppo_vs_trl.py``'s (imported, not copied): a Llama-style policy with
the character-level tokenizer and seeded random weights, a tiny seeded ``LlamaForSequenceClassification``
reward read through a ``{kind: python}`` reward, the real stage ``lmcycle.stages.ppo.run_ppo`` with a
``RunContext`` (full fine-tuning with a frozen reference copy, fp32, on the context's device: a GPU when torch
sees one). ``--shape 1b``: hidden 2048, 16 layers, FFN 8192, 32 heads (multi-head: ``ppo_vs_trl``'s config has
as many key/value heads as heads), ~1.07B parameters with the 98-token vocabulary. The reward model stays on the
CPU (it is ``ppo_vs_trl``'s ~0.1M classifier). Episodes/s = timed rollouts x rollout size / window (rollout 0 is
a warm-up); the phase table says where the time went.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

SHAPES = {"small": {"hidden": 192, "layers": 4, "ffn": 512, "heads": 4},
          "1b": {"hidden": 2048, "layers": 16, "ffn": 8192, "heads": 32}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    p.add_argument("--rollouts", type=int, default=6, help="timed rollouts (2 more run: warm-up, end marker)")
    p.add_argument("--rollout-size", type=int, default=16)
    p.add_argument("--minibatch", type=int, default=8)
    p.add_argument("--ppo-epochs", type=int, default=4)
    p.add_argument("--response-length", type=int, default=24)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--json", help="also write the summary to this JSON file")
    a = p.parse_args()

    import ppo_vs_trl as P
    import torch

    args = argparse.Namespace(
        rollouts=a.rollouts, rollout_size=a.rollout_size, minibatch=a.minibatch, ppo_epochs=a.ppo_epochs,
        response_length=a.response_length, temperature=0.7, kl_coef=0.05, lr=a.lr, **SHAPES[a.shape],
        prompts=256, eval_prompts=32, last=min(3, a.rollouts), repeats=1, threads=torch.get_num_threads(), seed=0,
        trl_path="", profile=False, json=None)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lmcycle-ppo-episodes-") as tmp:
        workdir = Path(tmp)
        info = P.prepare(workdir, args)
        r = P.run_side("ours", workdir, args)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else P.cpu_name()
    print(f"lmcycle run_ppo, {a.shape} policy ({info['params'] / 1e6:.1f}M params, fp32, full fine-tuning + frozen "
          f"reference), {a.rollouts} timed rollouts x {a.rollout_size} episodes, {a.response_length} new tokens, "
          f"{a.ppo_epochs} PPO epochs, minibatch {a.minibatch}; {device}; torch {torch.__version__}, "
          f"Python {platform.python_version()}, {date.today().isoformat()}")
    print("| episodes/s | window s | peak RSS (MiB) | mean response length | final train reward | eval reward |")
    print("|---:|---:|---:|---:|---:|---:|")
    print(f"| {r['episodes_per_s']:.2f} | {r['window_s']:.1f} | {r['peak_rss_mb']:.0f} | {r['mean_response_len']:.1f} "
          f"| {r['final_reward']:.3f} | {r['eval_reward']:.3f} |")
    print("\n".join(P.phase_table(r)))
    summary = {"shape": a.shape, "info": info, "run": r, "device": device, "torch": torch.__version__,
               "date": date.today().isoformat(), "benchmark_wall_s": round(time.perf_counter() - started, 1)}
    if a.json:
        Path(a.json).write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")


if __name__ == "__main__":
    main()
