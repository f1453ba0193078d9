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
"""

from __future__ import annotations

import json
from typing import Literal

import torch
from pydantic import Field, ValidationInfo, field_validator

from lmcycle.align.guard import GuardConfig, check_alarms, should_stop
from lmcycle.align.ppo import (
    PolicyWithValue,
    PpoSettings,
    Rollout,
    UpdateStats,
    adaptive_beta,
    make_rollout,
    ppo_loss,
    reference_scorer,
    steps_per_rollout,
)
from lmcycle.align.reward_sources import RewardSpec, build_reward, describe_reward
from lmcycle.atomic import atomic_write_text
from lmcycle.config import Config, DatasetName, ModelRef
from lmcycle.errors import LmcycleError
from lmcycle.models.generate import DecodingConfig
from lmcycle.stages.common import TrainingStage, finish_training_stage, start_training_stage
from lmcycle.stages.context import RunContext
from lmcycle.stages.peft import LoraPeft, add_peft_for_training, finish_peft_stage
from lmcycle.train.loop import StopTraining, TrainConfig, micro_batch_indices, train


class PpoTrain(TrainConfig):
    """The optimizer side of PPO: ``batch_size`` episodes per minibatch (one optimizer step)."""

    max_steps: int | None = Field(None, description="leave unset: rollouts x ppo_epochs x minibatches")
    batch_size: int = Field(8, ge=1)
    lr: float = Field(1e-5, gt=0)
    min_lr_ratio: float = Field(1.0, ge=0, le=1, description="1.0: a constant learning rate")
    max_grad_norm: float | None = Field(1.0, gt=0)
    spike_factor: float | None = Field(None, gt=1, description="off: a PPO loss is no cross-entropy and may "
                                       "jump when the rewards do")


class PpoStage(Config):
    """Optimise a policy with PPO against a reward (model, classifier or Python function) and a KL leash."""

    type: Literal["ppo"] = "ppo"
    name: str | None = None
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

    @field_validator("train")
    @classmethod
    def _warmup_within_run(cls, train: PpoTrain, info: ValidationInfo) -> PpoTrain:
        # PPO's step count comes from the rollouts, so TrainConfig cannot compare warmup with it by itself.
        ppo, rollouts = info.data.get("ppo"), info.data.get("rollouts")
        per_step = train.batch_size * train.grad_accum
        if ppo is None or rollouts is None or ppo.rollout_size % per_step:
            return train  # an earlier error, or one run_ppo names (rollout_size not a multiple)
        total = rollouts * steps_per_rollout(ppo, train.batch_size, train.grad_accum)
        if train.warmup_steps > total:
            raise ValueError(f"warmup_steps ({train.warmup_steps}) is more than the {total} optimizer steps of "
                             f"{rollouts} rollouts")
        return train


def load_prompts(cfg: PpoStage, ctx: RunContext) -> list[str]:
    """The prompts: each example's input, rendered with ``template`` when set."""
    from lmcycle.data.templates import get_template

    examples = ctx.dataset(cfg.prompts)
    template = get_template(cfg.template) if cfg.template is not None else None
    prompts = [template.render(ex, []) if template else ex.input for ex in examples]
    prompts = [p for p in prompts if p.strip()]
    if len(prompts) < cfg.ppo.rollout_size:
        raise LmcycleError(f"dataset '{cfg.prompts}' has {len(prompts)} non-empty prompts, fewer than one rollout "
                           f"({cfg.ppo.rollout_size})", file=ctx.recipe_file, field="prompts")
    return prompts


class PpoRun:
    """The rollout side of the loop: makes rollout ``i`` when step ``i·steps`` starts, serves its minibatches,
    logs its statistics, checks the guard, and keeps samples."""

    def __init__(self, cfg: PpoStage, stage: TrainingStage, agent: PolicyWithValue, prompts: list[str],
                 reward_fn, judge_fn, ref, steps: int):
        self.cfg, self.stage, self.agent, self.prompts = cfg, stage, agent, prompts
        self.reward_fn, self.judge_fn, self.ref, self.steps = reward_fn, judge_fn, ref, steps
        self.index: int | None = None
        self.rollout: Rollout | None = None
        self.updates = UpdateStats()
        # After a resume the guard's history is read back from the log (the last row per rollout wins).
        rows = {r["rollout"]: r for r in stage.ctx.read_metrics(stage.name) if r.get("event") == "rollout"}
        self.history = [rows[i] for i in sorted(rows)]
        self.alarm_counts = [r.get("alarms", 0) for r in self.history]

    def batch_at(self, step: int) -> list[dict[str, torch.Tensor]]:
        i, within = divmod(step, self.steps)
        if i != self.index:
            self._new_rollout(i, step)
        tcfg = self.stage.train
        groups = micro_batch_indices(self.cfg.ppo.rollout_size, within, tcfg.batch_size, tcfg.grad_accum,
                                     tcfg.seed * 7919 + i)
        return [self.rollout.minibatch(g) for g in groups]

    def loss_fn(self, agent: PolicyWithValue, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        return ppo_loss(agent, batch, self.cfg.ppo, self.cfg.generation.temperature, self.updates)

    def _new_rollout(self, i: int, step: int) -> None:
        self.log_updates(step)
        self.history = [r for r in self.history if r["rollout"] < i]
        self.alarm_counts = self.alarm_counts[: len(self.history)]
        order = micro_batch_indices(len(self.prompts), i, self.cfg.ppo.rollout_size, 1, self.stage.seed)[0]
        prompts = [self.prompts[j] for j in order]
        decoding = self.cfg.generation.model_copy(update={"seed": self.cfg.generation.seed + i})
        self.rollout = make_rollout(self.agent, self.stage.tokenizer, prompts, decoding, self.reward_fn,
                                    self.cfg.ppo, self.ref, self.judge_fn)
        self.index = i
        stats = self.rollout.stats
        ppo = self.cfg.ppo
        if ppo.kl_target is not None:  # β for the next rollout, from this one's KL
            self.agent.kl_beta.fill_(adaptive_beta(float(self.agent.kl_beta), stats["kl"], ppo.kl_target,
                                                   ppo.rollout_size, ppo.kl_horizon))
        row = {"rollout": i, **{k: round(v, 6) for k, v in stats.items()}}
        alarms = check_alarms([*self.history, row], self.cfg.guard, ppo.kl_target)
        row["alarms"] = len(alarms)
        self.history.append(row)
        self.alarm_counts.append(len(alarms))
        self.stage.log(event="rollout", step=step, **row)
        for alarm in alarms:
            self.stage.log(event="alarm", step=step, rollout=i, **alarm)
        self._keep_samples(i)
        if should_stop(self.alarm_counts, self.cfg.guard):
            reason = "; ".join(a["message"] for a in alarms)
            self.stage.log(event="early_stop", step=step, rollout=i, reason=reason)
            raise StopTraining(reason)

    def log_updates(self, step: int) -> None:
        """Log the PPO losses of the rollout just trained on (if any)."""
        if self.index is not None and self.updates.minibatches + self.updates.skipped:
            self.stage.log(event="ppo_update", step=step, rollout=self.index,
                           **{k: round(v, 6) for k, v in self.updates.means().items()})
        self.updates = UpdateStats()

    def _keep_samples(self, i: int) -> None:
        keep = self.cfg.samples and (i % self.cfg.samples_every == 0 or i == self.cfg.rollouts - 1)
        if keep:
            lines = [json.dumps({"rollout": i, **s}, ensure_ascii=False)
                     for s in self.rollout.samples[: self.cfg.samples]]
            atomic_write_text(self.stage.out_dir / "samples" / f"rollout_{i:04d}.jsonl", "\n".join(lines) + "\n")


def run_ppo(cfg: PpoStage, ctx: RunContext) -> dict[str, str]:
    """Run PPO; save the policy to ``<stage>/model`` (LoRA: also ``<stage>/adapter``); return the artifacts."""
    from lmcycle.artifacts import load_model

    if cfg.train.max_steps is not None:
        raise LmcycleError("PPO counts its steps from 'rollouts'; remove train.max_steps", file=ctx.recipe_file,
                           field="train.max_steps")
    stage = start_training_stage(cfg, ctx, "ppo")
    steps = steps_per_rollout(cfg.ppo, stage.train.batch_size, stage.train.grad_accum)
    tcfg = TrainConfig(**stage.train.model_dump(exclude={"max_steps", "save_every"}),
                       max_steps=cfg.rollouts * steps, save_every=cfg.save_every_rollouts * steps)
    prompts = load_prompts(cfg, ctx)
    reward_fn = build_reward(cfg.reward, ctx.model_path)
    judge_fn = build_reward(cfg.judge, ctx.model_path) if cfg.judge is not None else None

    ref_model = None
    if cfg.peft is not None:
        add_peft_for_training(stage, cfg.peft)
    else:
        ref_model, _ = load_model(ctx.model_path(cfg.model), device=ctx.device)
    agent = PolicyWithValue(stage.model, cfg.ppo.beta).to(stage.model.device)
    ref = reference_scorer(agent, ref_model, cfg.generation.temperature)
    stage.log(event="ppo_setup", prompts=len(prompts), rollouts=cfg.rollouts, steps_per_rollout=steps,
              reference="adapter disabled" if ref_model is None else "frozen copy",
              reward=describe_reward(cfg.reward), judge=describe_reward(cfg.judge) if cfg.judge else None)

    run = PpoRun(cfg, stage, agent, prompts, reward_fn, judge_fn, ref, steps)
    params = [p for p in agent.parameters() if p.requires_grad]
    result = train(agent, run.batch_at, run.loss_fn, tcfg, stage.out_dir, log=stage.log, params=params,
                   desc=stage.name)
    run.log_updates(result.step)
    stage.model = agent.policy
    if cfg.peft is not None:
        return finish_peft_stage(stage, result, cfg.peft, base_model=ctx.model_path(cfg.model))
    return finish_training_stage(stage, result)

