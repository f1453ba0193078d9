"""RewardStage: a reward model trained on a preference dataset, scored on held-out pairs.

The backbone is the stage's ``model`` (an earlier stage, a path or a hub id): with ``backbone: auto`` a
``*ForCausalLM`` / ``*LMHeadModel`` checkpoint becomes a decoder with a scalar head, anything else a one-label
sequence classifier (:func:`lmcycle.align.reward.load_reward_backbone`). It trains with the pairwise
(Bradley-Terry) loss on ``data`` (:func:`lmcycle.align.reward.train_reward_model`), optionally subtracting each
pair's margin, then scores ``eval_data``: pair accuracy, loss, mean margin and reward statistics go to
``<stage>/eval.json``; the model, with the training pairs' reward mean/std for PPO's normalisation, to
``<stage>/model``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from lmcycle.align.reward import (
    encode_pairs,
    held_out_reward_metrics,
    load_reward_backbone,
    pair_batches,
    train_reward_model,
)
from lmcycle.config import DatasetName, ModelRef
from lmcycle.data.preferences import pairs_from_examples
from lmcycle.models.load import context_window
from lmcycle.report.markdown import figure, fraction, is_number, md, save_png
from lmcycle.report.rundir import Run
from lmcycle.stages.common import ModelStage, model_dtype, write_eval
from lmcycle.stages.context import RunContext
from lmcycle.train.distributed import is_main
from lmcycle.train.loop import TrainConfig, seed_everything


class RewardStage(ModelStage):
    """Train a reward model on a preference dataset; score held-out pairs; save it with its reward statistics."""

    type: Literal["reward"] = "reward"
    model: ModelRef | None = Field(None, description="backbone: an earlier stage, a path or a hub id")
    backbone: Literal["auto", "classifier", "causal_lm"] = Field(
        "auto", description="auto: causal_lm for a *ForCausalLM / *LMHeadModel checkpoint, else classifier")
    data: DatasetName = Field(description="preference dataset (format hh_rlhf or rankings)")
    eval_data: DatasetName = Field(description="held-out preference dataset: pair accuracy, loss, reward statistics")
    max_len: int = Field(512, ge=8, description="tokens of prompt + response; the prompt's start is cut first")
    margin: bool = Field(False, description="subtract each pair's margin (rank difference) inside the loss")
    group_by_length: bool = Field(True, description="batch pairs of similar length together (less padding, "
                                                    "faster steps); off: plainly shuffled batches")
    train: TrainConfig

    @property
    def trains_every_parameter(self) -> bool:
        return True  # the backbone trains with the head


def run_reward(cfg: RewardStage, ctx: RunContext) -> dict[str, str]:
    """Train the reward model; save it to ``<stage>/model`` (:meth:`~lmcycle.align.reward.RewardModel.save`,
    with the training pairs' reward mean/std) and its held-out metrics to ``<stage>/eval.json``; return
    ``{"model", "eval"}``."""
    name = cfg.stage_name
    dtype = model_dtype(cfg, ctx)
    out_dir = ctx.stage_dir(name)
    tcfg = cfg.train.model_copy(update={"seed": ctx.seed_for(cfg.train.seed)})
    pairs = pairs_from_examples(ctx.dataset(cfg.data), cfg.data)
    eval_pairs = pairs_from_examples(ctx.dataset(cfg.eval_data), cfg.eval_data)
    source = ctx.model_path(cfg.model)
    seed_everything(tcfg.seed)  # the fresh score head's init is part of the run
    model, tokenizer = load_reward_backbone(source, cfg.backbone, ctx.device, ctx.attn_implementation, dtype=dtype)
    max_len = min(cfg.max_len, context_window(model.backbone, tokenizer))

    def log(**metrics) -> None:
        ctx.log(name, **metrics)

    log(event="data", train_pairs=len(pairs), eval_pairs=len(eval_pairs), max_len=max_len, kind=model.kind)
    result = train_reward_model(model, tokenizer, pairs, tcfg, out_dir, log, margin=cfg.margin, max_len=max_len,
                                eval_pairs=eval_pairs, group_by_length=cfg.group_by_length)
    model.eval()
    metrics = held_out_reward_metrics(model, pair_batches(encode_pairs(eval_pairs, tokenizer, max_len), tokenizer,
                                                          tcfg.batch_size), cfg.margin)
    log(event="held_out", **{f"eval_{k}": v for k, v in metrics.items()})
    model_dir = out_dir / "model"
    if is_main():
        model.save(model_dir, tokenizer)
    settings = {"model": source, "backbone": model.kind, "data": cfg.data, "eval_data": cfg.eval_data,
                "max_len": max_len, "margin": cfg.margin, "group_by_length": cfg.group_by_length,
                "train_pairs": len(pairs), "steps": result.step,
                "normalisation": model.stats, "train": tcfg.model_dump(mode="json")}
    eval_path = write_eval(out_dir, {"kind": "reward", "metrics": metrics, "settings": settings})
    log(event="train_end", step=result.step, wall_time=round(result.wall_time, 2),
        tokens_per_s=round(result.tokens_per_s, 1), peak_rss_mb=round(result.peak_rss_mb, 1),
        rss_growth_mb=round(result.rss_growth_mb, 1))
    return {"model": str(model_dir), "eval": eval_path}


# Reward models and DPO policies are scored on the same held-out pairs, so their tables share this intro.
PREFERENCE_INTRO = ("Held-out preference pairs (prompts never trained on). A reward model is right on a pair when "
                    "the chosen reply scores higher; a DPO policy when its implicit reward β·(log π − log π_ref) "
                    "of the chosen reply is higher. Chance is 0.50.")


def section(run: Run) -> str:
    """The reward-model table of report.md's Alignment chapter: held-out pair accuracy, loss, margin and reward
    spread per stage."""
    found = [(name, data) for name in run.stages_of("reward") if (data := run.eval_json(name)) is not None]
    if not found:
        return ""
    lines = ["### Reward models", "", PREFERENCE_INTRO, "",
             "| Stage | Backbone | Train pairs | Held-out pairs | Pair accuracy | Loss | Margin (r_c − r_r) "
             "| Reward mean ± std |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, data in found:
        m, s = data.get("metrics") or {}, data.get("settings") or {}
        spread = (f"{m['reward_mean']:.3f} ± {m['reward_std']:.3f}"
                  if is_number(m.get("reward_mean")) and is_number(m.get("reward_std")) else "—")
        lines.append(f"| {md(name)} | {md(str(s.get('backbone', '—')))} | {s.get('train_pairs', '—')} | "
                     f"{m.get('n', '—')} | {fraction(m.get('accuracy'))} | {fraction(m.get('loss'))} | "
                     f"{fraction(m.get('margin'))} | {spread} |")
    return "\n".join(lines) + "\n"


def preference_curves(run: Run) -> str:
    """The held-out accuracy of every reward and DPO stage over its training steps, in one plot: it closes the
    Alignment chapter, after both kinds' tables (a part of its own, so that either kind alone still has it)."""
    stages = [name for kind in ("reward", "dpo") for name in run.stages_of(kind)
              if run.eval_json(name) is not None]
    curves = {name: [(r["step"], r["eval_accuracy"]) for r in run.rows if r.get("stage") == name
                     and is_number(r.get("step")) and is_number(r.get("eval_accuracy"))] for name in stages}
    curves = {name: points for name, points in curves.items() if points}
    if not curves:
        return ""
    fig = figure(6, 3.6)
    ax = fig.subplots()
    for name, points in curves.items():
        ax.plot([s for s, _ in points], [a for _, a in points], "o-", label=name)
    ax.axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlabel("step")
    ax.set_ylabel("held-out accuracy")
    ax.set_title("Held-out preference accuracy")
    ax.legend()
    save_png(fig, run.dir / "plots" / "alignment_accuracy.png")
    return "![held-out accuracy over training steps](plots/alignment_accuracy.png)\n"
