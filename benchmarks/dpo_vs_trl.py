"""DPO training speed and peak memory: lmcycle's DPO pieces vs TRL ``DPOTrainer``.

    python benchmarks/dpo_vs_trl.py                        # llama-10m, batch 8 pairs, 3 + 30 steps
    python benchmarks/dpo_vs_trl.py --size 1m --steps 10   # a quick check
    python benchmarks/dpo_vs_trl.py --json dpo-10m.json

Both sides train the *same* policy (an lmcycle-built llama loaded from a local folder, so TRL's reference, taken
from ``model.config._name_or_path``, is that folder too) with the DPO sigmoid loss (β 0.1, summed response
log-probs) on the *same* pairs (ours length-grouped, TRL plainly shuffled: see ``preference_pairs.py``): the
prompt tokenized alone, each reply plus EOS after it, the loss on the reply tokens only. Reference log-probs are precomputed once before training on both sides (ours:
``precompute_reference_logps``, TRL: ``precompute_ref_log_probs=True``), so no reference model runs inside the
timed window and neither side keeps a second model. Only pairs that fit in ``--max-len`` are used (the two
truncate differently). The TRL child checks that its tokenized rows equal ours
(``prompt_ids + chosen_ids`` vs our ``input_ids``). See ``preference_pairs.py`` for the optimizer, the timing
window and the memory figures.

Ours: ``encode_dpo_pairs``, ``precompute_reference_logps``, ``collate_dpo``, ``pair_step_indices``,
``dpo_loss_fn`` and ``lmcycle.train.loop.train``, as ``train_dpo`` wires them. TRL: ``DPOTrainer`` with
``use_cpu=True, bf16=False``, ``gradient_checkpointing=False``, sequential sampling of our plainly shuffled order,
``loss_type=["sigmoid"]``. Held-out loss: ``dpo_metrics`` on both sides, against the initial model's log-probs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
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

BETA = 0.1
NAMES = {"ours": "lmcycle `train()` + DPO pieces", "trl": "TRL `DPOTrainer`"}


def fitting_pairs(args: argparse.Namespace, tokenizer) -> list:
    """The benchmark pairs whose prompt + reply + EOS fit in ``max_len`` tokens: longer ones would be cut
    differently (ours: the prompt's start; TRL: the end, after dropping rows whose prompt alone fills it)."""
    prefs = pairs(args)
    prompts = tokenizer([p.prompt for p in prefs], verbose=False)["input_ids"]
    replies = [tokenizer([getattr(p, k) for p in prefs], add_special_tokens=False, verbose=False)["input_ids"]
               for k in ("chosen", "rejected")]
    return [p for p, n, c, r in zip(prefs, prompts, *replies, strict=True)
            if len(n) + max(len(c), len(r)) + 1 <= args.max_len]


def encoded_pairs(args: argparse.Namespace, tokenizer) -> list[dict]:
    from lmcycle.align.dpo import encode_dpo_pairs

    return encode_dpo_pairs(fitting_pairs(args, tokenizer), tokenizer, args.max_len, seq2seq=False)


def held_out(model, tokenizer, args: argparse.Namespace) -> list:
    """The held-out DPO batches with ``model``'s (the initial policy's) log-probs as the reference."""
    from lmcycle.align.dpo import dpo_batches, encode_dpo_pairs, precompute_reference_logps

    encoded = encode_dpo_pairs(held_out_pairs(args), tokenizer, args.max_len, seq2seq=False)
    precompute_reference_logps(model, encoded, tokenizer.pad_token_id, args.batch)
    return dpo_batches(encoded, tokenizer.pad_token_id, args.batch)


def held_out_loss(model, batches: list) -> float:
    """Mean DPO loss of ``model`` on ``batches`` (eval mode, no gradients)."""
    from lmcycle.align.dpo import dpo_metrics

    was_training = model.training
    model.eval()
    try:
        return dpo_metrics(model, batches, BETA)["loss"]
    finally:
        model.train(was_training)


def prepare(workdir: Path, args: argparse.Namespace) -> dict:
    from transformers import AutoTokenizer

    info = build_model_dir(workdir, args)
    encoded = encoded_pairs(args, AutoTokenizer.from_pretrained(workdir / "model"))
    lengths = [len(e[k]["input_ids"]) for e in encoded for k in ("chosen", "rejected")]
    return {**info, "pairs": len(encoded), **length_facts(lengths)}


def run_ours(workdir: Path, args: argparse.Namespace, clock: Clock, out_dir: Path) -> tuple[list[float], dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmcycle.align.dpo import collate_dpo, dpo_loss_fn, dpo_pair_length, precompute_reference_logps
    from lmcycle.align.reward import pair_step_indices
    from lmcycle.train.loop import TrainConfig, train

    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    model = AutoModelForCausalLM.from_pretrained(workdir / "model", dtype=torch.float32)
    encoded = encoded_pairs(args, tokenizer)
    pad_id = tokenizer.pad_token_id
    precompute_reference_logps(model, encoded, pad_id, args.batch)
    lengths = [dpo_pair_length(e) for e in encoded]
    eval_batches = held_out(model, tokenizer, args)
    before = held_out_loss(model, eval_batches)

    def batch_at(step: int):  # train_dpo's batch_at, plus the clock
        clock.step_starts(step)
        return [collate_dpo([encoded[i] for i in idx], pad_id)
                for idx in pair_step_indices(lengths, step, cfg, args.seed, not args.no_group)]

    cfg = TrainConfig(max_steps=total_steps(args), batch_size=args.batch, lr=args.lr, betas=ADAM["betas"],
                      weight_decay=ADAM["weight_decay"], min_lr_ratio=1.0, warmup_steps=0, max_grad_norm=1.0,
                      log_every=1, save_every=0, seed=args.seed)
    mem = memory_before_training()
    result = train(model, batch_at, dpo_loss_fn(BETA), cfg, out_dir, log=lambda **m: None, desc="ours")
    return result.losses, {**mem, "eval_loss_before": before, "eval_loss_after": held_out_loss(model, eval_batches)}


def run_trl(workdir: Path, args: argparse.Namespace, clock: Clock, out_dir: Path) -> tuple[list[float], dict]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    model = AutoModelForCausalLM.from_pretrained(workdir / "model", dtype=torch.float32)
    prefs = fitting_pairs(args, tokenizer)
    order = [i for idx in step_order(len(prefs), args) for i in idx]
    data = Dataset.from_dict({"prompt": [prefs[i].prompt for i in order],
                              "chosen": [prefs[i].chosen for i in order],
                              "rejected": [prefs[i].rejected for i in order]})
    losses: list[float] = []

    config = DPOConfig(
        output_dir=str(out_dir), use_cpu=True, bf16=False, fp16=False, report_to=[], save_strategy="no",
        eval_strategy="no", logging_strategy="steps", logging_steps=1, disable_tqdm=True,
        dataloader_num_workers=0, per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
        max_steps=total_steps(args), train_sampling_strategy="sequential", learning_rate=args.lr,
        lr_scheduler_type="constant", warmup_steps=0, adam_beta1=ADAM["betas"][0], adam_beta2=ADAM["betas"][1],
        adam_epsilon=ADAM["eps"], weight_decay=ADAM["weight_decay"], optim="adamw_torch_fused", max_grad_norm=1.0,
        seed=args.seed, gradient_checkpointing=False, max_length=args.max_len, beta=BETA, loss_type=["sigmoid"],
        precompute_ref_log_probs=True, precompute_ref_batch_size=args.batch, torch_compile=False,
    )
    eval_batches = held_out(model, tokenizer, args)
    before = held_out_loss(model, eval_batches)
    trainer = DPOTrainer(model=model, ref_model=None, args=config, train_dataset=data, processing_class=tokenizer,
                         callbacks=[trainer_clock(clock, losses)])
    mem = memory_before_training()
    trainer.train()
    ours = encoded_pairs(args, tokenizer)
    mismatches = sum(1 for i, theirs in zip(order, trainer.train_dataset, strict=True)
                     if ours[i]["chosen"]["input_ids"] != theirs["prompt_ids"] + theirs["chosen_ids"]
                     or ours[i]["rejected"]["input_ids"] != theirs["prompt_ids"] + theirs["rejected_ids"])
    return losses, {**mem, "data_mismatches": mismatches, "eval_loss_before": before,
                    "eval_loss_after": held_out_loss(trainer.model, eval_batches)}


if __name__ == "__main__":
    run_comparison(__doc__, __file__, run_ours, run_trl, prepare, NAMES, "DPO (sigmoid, β 0.1, precomputed reference)")
