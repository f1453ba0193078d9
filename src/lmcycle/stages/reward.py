"""RewardStage: a reward model trained on a preference dataset, scored on held-out pairs.

The backbone is the stage's ``model`` (an earlier stage, a path or a hub id): with ``backbone: auto`` a
``*ForCausalLM`` / ``*LMHeadModel`` checkpoint becomes a decoder with a scalar head, anything else a one-label
sequence classifier (:func:`lmcycle.align.reward.load_reward_backbone`). It trains on ``data`` with ``loss``:

- ``pairwise`` (the default): Bradley-Terry on the strict pairs (:func:`lmcycle.align.reward.train_reward_model`),
  optionally subtracting each pair's margin; a pair with a soft target (format ``pairs``, e.g. AI feedback) trains
  on the cross-entropy to it (:func:`lmcycle.align.reward.soft_bradley_terry_losses`);
- ``listwise`` (Plackett-Luce, ties as groups), ``rao_kupper`` or ``davidson`` (tie-aware, θ / ν fixed or
  ``learned``) on the whole rankings (:func:`lmcycle.align.reward.train_ranking_reward_model`): ``data`` must hold
  rankings (formats ``rankings``, ``label_db``), whose examples carry them (``meta["ranking"]``,
  :func:`lmcycle.data.preferences.rankings_from_examples`), so they follow the dataset's by-prompt split;
  ``batch_size`` then counts rankings.

``data`` is one dataset or a list of them, concatenated in order (e.g. an AI judge's soft pairs and human
``hh_rlhf`` pairs); the eval.json settings count the soft pairs (target < 1) and give the mean target.

``labeler_weights: agreement`` weights each pair's or ranking's loss by its labeler's agreement with the others
(:func:`lmcycle.feedback.agreement.labeler_weights` over the training rankings). Then it scores ``eval_data``:
pair accuracy, the pairwise loss, mean margin and reward statistics on its strict pairs for every loss (the
numbers the report compares), plus the ranking loss and top-1 accuracy (listwise) or the tie log-likelihood (tie
models) when ``eval_data`` holds rankings, go to ``<stage>/eval.json`` with the loss and its parameters; the
model, with the training data's reward mean/std for PPO's normalisation, to ``<stage>/model``.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from lmcycle.align.reward import (
    TIE_NAMES,
    encode_pairs,
    encode_rankings,
    held_out_ranking_metrics,
    held_out_reward_metrics,
    load_reward_backbone,
    pair_batches,
    ranking_batches,
    train_ranking_reward_model,
    train_reward_model,
)
from lmcycle.config import DatasetName, ModelRef
from lmcycle.data.preferences import PreferencePair, Ranking, pairs_from_examples, rankings_from_examples
from lmcycle.errors import LmcycleError
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
    data: DatasetName | list[DatasetName] = Field(
        description="preference dataset (format hh_rlhf, pairs, rankings or label_db), or a list of them, "
        "concatenated in order (e.g. AI-feedback soft pairs plus human pairs)")
    eval_data: DatasetName = Field(description="held-out preference dataset: pair accuracy, loss, reward statistics")
    max_len: int = Field(512, ge=8, description="tokens of prompt + response; the prompt's start is cut first")
    margin: bool = Field(False, description="subtract each pair's margin (rank difference) inside the loss")
    loss: Literal["pairwise", "listwise", "rao_kupper", "davidson"] = Field(
        "pairwise", description="pairwise: Bradley-Terry on strict pairs; listwise: Plackett-Luce over each "
        "ranking (ties as groups); rao_kupper, davidson: tie-aware pair models over each ranking's strict and tied "
        "pairs. All but pairwise need rankings (formats rankings, label_db); train.batch_size then counts rankings")
    rao_kupper_theta: float | Literal["learned"] = Field(
        1.5, description="loss rao_kupper: θ > 1 (the larger, the likelier a tie between close scores), or learned "
        "(from 1.5, as θ = exp(softplus(raw)))")
    davidson_nu: float | Literal["learned"] = Field(
        1.0, description="loss davidson: ν > 0 (the weight of a tie), or learned (from 1.0, as ν = exp(raw))")
    labeler_weights: Literal["none", "agreement"] = Field(
        "none", description="agreement: weight each ranking's (or pair's) loss by its labeler's agreement with the "
        "others (lmcycle.feedback.agreement.labeler_weights); needs rankings")
    group_by_length: bool = Field(True, description="batch pairs of similar length together (less padding, "
                                                    "faster steps); off: plainly shuffled batches")
    train: TrainConfig

    @field_validator("data")
    @classmethod
    def _some_data(cls, data: str | list[str]) -> str | list[str]:
        if isinstance(data, list) and not data:
            raise ValueError("give at least one dataset")
        if isinstance(data, list) and len(set(data)) < len(data):
            raise ValueError("a dataset is listed twice (its pairs would count double)")
        return data

    @property
    def data_names(self) -> list[str]:
        """The training datasets' names, in order (``data`` as a list)."""
        return [self.data] if isinstance(self.data, str) else list(self.data)

    @field_validator("loss")
    @classmethod
    def _margin_is_pairwise(cls, loss: str, info: ValidationInfo) -> str:
        if loss != "pairwise" and info.data.get("margin"):
            raise ValueError(f"margin only applies to loss pairwise, not {loss} (set margin: false)")
        return loss

    @field_validator("rao_kupper_theta", "davidson_nu")
    @classmethod
    def _tie_parameter(cls, value: float | str, info: ValidationInfo) -> float | str:
        loss = "rao_kupper" if info.field_name == "rao_kupper_theta" else "davidson"
        if info.data.get("loss", loss) != loss:
            raise ValueError(f"only applies to loss {loss}")
        if loss == "rao_kupper" and value != "learned" and not value > 1:
            raise ValueError(f"θ must be > 1 (at θ = 1 a tie has probability 0), got {value}")
        if loss == "davidson" and value != "learned" and not value > 0:
            raise ValueError(f"ν must be > 0 (at ν = 0 a tie has probability 0), got {value}")
        return value

    @property
    def trains_every_parameter(self) -> bool:
        return True  # the backbone trains with the head

    @property
    def rankings_field(self) -> str | None:
        """The setting that needs ``data`` to hold whole rankings (``loss``, ``labeler_weights``), or None."""
        if self.loss != "pairwise":
            return "loss"
        return "labeler_weights" if self.labeler_weights != "none" else None

    def data_problem(self, data: dict[str, Any]) -> tuple[str, str] | None:
        """``(field, message)`` when the recipe's ``data`` section (name -> DatasetConfig) says that ``data``
        cannot feed this stage: a listwise or tie-aware loss, or agreement weights, on a dataset of pairs read
        as pairs. Known from the configs alone, so it can be found before anything runs; a dataset the section
        does not describe passes (its examples are checked when the stage loads them)."""
        field = self.rankings_field
        if field is None:
            return None
        for name in self.data_names:
            found = getattr(data.get(name), "format", None)
            if found is None or found in RANKING_FORMATS:
                continue
            setting = f"loss {self.loss}" if field == "loss" else f"labeler_weights {self.labeler_weights}"
            return field, (f"{setting} needs whole rankings, but dataset '{name}' is format {found} (pairs): use "
                           f"format {' or '.join(RANKING_FORMATS)}, or loss pairwise")
        return None


RANKING_FORMATS = ("rankings", "label_db")  # the dataset formats whose examples carry their rankings


def run_reward(cfg: RewardStage, ctx: RunContext) -> dict[str, str]:
    """Train the reward model; save it to ``<stage>/model`` (:meth:`~lmcycle.align.reward.RewardModel.save`,
    with the training data's reward mean/std) and its held-out metrics to ``<stage>/eval.json``; return
    ``{"model", "eval"}``. A loss that needs rankings on a dataset of pairs fails before any model loads."""
    name = cfg.stage_name
    problem = cfg.data_problem(ctx.data)
    if problem:
        raise LmcycleError(problem[1], file=ctx.recipe_file, field=problem[0])
    dtype = model_dtype(cfg, ctx)
    out_dir = ctx.stage_dir(name)
    tcfg = cfg.train.model_copy(update={"seed": ctx.seed_for(cfg.train.seed)})
    by_name = {n: ctx.dataset(n) for n in cfg.data_names}
    eval_examples = ctx.dataset(cfg.eval_data)
    pairs = [p for n, examples in by_name.items() for p in pairs_from_examples(examples, n)]
    eval_pairs = pairs_from_examples(eval_examples, cfg.eval_data)
    rankings = eval_rankings = weights = None
    if cfg.rankings_field:
        # per dataset: ranking indices are numbered within each dataset's examples
        rankings = [r for n, examples in by_name.items() for r in _rankings_of(cfg, n, examples, ctx)]
        eval_rankings = _held_out_rankings(eval_examples, cfg.eval_data)
    if cfg.labeler_weights == "agreement":
        # lazy: only this setting needs the labeling app's modules
        from lmcycle.feedback.agreement import labeler_weights

        weights = dict(labeler_weights(rankings))
    source = ctx.model_path(cfg.model)
    seed_everything(tcfg.seed)  # the fresh score head's init is part of the run
    model, tokenizer = load_reward_backbone(source, cfg.backbone, ctx.device, ctx.attn_implementation, dtype=dtype)
    max_len = min(cfg.max_len, context_window(model.backbone, tokenizer))

    def log(**metrics) -> None:
        ctx.log(name, **metrics)

    log(event="data", train_pairs=len(pairs), eval_pairs=len(eval_pairs), max_len=max_len, kind=model.kind,
        loss=cfg.loss, **({} if rankings is None else {"train_rankings": len(rankings),
                                                       "eval_rankings": len(eval_rankings or [])}))
    loss_params: dict[str, Any] = {}
    if cfg.loss == "pairwise":
        result = train_reward_model(model, tokenizer, pairs, tcfg, out_dir, log, margin=cfg.margin, max_len=max_len,
                                    eval_pairs=eval_pairs, group_by_length=cfg.group_by_length, weights=weights)
    else:
        tie = {"rao_kupper": cfg.rao_kupper_theta, "davidson": cfg.davidson_nu}.get(cfg.loss)
        result, loss_params = train_ranking_reward_model(
            model, tokenizer, rankings, tcfg, out_dir, log, loss=cfg.loss,
            tie=None if tie == "learned" else tie, learn_tie=tie == "learned", max_len=max_len,
            eval_pairs=eval_pairs, eval_rankings=eval_rankings, group_by_length=cfg.group_by_length,
            weights=weights)
    model.eval()
    metrics = held_out_reward_metrics(model, pair_batches(encode_pairs(eval_pairs, tokenizer, max_len), tokenizer,
                                                          tcfg.batch_size), cfg.margin)
    if cfg.loss != "pairwise" and eval_rankings:
        value = loss_params.get(TIE_NAMES.get(cfg.loss, ""))
        metrics.update(held_out_ranking_metrics(
            model, ranking_batches(encode_rankings(eval_rankings, tokenizer, max_len), tokenizer, tcfg.batch_size,
                                   cfg.loss), cfg.loss, None if value is None else math.log(value)))
    log(event="held_out", **{f"eval_{k}": v for k, v in metrics.items()})
    model_dir = out_dir / "model"
    if is_main():
        model.save(model_dir, tokenizer)
    settings = {"model": source, "backbone": model.kind, "data": cfg.data, "eval_data": cfg.eval_data,
                "max_len": max_len, "margin": cfg.margin, "loss": cfg.loss, "loss_params": loss_params,
                "labeler_weights": cfg.labeler_weights, "weights": weights,
                "group_by_length": cfg.group_by_length, "train_pairs": len(pairs),
                **target_summary(pairs),
                "train_rankings": None if rankings is None else len(rankings), "steps": result.step,
                "normalisation": model.stats, "train": tcfg.model_dump(mode="json")}
    eval_path = write_eval(out_dir, {"kind": "reward", "metrics": metrics, "settings": settings})
    log(event="train_end", step=result.step, wall_time=round(result.wall_time, 2),
        tokens_per_s=round(result.tokens_per_s, 1), peak_rss_mb=round(result.peak_rss_mb, 1),
        rss_growth_mb=round(result.rss_growth_mb, 1))
    return {"model": str(model_dir), "eval": eval_path}


def target_summary(pairs: list[PreferencePair]) -> dict[str, Any]:
    """What eval.json's settings say of the training targets: ``soft_target_pairs`` (how many pairs have a target
    below 1) and ``mean_target`` (over every pair; 1.0 for hard labels only)."""
    return {"soft_target_pairs": sum(p.target < 1.0 for p in pairs),
            "mean_target": sum(p.target for p in pairs) / len(pairs) if pairs else None}


def _rankings_of(cfg: RewardStage, dataset: str, examples: list, ctx: RunContext) -> list[Ranking]:
    """The training rankings behind ``dataset``'s pairs; a dataset of pairs read as pairs is an error on the
    setting that needs them (``loss`` or ``labeler_weights``)."""
    try:
        return rankings_from_examples(examples, dataset)
    except LmcycleError as e:
        setting = f"loss {cfg.loss}" if cfg.rankings_field == "loss" else f"labeler_weights {cfg.labeler_weights}"
        raise LmcycleError(f"{setting} needs whole rankings: {e.message}", file=ctx.recipe_file,
                           field=cfg.rankings_field) from None


def _held_out_rankings(examples: list, dataset: str) -> list[Ranking] | None:
    """The held-out rankings, or None when ``eval_data`` holds pairs only (then only the pair metrics, which every
    loss shares, are scored)."""
    try:
        return rankings_from_examples(examples, dataset)
    except LmcycleError:
        return None


# Reward models and DPO policies are scored on the same held-out pairs, so their tables share this intro.
PREFERENCE_INTRO = ("Held-out preference pairs (prompts never trained on). A reward model is right on a pair when "
                    "the chosen reply scores higher; a DPO policy when its implicit reward β·(log π − log π_ref) "
                    "of the chosen reply is higher. Chance is 0.50.")


def section(run: Run) -> str:
    """The reward-model table of report.md's Alignment chapter: held-out pair accuracy, loss, margin and reward
    spread per stage; a Loss column when the stages trained with different losses, and the top-1 accuracy and
    tie log-likelihood columns when a stage has them."""
    found = [(name, data) for name in run.stages_of("reward") if (data := run.eval_json(name)) is not None]
    if not found:
        return ""
    losses = [loss_label(data.get("settings") or {}) for _, data in found]
    extra = [(key, title) for key, title in (("top1_accuracy", "Top-1"), ("tie_loglik", "Tie log-lik"))
             if any(is_number((data.get("metrics") or {}).get(key)) for _, data in found)]
    show_loss = len(set(losses)) > 1
    # With a Loss column, the held-out Bradley-Terry loss (the same measure for every stage) is the "Pair loss".
    head = ["Stage", "Backbone", *(["Loss"] if show_loss else []), "Train pairs", "Held-out pairs", "Pair accuracy",
            "Pair loss" if show_loss else "Loss", "Margin (r_c − r_r)", "Reward mean ± std",
            *(title for _, title in extra)]
    align = ["---", "---", *(["---"] if show_loss else []), *["---:"] * (len(head) - 2 - show_loss)]
    lines = ["### Reward models", "", PREFERENCE_INTRO, "", "| " + " | ".join(head) + " |",
             "|" + "|".join(align) + "|"]
    for (name, data), loss in zip(found, losses, strict=True):
        m, s = data.get("metrics") or {}, data.get("settings") or {}
        spread = (f"{m['reward_mean']:.3f} ± {m['reward_std']:.3f}"
                  if is_number(m.get("reward_mean")) and is_number(m.get("reward_std")) else "—")
        cells = [md(name), md(str(s.get("backbone", "—"))), *([md(loss)] if show_loss else []),
                 str(s.get("train_pairs", "—")), str(m.get("n", "—")), fraction(m.get("accuracy")),
                 fraction(m.get("loss")), fraction(m.get("margin")), spread,
                 *(fraction(m.get(key)) for key, _ in extra)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


LOSS_NAMES = {"pairwise": "pairwise (Bradley-Terry)", "listwise": "listwise (Plackett-Luce)",
              "rao_kupper": "Rao-Kupper", "davidson": "Davidson"}


def loss_label(settings: dict) -> str:
    """How the table names a stage's loss: its name, θ or ν (``learned`` when trained), margin and weighting.
    An eval.json from before the setting existed is pairwise."""
    loss = str(settings.get("loss") or "pairwise")
    params = settings.get("loss_params") or {}
    text = LOSS_NAMES.get(loss, loss)
    for key, symbol in (("theta", "θ"), ("nu", "ν")):
        if is_number(params.get(key)):
            text += f" {symbol}={params[key]:.2f}" + (" learned" if params.get("learned") else "")
    if settings.get("margin"):
        text += " + margin"
    if settings.get("labeler_weights") not in (None, "none"):
        text += f", {settings['labeler_weights']}-weighted"
    return text


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
