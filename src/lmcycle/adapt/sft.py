"""SftStage: supervised fine-tuning on prompt/completion pairs, one task or a mixture; full or LoRA.

Each ``data`` entry is a dataset rendered with a prompt template; the loss covers the completion only
(:func:`lmcycle.data.sft.encode_sft`). Several entries make a multi-task mixture, each dataset drawn in
proportion to its ``weight`` (:func:`lmcycle.data.sft.mix_tasks`). Works for decoders and encoder-decoders.

With ``peft: {method: lora, ...}`` only LoRA adapters on a frozen base are trained
(:mod:`lmcycle.adapt.lora`); the stage then saves the adapter (PEFT format) and the merged plain model.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from lmcycle.adapt.lora import (
    LoraConfig,
    add_lora,
    count_trainable,
    merge_and_unload,
    save_lora,
)
from lmcycle.config import Config
from lmcycle.data.sft import collate_sft, encode_sft, mix_tasks
from lmcycle.runs import RunContext
from lmcycle.train.distributed import barrier, is_main
from lmcycle.train.loop import (
    TrainConfig,
    TrainResult,
    held_out_metrics,
    lm_loss_sum,
    micro_batch_indices,
    seed_everything,
    train,
)
from lmcycle.train.stage import TrainingStage, finish_training_stage, start_training_stage


class SftData(Config):
    """One task of the fine-tuning data: a recipe dataset, its mixture weight and (optionally) its template."""

    dataset: str
    weight: float = Field(1.0, gt=0)
    template: str | dict | None = Field(None, description="None: the stage's template")


class PeftConfig(LoraConfig):
    """Parameter-efficient fine-tuning: which method, plus its settings (LoRA's rank, alpha, targets...)."""

    method: Literal["lora"] = "lora"


class SftStage(Config):
    """Fine-tune a model (every parameter, or LoRA adapters) on one task or a weighted mixture of tasks."""

    type: Literal["sft"] = "sft"
    name: str | None = None
    model: str | None = None
    data: list[SftData] = Field(min_length=1)
    template: str | dict = "summarize"
    max_len: int = Field(512, ge=8)
    eval_data: str | None = Field(None, description="dataset whose held-out loss is logged every eval_every")
    peft: PeftConfig | None = Field(None, description="None: full fine-tuning of every parameter")
    train: TrainConfig


def run_sft(cfg: SftStage, ctx: RunContext) -> dict[str, str]:
    """Fine-tune the model; save it to ``<stage>/model``; return ``{"model": dir}``.

    With LoRA, also save the adapter to ``<stage>/adapter`` and return ``{"model": merged dir, "adapter": dir}``.
    """
    from lmcycle.data.templates import get_template
    from lmcycle.models.load import context_window, is_seq2seq

    stage = start_training_stage(cfg, ctx, "sft")
    model, tokenizer, tcfg, seed = stage.model, stage.tokenizer, stage.train, stage.seed
    seq2seq = is_seq2seq(model)
    max_len = min(cfg.max_len, context_window(model, tokenizer))

    tasks = [(encode_sft(ctx.dataset(d.dataset), get_template(d.template or cfg.template), tokenizer, max_len,
                         seq2seq), d.weight) for d in cfg.data]
    # One task: every example once per epoch. Several: an epoch is as many draws as the tasks have examples.
    items = tasks[0][0] if len(tasks) == 1 else mix_tasks(tasks, sum(len(t) for t, _ in tasks), seed)
    pad_id = tokenizer.pad_token_id

    def batch_at(step: int):
        return [collate_sft([items[i] for i in idx], pad_id)
                for idx in micro_batch_indices(len(items), step, tcfg.batch_size, tcfg.grad_accum, seed)]

    eval_fn = None
    if cfg.eval_data:
        held_out = encode_sft(ctx.dataset(cfg.eval_data), get_template(cfg.template), tokenizer, max_len, seq2seq)
        held_out.sort(key=lambda it: len(it["input_ids"]))  # similar lengths together: less padding
        eval_batches = [collate_sft(held_out[i:i + tcfg.batch_size], pad_id)
                        for i in range(0, len(held_out), tcfg.batch_size)]
        eval_fn = (lambda m: held_out_metrics(m, eval_batches)) if eval_batches else None

    stage.log(event="data", train_examples=len(items), tasks=[d.dataset for d in cfg.data], max_len=max_len)
    if cfg.peft is not None:
        # Injected before train(): resuming loads a checkpoint whose state dict has the adapters' keys.
        add_lora_for_training(stage, cfg.peft)
    params = [p for p in model.parameters() if p.requires_grad]
    result = train(model, batch_at, lm_loss_sum, tcfg, stage.out_dir, log=stage.log, eval_fn=eval_fn,
                   params=params, desc=stage.name)
    if cfg.peft is None:
        return finish_training_stage(stage, result)
    return finish_lora_stage(stage, result, base_model=ctx.model_path(cfg.model))


def add_lora_for_training(stage: TrainingStage, peft: PeftConfig) -> None:
    """Inject a seeded adapter ``default`` into the stage's model (base frozen) and log what trains."""
    seed_everything(stage.seed)  # A's random init is part of the run: the same seed gives the same adapter
    add_lora(stage.model, LoraConfig(**peft.model_dump(exclude={"method"})))
    trainable, total = count_trainable(stage.model)
    stage.log(event="peft", method=peft.method, trainable_params=trainable, total_params=total,
              trainable_percent=round(100.0 * trainable / max(total, 1), 4))


def finish_lora_stage(stage: TrainingStage, result: TrainResult, base_model: str) -> dict[str, str]:
    """Save the adapter to ``<stage>/adapter``, merge it, save the plain merged model via the usual finish."""
    adapter_dir = stage.out_dir / "adapter"
    if is_main():
        save_lora(stage.model, "default", adapter_dir, base_model_name_or_path=base_model)
    barrier()
    merge_and_unload(stage.model)
    produced = finish_training_stage(stage, result)
    return {**produced, "adapter": str(adapter_dir)}
