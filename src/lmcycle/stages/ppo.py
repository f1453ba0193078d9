"""PpoStage: PPO-RLHF of a policy against a reward, with a KL leash and the reward-hacking guard.

```yaml
- type: ppo
  model: sft                       # the policy to start from (and, frozen, the reference)
  prompts: red_team                # a dataset: each example's input is a prompt
  reward: {kind: classifier, path: toxicity, label: not_toxic}    # or {kind: model, path: rm}, {kind: python, ...}
  judge: {kind: classifier, path: /models/other_classifier, label: not_toxic}   # optional, held out
  generation: {do_sample: true, temperature: 1.0, max_new_tokens: 24}
  rollouts: 40
  ppo: {rollout_size: 32, ppo_epochs: 4, beta: 0.05, kl_target: 0.1}
  peft: {method: lora, r: 8}       # the reference is then the same model with the adapter disabled
  guard: {early_stop: true}
  train: {batch_size: 8, lr: 1.0e-4}
```

Writes ``<stage>/model`` (for LoRA also ``<stage>/adapter``), a ``rollout`` row per rollout in metrics.jsonl
(reward, KL k1/k3, β, length, distinct-n, repetition, entropy, judge, PPO losses), ``alarm`` rows, and sample
responses in ``<stage>/samples/rollout_NNNN.jsonl`` (files, never the console: they may be offensive).

The loop is :func:`ppo_batches`: per rollout 1 generate, 2 score, 3 reward and KL, 4 GAE, then ``ppo_epochs``
passes over minibatches, each minibatch one optimizer step of the shared loop (:func:`lmcycle.train.loop.train`).
Checkpoints fall on rollout boundaries and hold β, so a resumed run makes the next rollout again exactly (same
weights, same seed).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Iterator
from typing import Literal

import torch
from pydantic import Field, ValidationInfo, field_validator

from lmcycle.align.guard import GuardConfig, check_alarms, should_stop
from lmcycle.align.ppo import (
    PolicyWithValue,
    PpoSettings,
    Responses,
    Rollout,
    UpdateStats,
    adaptive_beta,
    finish_scores,
    gae,
    kl_estimates,
    pad_episodes,
    per_token_rewards,
    ppo_loss,
    reference_scorer,
    rollout_stats,
    sample_responses,
    score_tokens,
    steps_per_rollout,
    whiten,
)
from lmcycle.align.reward_sources import RewardSpec, build_reward, check_rewards, describe_reward
from lmcycle.artifacts import load_model
from lmcycle.atomic import atomic_write_text
from lmcycle.config import DatasetName, ModelRef
from lmcycle.data.batching import pad_id_of
from lmcycle.data.templates import get_template
from lmcycle.errors import LmcycleError
from lmcycle.models.device import resolve_device
from lmcycle.models.generate import DecodingConfig
from lmcycle.report.markdown import figure, filename, fraction, is_number, md, plain, save_png
from lmcycle.report.rundir import Run
from lmcycle.stages.common import ModelStage, TrainingStage, finish_training_stage, start_training_stage
from lmcycle.stages.context import RunContext
from lmcycle.stages.peft import LoraPeft, add_peft_for_training, finish_peft_stage
from lmcycle.train.distributed import (
    all_gather_object,
    is_distributed,
    is_main,
    launch_world_size,
    rank,
    world_size,
)
from lmcycle.train.engines import held_params, shard_frozen
from lmcycle.train.loop import StopTraining, TrainConfig, micro_batch_indices, train

Batch = dict[str, torch.Tensor]


class PpoTrain(TrainConfig):
    """The optimizer side of PPO: ``batch_size`` episodes per minibatch (one optimizer step)."""

    max_steps: int | None = Field(None, description="leave unset: rollouts x ppo_epochs x minibatches")
    batch_size: int = Field(8, ge=1)
    lr: float = Field(1e-5, gt=0)
    min_lr_ratio: float = Field(1.0, ge=0, le=1, description="1.0: a constant learning rate")
    max_grad_norm: float | None = Field(1.0, gt=0)
    spike_factor: float | None = Field(None, gt=1, description="off: a PPO loss is no cross-entropy and may "
                                       "jump when the rewards do")


class PpoStage(ModelStage):
    """Optimise a policy with PPO against a reward (model, classifier or Python function) and a KL leash."""

    type: Literal["ppo"] = "ppo"
    model: ModelRef | None = None
    prompts: DatasetName = Field(description="dataset whose example inputs are the prompts")
    template: str | dict | None = Field(None, description="None: each input as it is")
    reward: RewardSpec
    judge: RewardSpec | None = Field(None, description="held-out reward: logged, never optimised")
    generation: DecodingConfig = DecodingConfig(do_sample=True, max_new_tokens=32)
    rollouts: int = Field(ge=1)
    ppo: PpoSettings = PpoSettings()
    peft: LoraPeft | None = Field(None, description="None: every parameter trains; a frozen copy is the reference")
    guard: GuardConfig = GuardConfig()
    samples: int = Field(8, ge=0, description="responses kept per sampled rollout")
    samples_every: int = Field(10, ge=1, description="keep samples of rollout 0, every N-th and the last")
    save_every_rollouts: int = Field(0, ge=0, description="0: checkpoint after the last rollout only")
    train: PpoTrain = PpoTrain()

    @property
    def trains_every_parameter(self) -> bool:
        return self.peft is None

    @field_validator("train")
    @classmethod
    def _warmup_within_run(cls, train: PpoTrain, info: ValidationInfo) -> PpoTrain:
        # PPO's step count comes from the rollouts, so TrainConfig cannot compare warmup with it by itself.
        ppo, rollouts = info.data.get("ppo"), info.data.get("rollouts")
        world = launch_world_size()
        per_step = train.batch_size * train.grad_accum * world
        if ppo is None or rollouts is None or ppo.rollout_size % per_step:
            return train  # an earlier error, or one run_ppo names (rollout_size not a multiple)
        total = rollouts * steps_per_rollout(ppo, train.batch_size, train.grad_accum, world)
        if train.warmup_steps > total:
            raise ValueError(f"warmup_steps ({train.warmup_steps}) is more than the {total} optimizer steps of "
                             f"{rollouts} rollouts")
        return train


def load_prompts(cfg: PpoStage, ctx: RunContext) -> list[str]:
    """The prompts: each example's input, rendered with ``template`` when set."""
    examples = ctx.dataset(cfg.prompts)
    template = get_template(cfg.template) if cfg.template is not None else None
    prompts = [template.render(ex, []) if template else ex.input for ex in examples]
    prompts = [p for p in prompts if p.strip()]
    if len(prompts) < cfg.ppo.rollout_size:
        raise LmcycleError(f"dataset '{cfg.prompts}' has {len(prompts)} non-empty prompts, fewer than one rollout "
                           f"({cfg.ppo.rollout_size})", file=ctx.recipe_file, field="prompts")
    return prompts


def ppo_batches(run: PpoRun, start: int) -> Iterator[list[Batch]]:
    """PPO's outer loop from optimizer step ``start`` on, one item per step (its micro-batches): per rollout
    1 generate, 2 score, 3 reward and KL, 4 GAE, log the rollout, 5 ``ppo_epochs`` passes over its minibatches."""
    cfg, ppo, stage, agent = run.cfg, run.cfg.ppo, run.stage, run.agent
    tcfg = stage.train
    minibatches = ppo.rollout_size // (tcfg.batch_size * tcfg.grad_accum * world_size())
    # The one divmod: a resumed run starts at its checkpoint's step, which names the rollout to make again (same
    # weights and seed: the same rollout) and the minibatches of it already trained on. From here on it counts.
    first, skip = divmod(start, ppo.ppo_epochs * minibatches)
    step = start
    for i in range(first, cfg.rollouts):
        run.start_rollout(i, step)

        # 1 generate: rollout_size prompts in rollout i's order, sampled with rollout i's seed
        order = micro_batch_indices(len(run.prompts), i, ppo.rollout_size, 1, stage.seed)[0]
        prompts = [run.prompts[j] for j in order]
        decoding = cfg.generation.model_copy(update={"seed": cfg.generation.seed + i})
        responses = sample_shared(agent, stage.tokenizer, prompts, decoding)

        # 2 score the texts
        raw_scores = check_rewards(run.reward_fn(prompts, responses.texts), len(prompts), "function")
        scores = finish_scores(raw_scores, responses.endings, ppo)

        # 3 reward and KL per response token: the score at the last token, -β·KL at every one
        query, query_mask, response, response_mask = pad_episodes(responses, pad_id_of(stage.tokenizer),
                                                                  agent.seq2seq)
        mask = response_mask.float()
        old = score_tokens(agent, query, query_mask, response, response_mask, decoding.temperature,
                           ppo.forward_batch_size, run.ref)
        k1, k3 = kl_estimates(old["logp"], old["ref_logp"])
        beta = float(agent.kl_beta)
        rewards = per_token_rewards(scores, k1 if ppo.kl_estimator == "k1" else k3, mask, beta)

        # 4 GAE: advantages and returns from the rewards and the old values
        advantages, returns = gae(rewards, old["values"], mask, ppo.gamma, ppo.lam)
        if ppo.whiten_advantages:
            advantages = whiten(advantages, mask)
        rollout = Rollout(query, query_mask, response, response_mask, old["logp"], old["values"] * mask,
                          advantages, returns)

        stats = rollout_stats(raw_scores, scores, rewards, k1, k3, old, mask, beta, responses)
        if run.judge_fn is not None:
            stats["judge"] = float(check_rewards(run.judge_fn(prompts, responses.texts), len(prompts),
                                                 "judge").mean())
        if ppo.kl_target is not None:  # β for the next rollout, from this one's KL
            agent.kl_beta.fill_(adaptive_beta(beta, stats["kl"], ppo.kl_target, ppo.rollout_size, ppo.kl_horizon))
        run.log_rollout(i, step, stats, prompts, responses, raw_scores)  # raises StopTraining on the guard's stop

        # 5 ppo_epochs passes over the rollout, each in shuffled minibatches of one optimizer step
        for epoch in range(ppo.ppo_epochs):
            for minibatch in range(minibatches):
                within = epoch * minibatches + minibatch
                if within < skip:
                    continue
                groups = micro_batch_indices(ppo.rollout_size, within, tcfg.batch_size, tcfg.grad_accum,
                                             tcfg.seed * 7919 + i)
                yield [rollout.minibatch(g) for g in groups]
                step += 1
        skip = 0


def sample_shared(agent: PolicyWithValue, tokenizer, prompts: list[str], decoding: DecodingConfig) -> Responses:
    """The rollout's responses, generated by each rank for its share of ``prompts`` (every ``world``-th, from its
    rank on) and gathered on every rank in prompt order.

    Generation, PPO's slowest part, is split over the ranks; everything after it (scores, KL, GAE, whitening,
    the guard, β) sees the whole rollout on every rank, as one process would, so the ranks never disagree.
    """
    world = world_size()
    mine = sample_responses(agent, tokenizer, prompts[rank()::world], decoding)
    if world == 1:
        return mine
    parts = all_gather_object(mine)
    order = [(i % world, i // world) for i in range(len(prompts))]
    return Responses(*([getattr(parts[r], f.name)[j] for r, j in order] for f in dataclasses.fields(Responses)))


class PpoRun:
    """What :func:`ppo_batches` works with (agent, prompts, reward, judge, reference) and keeps between rollouts:
    the guard's history and the PPO losses of the rollout being trained on. ``batch_at`` and ``loss_fn`` are
    what :func:`~lmcycle.train.loop.train` calls."""

    def __init__(self, cfg: PpoStage, stage: TrainingStage, agent: PolicyWithValue, prompts: list[str],
                 reward_fn: Callable, judge_fn: Callable | None, ref: Callable):
        self.cfg, self.stage, self.agent, self.prompts = cfg, stage, agent, prompts
        self.reward_fn, self.judge_fn, self.ref = reward_fn, judge_fn, ref
        self.index: int | None = None  # the rollout being trained on
        self.updates = UpdateStats()
        self.batches: Iterator[list[Batch]] | None = None
        self.next_step: int | None = None
        # After a resume the guard's history is read back from the log (the last row per rollout wins).
        rows = {r["rollout"]: r for r in stage.ctx.read_metrics(stage.name) if r.get("event") == "rollout"}
        self.history = [rows[i] for i in sorted(rows)]

    def batch_at(self, step: int) -> list[Batch]:
        """The next item of :func:`ppo_batches`, started at the first step asked for (0, or a resumed run's)."""
        if self.batches is None:
            self.batches = ppo_batches(self, step)
        elif step != self.next_step:
            raise RuntimeError(f"PPO serves consecutive steps: asked for step {step} after {self.next_step - 1}")
        self.next_step = step + 1
        return next(self.batches)

    def loss_fn(self, agent: PolicyWithValue, batch: Batch) -> tuple[torch.Tensor, int]:
        return ppo_loss(agent, batch, self.cfg.ppo, self.cfg.generation.temperature, self.updates)

    def start_rollout(self, i: int, step: int) -> None:
        """Log the PPO losses of the rollout before ``i``; forget the guard's rows of ``i`` on (a resumed run's)."""
        self.log_updates(step)
        self.index = i
        self.history = [r for r in self.history if r["rollout"] < i]

    def log_updates(self, step: int) -> None:
        """Log the PPO losses of the rollout just trained on (if any)."""
        if self.index is not None and self.updates.minibatches + self.updates.skipped:
            self.stage.log(event="ppo_update", step=step, rollout=self.index,
                           **{k: round(v, 6) for k, v in self.updates.means().items()})
        self.updates = UpdateStats()

    def log_rollout(self, i: int, step: int, stats: dict[str, float], prompts: list[str], responses: Responses,
                    raw_scores: torch.Tensor) -> None:
        """Log rollout ``i``'s row and the guard's alarms, keep its samples; raise :class:`StopTraining` when the
        guard says stop."""
        row = {"rollout": i, **{k: round(v, 6) for k, v in stats.items()}}
        alarms = check_alarms([*self.history, row], self.cfg.guard, self.cfg.ppo.kl_target)
        row["alarms"] = len(alarms)
        self.history.append(row)
        self.stage.log(event="rollout", step=step, **row)
        for alarm in alarms:
            self.stage.log(event="alarm", step=step, rollout=i, **alarm)
        if self.cfg.samples and (i % self.cfg.samples_every == 0 or i == self.cfg.rollouts - 1):
            samples = [{"rollout": i, "prompt": p, "response": t, "score": float(s), "ending": e}
                       for p, t, s, e in zip(prompts, responses.texts, raw_scores.tolist(), responses.endings,
                                             strict=True)][: self.cfg.samples]
            if is_main():
                atomic_write_text(self.stage.out_dir / "samples" / f"rollout_{i:04d}.jsonl",
                                  "\n".join(json.dumps(s, ensure_ascii=False) for s in samples) + "\n")
        if should_stop([r.get("alarms", 0) for r in self.history], self.cfg.guard):
            reason = "; ".join(a["message"] for a in alarms)
            self.stage.log(event="early_stop", step=step, rollout=i, reason=reason)
            raise StopTraining(reason)


def run_ppo(cfg: PpoStage, ctx: RunContext) -> dict[str, str]:
    """Run PPO; save the policy to ``<stage>/model`` (LoRA: also ``<stage>/adapter``); return the artifacts."""
    if cfg.train.max_steps is not None:
        raise LmcycleError("PPO counts its steps from 'rollouts'; remove train.max_steps", file=ctx.recipe_file,
                           field="train.max_steps")
    stage = start_training_stage(cfg, ctx)
    steps = steps_per_rollout(cfg.ppo, stage.train.batch_size, stage.train.grad_accum, world_size())
    tcfg = TrainConfig(**stage.train.model_dump(exclude={"max_steps", "save_every"}),
                       max_steps=cfg.rollouts * steps, save_every=cfg.save_every_rollouts * steps)
    prompts = load_prompts(cfg, ctx)
    # distributed.frozen_models: the models that only score are whole on every rank, or sharded over the ranks.
    frozen = tcfg.distributed
    shard = functools.partial(shard_frozen, cfg=frozen, device=resolve_device(ctx.device))
    reward_fn = build_reward(cfg.reward, ctx.model_path, ctx.device, prepare=shard)
    judge_fn = build_reward(cfg.judge, ctx.model_path, ctx.device, prepare=shard) if cfg.judge is not None else None

    ref_model = None
    if cfg.peft is not None:
        add_peft_for_training(stage, cfg.peft)
    else:
        ref_model, _ = load_model(ctx.model_path(cfg.model), device=ctx.device, dtype=stage.dtype,
                                  attn_implementation=ctx.attn_implementation,
                                  empty=frozen.frozen_models == "shard" and is_distributed())
        ref_model = shard(ref_model)
    agent = PolicyWithValue(stage.model, cfg.ppo.beta).to(stage.model.device)
    ref = reference_scorer(agent, ref_model, cfg.generation.temperature)
    stage.log(event="ppo_setup", prompts=len(prompts), rollouts=cfg.rollouts, steps_per_rollout=steps,
              reference="adapter disabled" if ref_model is None else "frozen copy",
              frozen_models=frozen.frozen_models if is_distributed() else "one process",
              reference_params_on_rank0=held_params(ref_model) if ref_model is not None else None,
              reward=describe_reward(cfg.reward), judge=describe_reward(cfg.judge) if cfg.judge else None)

    run = PpoRun(cfg, stage, agent, prompts, reward_fn, judge_fn, ref)
    params = [p for p in agent.parameters() if p.requires_grad]
    # A rollout generates with the whole policy: a sharding engine gathers it once per rollout, not once per
    # layer per decoding step.
    result = train(agent, run.batch_at, run.loss_fn, tcfg, stage.out_dir, log=stage.log, params=params,
                   desc=stage.name, batch_needs_model=lambda step: step % steps == 0)
    run.log_updates(result.step)
    stage.model = agent.policy
    if cfg.peft is not None:
        return finish_peft_stage(stage, result, cfg.peft, base_model=ctx.model_path(cfg.model))
    return finish_training_stage(stage, result)

PPO_COLUMNS = [("score", "Score"), ("judge", "Judge"), ("kl", "KL k1"), ("kl_k3", "KL k3"), ("beta", "β"),
               ("response_len", "Length"), ("distinct_2", "Distinct-2"), ("repetition", "Repetition"),
               ("entropy", "Entropy"), ("alarms", "Alarms")]


def section(run: Run) -> str:
    """A section of report.md per stage that logged PPO rollouts: its setup, a table of selected rollouts, the
    guard's alarms, and a grid of the curves a reward hacker would bend."""
    stages = list(dict.fromkeys(r["stage"] for r in run.rows if r.get("event") == "rollout"))
    parts = []
    for stage in stages:
        mine = [r for r in run.rows if r.get("stage") == stage]
        # After a resume a rollout can be logged twice: the last row of each rollout wins.
        rollouts = list({r["rollout"]: r for r in mine if r.get("event") == "rollout"}.values())
        rollouts.sort(key=lambda r: r["rollout"])
        setup = next((r for r in mine if r.get("event") == "ppo_setup"), {})
        lines = [f"## PPO: {md(stage)}", "",
                 f"{len(rollouts)} rollouts, prompts drawn from a pool of {setup.get('prompts', '?')}; reference: "
                 f"{setup.get('reference', '?')}; reward: {md(_reward_label(setup.get('reward')))}"
                 + (f"; judge (never optimised): {md(_reward_label(setup.get('judge')))}"
                    if setup.get("judge") else "")
                 + ". Score = the reward before the KL penalty; KL is per response token, in nats "
                 "(k1 = log π − log π_ref, k3 = its never-negative estimator).", ""]
        cols = [(k, h) for k, h in PPO_COLUMNS if any(is_number(r.get(k)) for r in rollouts)]
        lines += ["| Rollout | " + " | ".join(h for _, h in cols) + " |", "|---:|" + "---:|" * len(cols)]
        for r in _spread(rollouts, 8):
            lines.append(f"| {r['rollout']} | " + " | ".join(_ppo_cell(r.get(k)) for k, _ in cols) + " |")
        alarms = [r for r in mine if r.get("event") == "alarm"]
        if alarms:
            kinds = [a.get("alarm") for a in alarms]
            lines += ["", "Guard alarms: " + ", ".join(f"{k} × {kinds.count(k)}" for k in dict.fromkeys(kinds))
                      + f"; first: rollout {alarms[0].get('rollout')}: {md(str(alarms[0].get('message')))}"]
        stop = next((r for r in mine if r.get("event") == "early_stop"), None)
        if stop:
            lines += ["", f"**Stopped early** at rollout {stop.get('rollout')}: {md(str(stop.get('reason')))}"]
        plot = _ppo_plot(run, stage, rollouts)
        if plot:
            lines += ["", f"![PPO curves of {stage}]({plot})"]
        lines += ["", f"Sample responses: `{stage}/samples/` (kept in files, not shown here: RL samples can be "
                      "offensive)."]
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def _reward_label(spec: object) -> str:
    """``classifier toxicity: not_toxic, log_odds``-style summary of a logged reward spec."""
    if not isinstance(spec, dict):
        return plain(spec)
    what = spec.get("path") or spec.get("function") or ""
    extra = [str(spec[k]) for k in ("label", "output") if spec.get(k)]
    return f"{spec.get('kind', '?')} {what}" + (f" ({', '.join(extra)})" if extra else "")


def _spread(items: list, k: int) -> list:
    """At most ``k`` items: the first, the last, and evenly spaced ones between."""
    if len(items) <= k:
        return items
    picks = sorted({round(i * (len(items) - 1) / (k - 1)) for i in range(k)})
    return [items[i] for i in picks]


def _ppo_cell(value: object) -> str:
    return str(value) if isinstance(value, int) else fraction(value)


def _ppo_plot(run: Run, stage: str, rollouts: list[dict]) -> str | None:
    if not rollouts:
        return None
    xs = [r["rollout"] for r in rollouts]
    panels = [("reward score (judge: right axis)", [("score", "score")]),
              ("KL per token (nats)", [("kl", "k1"), ("kl_k3", "k3")]), ("β", [("beta", "β")]),
              ("response length (tokens)", [("response_len", "mean")]),
              ("diversity", [("distinct_2", "distinct-2"), ("repetition", "repetition")]),
              ("entropy (nats)", [("entropy", "mean")])]
    fig = figure(11, 6)
    axes = fig.subplots(2, 3).flatten()
    for ax, (title, series) in zip(axes, panels, strict=True):
        for key, label in series:
            ys = [r.get(key) for r in rollouts]
            if any(is_number(y) for y in ys):
                ax.plot(xs, [y if is_number(y) else float("nan") for y in ys], label=label, linewidth=1.2)
        if series[0][0] == "score" and any(is_number(r.get("judge")) for r in rollouts):
            # The judge has its own scale (often a probability): a second axis, not the score's.
            judge_ax = ax.twinx()
            judge_ax.plot(xs, [r["judge"] if is_number(r.get("judge")) else float("nan") for r in rollouts],
                          color="tab:orange", linewidth=1.2, label="judge")
            judge_ax.set_ylabel("judge")
        for x in [r["rollout"] for r in rollouts if r.get("alarms")]:
            ax.axvline(x, color="red", alpha=0.15, linewidth=2)
        ax.set_title(title)
        ax.set_xlabel("rollout")
        if len(series) > 1:
            ax.legend(fontsize=8)
    fig.suptitle(f"{stage}: PPO rollouts (red: a guard alarm)")
    fig.tight_layout()
    name = f"ppo_{filename(stage)}.png"
    save_png(fig, run.dir / "plots" / name)
    return f"plots/{name}"
