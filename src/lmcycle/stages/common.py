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
from typing import Annotated, Any, Literal

import torch
from pydantic import BeforeValidator, Field

from lmcycle.artifacts import load_model
from lmcycle.atomic import atomic_write_json
from lmcycle.config import Config
from lmcycle.errors import LmcycleError
from lmcycle.models.load import DTYPE_ALIASES, dtype_problem, torch_dtype
from lmcycle.stages.context import RunContext
from lmcycle.train.checkpoint import save_model_dir
from lmcycle.train.distributed import barrier, is_distributed, is_main
from lmcycle.train.loop import TrainConfig, TrainResult


class StageConfig(Config):
    """The header of every stage's config: its kind (the recipe's ``type:``) and an optional name."""

    type: str
    name: str | None = None

    @property
    def stage_name(self) -> str:
        """The stage's name in the run (its sub-directory and metrics rows): ``name``, else its type."""
        return self.name or self.type


def _dtype_alias(value: Any) -> Any:
    return DTYPE_ALIASES.get(value, value) if isinstance(value, str) else value


ModelDtype = Annotated[Literal["float32", "bfloat16", "float16"], BeforeValidator(_dtype_alias)]


class ModelStage(StageConfig):
    """The header of a stage that loads a model: ``model_dtype``, the dtype its weights are held in.

    What stays float32 whatever ``model_dtype`` says: the parameters that train on a frozen base (LoRA's A and B,
    a soft prompt, PPO's value head, a causal reward model's head) and so their gradients and AdamW state; PEFT
    keeps adapters in float32 over a 16-bit base the same way (its ``autocast_adapter_dtype``). Distillation's
    student is float32 too (its ``model_dtype`` is the frozen teacher's). When every parameter of the loaded
    model trains (full fine-tuning, pre-training, a reward model's backbone, a classifier), ``bfloat16`` trains
    them in bfloat16, AdamW state included, as torchtune's ``dtype: bf16`` does: half the memory of float32, with
    no float32 master copy (``model_dtype: float32`` with ``train.bf16: true`` is the mixed-precision
    alternative). ``float16`` is for frozen weights only: training every parameter in it would need loss
    scaling, which lmcycle does not do, so :func:`dtype_problem_of` refuses it.
    """

    model_dtype: ModelDtype = Field("float32", description="dtype of the loaded weights: float32, bfloat16 (bf16) "
                                                           "or float16 (fp16, frozen weights only)")

    @property
    def trains_every_parameter(self) -> bool:
        """Whether the stage trains the weights it loads (not only adapters on them); the training stages say."""
        return False


def dtype_problem_of(cfg: StageConfig, device: str) -> str | None:
    """Why the stage cannot hold its model in its ``model_dtype`` on ``device``, or None (also for a stage
    that loads no model)."""
    name = getattr(cfg, "model_dtype", "float32")
    if name == "float16" and getattr(cfg, "trains_every_parameter", False):
        return ("float16 is for frozen weights (evaluation, generation, the base under peft); training every "
                "parameter in float16 needs loss scaling, which lmcycle does not do: use bfloat16, or float32 "
                "with train.bf16")
    return dtype_problem(torch_dtype(name), device)


def model_dtype(cfg: StageConfig, ctx: RunContext) -> torch.dtype:
    """The stage's ``model_dtype`` as a torch dtype, checked against the run's device before anything loads
    (the recipe checked it too, with the line; this is for a stage config run on its own)."""
    problem = dtype_problem_of(cfg, ctx.device)
    if problem:
        raise LmcycleError(problem, file=ctx.recipe_file, field="model_dtype")
    return torch_dtype(getattr(cfg, "model_dtype", "float32"))


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
    dtype: torch.dtype = torch.float32  # the stage's model_dtype: what a reloaded base (QLoRA's merge) is held in

    @property
    def seed(self) -> int:
        return self.train.seed

    def log(self, **metrics) -> None:
        self.ctx.log(self.name, **metrics)


def start_training_stage(cfg: StageConfig, ctx: RunContext, shardable: bool = False) -> TrainingStage:
    """Load the stage's model (``cfg.model``: an earlier stage, a path or a hub id) in its ``model_dtype`` and
    resolve its seed.

    ``shardable``: the stage reads no weight before :func:`~lmcycle.train.loop.train` (adding LoRA is fine), so
    under torchrun with FSDP the model is built on the meta device and each rank reads only its own shards
    (:func:`lmcycle.models.load.load_empty`): no rank ever holds the whole model.
    """
    name = cfg.stage_name
    dtype = model_dtype(cfg, ctx)
    empty = shardable and is_distributed() and cfg.train.distributed.strategy == "fsdp"
    model, tokenizer = load_model(ctx.model_path(cfg.model), device=ctx.device, dtype=dtype,
                                  attn_implementation=ctx.attn_implementation, empty=empty)
    if getattr(model, "empty_weights", None) is not None:
        ctx.log(name, event="model_load", weights="sharded", source=str(model.empty_weights.source))
    return TrainingStage(name=name, out_dir=ctx.stage_dir(name), model=model, tokenizer=tokenizer,
                         train=cfg.train.model_copy(update={"seed": ctx.seed_for(cfg.train.seed)}), ctx=ctx,
                         dtype=dtype)


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
