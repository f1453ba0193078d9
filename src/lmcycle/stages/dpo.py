"""DpoStage: align a model to a preference dataset with DPO or IPO, every parameter or a LoRA adapter.

The policy starts from the stage's ``model`` and trains on the ``data`` pairs with the loss of
:mod:`lmcycle.align.dpo` (``loss_type`` sigmoid or ipo, ``beta``, ``label_smoothing``). The reference is the
starting model: with ``peft: {method: lora, ...}`` the same model with its adapter disabled; without, the model
before training, its log-probs precomputed once (``precompute_reference``), or a frozen copy in memory when
precomputing is off. The held-out ``eval_data`` pairs give the implicit-reward accuracy, margin and rewards,
written to ``<stage>/eval.json``; the model goes to ``<stage>/model`` (with LoRA the merged model, and the adapter
in PEFT's format in ``<stage>/adapter``).
"""

from __future__ import annotations

import copy
from typing import Literal

from pydantic import Field

from lmcycle.align.dpo import check_dpo_settings, train_dpo
from lmcycle.config import DatasetName, ModelRef
from lmcycle.data.preferences import pairs_from_examples
from lmcycle.models.load import context_window
from lmcycle.report.markdown import fraction, md
from lmcycle.report.rundir import Run
from lmcycle.stages.common import ModelStage, finish_training_stage, start_training_stage, write_eval
from lmcycle.stages.context import RunContext
from lmcycle.stages.peft import LoraPeft, add_peft_for_training, finish_peft_stage
from lmcycle.stages.reward import PREFERENCE_INTRO
from lmcycle.train.loop import TrainConfig


class DpoStage(ModelStage):
    """Align a model to a preference dataset with DPO or IPO: every parameter, or a LoRA adapter."""

    type: Literal["dpo"] = "dpo"
    model: ModelRef | None = Field(None, description="the starting policy: an earlier stage, a path or a hub id")
    data: DatasetName = Field(description="preference dataset (format hh_rlhf or rankings)")
    eval_data: DatasetName = Field(description="held-out preference dataset: implicit-reward accuracy and margins")
    beta: float = Field(0.1, gt=0)
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="conservative DPO (sigmoid loss only)")
    precompute_reference: bool = Field(True, description="reference log-probs once before training (no second "
                                                         "model in memory during training)")
    max_len: int = Field(512, ge=8, description="tokens of prompt + response; the prompt's start is cut first")
    peft: LoraPeft | None = Field(None, description="LoRA: the reference is the model with the adapter off")
    group_by_length: bool = Field(True, description="batch pairs of similar length together (less padding, "
                                                    "faster steps); off: plainly shuffled batches")
    train: TrainConfig

    @property
    def trains_every_parameter(self) -> bool:
        return self.peft is None


def run_dpo(cfg: DpoStage, ctx: RunContext) -> dict[str, str]:
    """Train the policy; save it to ``<stage>/model`` (with LoRA also ``<stage>/adapter``, PEFT format, and the
    merged model as ``model``) and the held-out metrics to ``<stage>/eval.json``; return ``{"model", "eval"}``
    (and ``"adapter"``).

    The reference is the starting model: with LoRA the same model with its adapter disabled; without, the model
    before training (its log-probs precomputed), or a frozen copy when ``precompute_reference`` is off.
    """
    check_dpo_settings(cfg.beta, cfg.loss_type, cfg.label_smoothing)
    pairs = pairs_from_examples(ctx.dataset(cfg.data), cfg.data)
    eval_pairs = pairs_from_examples(ctx.dataset(cfg.eval_data), cfg.eval_data)
    stage = start_training_stage(cfg, ctx)
    max_len = min(cfg.max_len, context_window(stage.model, stage.tokenizer))
    ref_model = None
    if cfg.peft is None and not cfg.precompute_reference:
        ref_model = copy.deepcopy(stage.model).eval().requires_grad_(False)
    stage.log(event="data", train_pairs=len(pairs), eval_pairs=len(eval_pairs), max_len=max_len,
              reference="adapter disabled" if cfg.peft else "frozen copy" if ref_model else "precomputed")
    # The adapter is added before train(), so that resuming loads a checkpoint whose state dict has its keys.
    if cfg.peft is not None:
        add_peft_for_training(stage, cfg.peft)
    result = train_dpo(stage.model, stage.tokenizer, pairs, stage.train, stage.out_dir, stage.log, beta=cfg.beta,
                       loss_type=cfg.loss_type, ref_model=ref_model, max_len=max_len,
                       label_smoothing=cfg.label_smoothing, eval_pairs=eval_pairs,
                       precompute_reference=cfg.precompute_reference, group_by_length=cfg.group_by_length)
    metrics = {k.removeprefix("eval_"): v for k, v in result.eval.items()}
    metrics["n"] = len(eval_pairs)
    stage.log(event="held_out", **{f"eval_{k}": v for k, v in metrics.items()})
    source = ctx.model_path(cfg.model)
    settings = {"model": source, "data": cfg.data, "eval_data": cfg.eval_data, "beta": cfg.beta,
                "loss_type": cfg.loss_type, "label_smoothing": cfg.label_smoothing,
                "precompute_reference": cfg.precompute_reference, "max_len": max_len,
                "group_by_length": cfg.group_by_length,
                "peft": cfg.peft.model_dump(mode="json") if cfg.peft else None, "train_pairs": len(pairs),
                "steps": result.step, "train": stage.train.model_dump(mode="json")}
    eval_path = write_eval(stage.out_dir, {"kind": "dpo", "metrics": metrics, "settings": settings})
    if cfg.peft is None:
        produced = finish_training_stage(stage, result)
    else:
        produced = finish_peft_stage(stage, result, cfg.peft, base_model=source)
    return {**produced, "eval": eval_path}


def section(run: Run) -> str:
    """The DPO table of report.md's Alignment chapter: held-out implicit-reward accuracy, margin and rewards per
    stage, with its method and loss."""
    found = [(name, data) for name in run.stages_of("dpo") if (data := run.eval_json(name)) is not None]
    if not found:
        return ""
    lines = ["### DPO", "", PREFERENCE_INTRO, "",
             "| Stage | Method | Loss, β | Train pairs | Held-out pairs | Implicit-reward accuracy | Margin "
             "| Chosen reward | Rejected reward |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, data in found:
        m, s = data.get("metrics") or {}, data.get("settings") or {}
        peft = s.get("peft") or {}
        method = f"lora r={peft.get('r')}" if peft else "full"
        loss = f"{s.get('loss_type', 'sigmoid')}, β={s.get('beta', '—')}"
        lines.append(f"| {md(name)} | {method} | {md(loss)} | {s.get('train_pairs', '—')} | {m.get('n', '—')} | "
                     f"{fraction(m.get('accuracy'))} | {fraction(m.get('margin'))} | "
                     f"{fraction(m.get('chosen_reward'))} | {fraction(m.get('rejected_reward'))} |")
    return "\n".join(lines) + "\n"
