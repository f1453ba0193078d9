"""Reward-model training speed and peak memory: lmcycle's reward pieces vs TRL ``RewardTrainer``.

    python benchmarks/reward_vs_trl.py                       # llama-10m classifier, batch 8 pairs, 3 + 30 steps
    python benchmarks/reward_vs_trl.py --size 1m --steps 10  # a quick check
    python benchmarks/reward_vs_trl.py --json reward-10m.json

Both sides train the *same* one-label sequence classifier (``LlamaForSequenceClassification`` on an lmcycle-built
llama; its score head initialised once, seeded, and saved, so both start from identical weights) with the
pairwise loss ``-log σ(r_chosen − r_rejected)`` (no margin, no reward centring) on the *same* token ids: ours from
:func:`lmcycle.align.reward.encode_pairs` with the tokenizer's EOS appended to each reply (as TRL does), and TRL
gets exactly those ids as a pre-tokenized dataset (``chosen_ids``/``rejected_ids``). A batch is the B chosen rows
stacked over the B rejected rows on both sides (one forward pass), padded to its longest row. See
``preference_pairs.py`` for the data, the batch order (ours length-grouped, TRL plainly shuffled), the optimizer,
the timing window and the memory figures.

Ours: ``encode_pairs``, ``collate_pairs``, ``pair_step_indices``, ``pair_loss_fn`` and
``lmcycle.train.loop.train``, as ``train_reward_model`` wires them (without its final reward statistics pass).
TRL: ``RewardTrainer`` with ``use_cpu=True, bf16=False``, ``gradient_checkpointing=False``, sequential sampling of
our plainly shuffled order, ``center_rewards_coefficient=None``. Held-out loss: ``pair_metrics`` on both sides.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from measure import Clock, trainer_clock
from preference_pairs import (
    ADAM,
    build_model_dir,
    held_out_pairs,
    length_facts,
    memory_before_training,
    pairs,
    run_comparison,
    step_order,
    total_steps,
)

NAMES = {"ours": "lmcycle `train()` + reward pieces", "trl": "TRL `RewardTrainer`"}


def encoded_pairs(args: argparse.Namespace, tokenizer, prefs: list | None = None) -> list[dict]:
    """Our encoding of the benchmark pairs (or ``prefs``), each reply ending in EOS (what TRL appends)."""
    from dataclasses import replace

    from lmcycle.align.reward import encode_pairs

    eos = tokenizer.eos_token
    prefs = pairs(args) if prefs is None else prefs
    return encode_pairs([replace(p, chosen=p.chosen + eos, rejected=p.rejected + eos) for p in prefs],
                        tokenizer, args.max_len)


def held_out_loss(model, tokenizer, args: argparse.Namespace) -> float:
    """Mean pairwise loss of the classifier ``model`` on the held-out pairs (eval mode, no gradients)."""
    from lmcycle.align.reward import RewardModel, pair_batches, pair_metrics

    batches = pair_batches(encoded_pairs(args, tokenizer, held_out_pairs(args)), tokenizer, args.batch)
    was_training = model.training
    model.eval()
    try:
        return pair_metrics(RewardModel.from_classifier(model), batches)["loss"]
    finally:
        model.train(was_training)


def prepare(workdir: Path, args: argparse.Namespace) -> dict:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lmcycle.train.loop import seed_everything

    info = build_model_dir(workdir, args)
    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    seed_everything(args.seed)  # the score head's init, made once for both sides
    model = AutoModelForSequenceClassification.from_pretrained(workdir / "model", num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(workdir / "rm_init")
    tokenizer.save_pretrained(workdir / "rm_init")
    encoded = encoded_pairs(args, tokenizer)
    return {**info, "pairs": len(encoded), **length_facts([len(e[k]) for e in encoded for k in ("chosen", "rejected")])}


def train_config(args: argparse.Namespace):
    from lmcycle.train.loop import TrainConfig

    return TrainConfig(max_steps=total_steps(args), batch_size=args.batch, lr=args.lr, betas=ADAM["betas"],
                       weight_decay=ADAM["weight_decay"], min_lr_ratio=1.0, warmup_steps=0, max_grad_norm=1.0,
                       log_every=1, save_every=0, seed=args.seed)


def run_ours(workdir: Path, args: argparse.Namespace, clock: Clock, out_dir: Path) -> tuple[list[float], dict]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lmcycle.align.reward import RewardModel, collate_pairs, pair_loss_fn, pair_step_indices
    from lmcycle.train.loop import train

    tokenizer = AutoTokenizer.from_pretrained(workdir / "rm_init")
    classifier = AutoModelForSequenceClassification.from_pretrained(workdir / "rm_init")
    model = RewardModel.from_classifier(classifier)
    encoded = encoded_pairs(args, tokenizer)
    lengths = [max(len(e["chosen"]), len(e["rejected"])) for e in encoded]
    cfg = train_config(args)
    before = held_out_loss(classifier, tokenizer, args)

    def batch_at(step: int):  # train_reward_model's batch_at, plus the clock
        clock.step_starts(step)
        return [collate_pairs([encoded[i] for i in idx], tokenizer)
                for idx in pair_step_indices(lengths, step, cfg, args.seed, not args.no_group)]

    mem = memory_before_training()
    result = train(model, batch_at, pair_loss_fn(False), cfg, out_dir, log=lambda **m: None, desc="ours")
    return result.losses, {**mem, "eval_loss_before": before,
                           "eval_loss_after": held_out_loss(classifier, tokenizer, args)}


def run_trl(workdir: Path, args: argparse.Namespace, clock: Clock, out_dir: Path) -> tuple[list[float], dict]:
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    tokenizer = AutoTokenizer.from_pretrained(workdir / "rm_init")
    model = AutoModelForSequenceClassification.from_pretrained(workdir / "rm_init")
    encoded = encoded_pairs(args, tokenizer)
    rows = [encoded[i] for idx in step_order(len(encoded), args) for i in idx]
    data = Dataset.from_dict({"chosen_ids": [r["chosen"] for r in rows], "rejected_ids": [r["rejected"] for r in rows]})
    losses: list[float] = []

    config = RewardConfig(
        output_dir=str(out_dir), use_cpu=True, bf16=False, fp16=False, report_to=[], save_strategy="no",
        eval_strategy="no", logging_strategy="steps", logging_steps=1, disable_tqdm=True,
        dataloader_num_workers=0, per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
        max_steps=total_steps(args), train_sampling_strategy="sequential", learning_rate=args.lr,
        lr_scheduler_type="constant", warmup_steps=0, adam_beta1=ADAM["betas"][0], adam_beta2=ADAM["betas"][1],
        adam_epsilon=ADAM["eps"], weight_decay=ADAM["weight_decay"], optim="adamw_torch_fused", max_grad_norm=1.0,
        seed=args.seed, gradient_checkpointing=False, max_length=None, center_rewards_coefficient=None,
        torch_compile=False,
    )
    before = held_out_loss(model, tokenizer, args)
    trainer = RewardTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                            callbacks=[trainer_clock(clock, losses)])
    mem = memory_before_training()
    trainer.train()
    mismatches = sum(1 for mine, theirs in zip(rows, trainer.train_dataset, strict=True)
                     if mine["chosen"] != theirs["chosen_ids"] or mine["rejected"] != theirs["rejected_ids"])
    return losses, {**mem, "data_mismatches": mismatches, "eval_loss_before": before,
                    "eval_loss_after": held_out_loss(trainer.model, tokenizer, args)}


if __name__ == "__main__":
    run_comparison(__doc__, __file__, run_ours, run_trl, prepare, NAMES, "Reward model (pairwise loss)")
