"""What every stage shares: the header of its config, and what a training stage does around its loop.

Every stage config derives from :class:`StageConfig` (``type`` and ``name``). A training stage (pretrain, sft,
and the later adapt/align stages) does the same before and after its loop, so that trainers do not drift apart::

    setup = start_training_stage(cfg, ctx)               # model, tokenizer, seeded TrainConfig, stage dir
    ... build batch_at / loss_fn / eval_fn for its objective ...
    result = train(setup.model, batch_at, loss_fn, setup.train, setup.out_dir, setup.log, eval_fn)
    return finish_training_stage(setup, result)           # saves <stage>/model, logs, {"model": dir}
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmcycle.artifacts import load_model
from lmcycle.atomic import atomic_write_json
from lmcycle.config import Config
from lmcycle.stages.context import RunContext
from lmcycle.train.checkpoint import save_model_dir
from lmcycle.train.distributed import barrier, is_main
from lmcycle.train.loop import TrainConfig, TrainResult


class StageConfig(Config):
    """The header of every stage's config: its kind (the recipe's ``type:``) and an optional name."""

    type: str
    name: str | None = None

    @property
    def stage_name(self) -> str:
        """The stage's name in the run (its sub-directory and metrics rows): ``name``, else its type."""
        return self.name or self.type


def write_eval(stage_dir: str | os.PathLike, payload: dict[str, Any]) -> str:
    """Write a stage's scores to ``<stage_dir>/eval.json`` (atomically; under torchrun on rank 0 alone), where
    the report reads them; return its path for the stage's artifacts."""
    path = Path(stage_dir) / "eval.json"
    if is_main():
        atomic_write_json(path, payload)
    return str(path)


@dataclass
class TrainingStage:
    name: str
    out_dir: Path
    model: Any
    tokenizer: Any
    train: TrainConfig  # the stage's TrainConfig with its seed resolved (the stage's, else the recipe's)
    ctx: RunContext

    @property
    def seed(self) -> int:
        return self.train.seed

    def log(self, **metrics) -> None:
        self.ctx.log(self.name, **metrics)


def start_training_stage(cfg: StageConfig, ctx: RunContext) -> TrainingStage:
    """Load the stage's model (``cfg.model``: an earlier stage, a path or a hub id) and resolve its seed."""
    name = cfg.stage_name
    model, tokenizer = load_model(ctx.model_path(cfg.model), device=ctx.device,
                                  attn_implementation=ctx.attn_implementation)
    return TrainingStage(name=name, out_dir=ctx.stage_dir(name), model=model, tokenizer=tokenizer,
                         train=cfg.train.model_copy(update={"seed": ctx.seed_for(cfg.train.seed)}), ctx=ctx)


def finish_training_stage(stage: TrainingStage, result: TrainResult) -> dict[str, str]:
    """Save the trained model (rank 0, atomically) to ``<stage>/model`` and log the run's totals."""
    model_dir = stage.out_dir / "model"
    if is_main():
        save_model_dir(stage.model, stage.tokenizer, model_dir)
        log_training_end(stage, result)
    barrier()
    return {"model": str(model_dir)}


def log_training_end(stage: TrainingStage, result: TrainResult) -> None:
    """The ``train_end`` row the report reads: steps, wall time, throughput and memory of the loop."""
    stage.log(event="train_end", step=result.step, wall_time=round(result.wall_time, 2),
              tokens_per_s=round(result.tokens_per_s, 1), peak_rss_mb=round(result.peak_rss_mb, 1),
              rss_growth_mb=round(result.rss_growth_mb, 1))
