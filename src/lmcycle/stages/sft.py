"""SftStage: supervised fine-tuning on prompt/completion pairs, one task or a mixture; full or LoRA.

Each ``data`` entry is a dataset rendered with a prompt template; the loss covers the completion only
(:func:`lmcycle.data.sft.encode_sft`). Several entries make a multi-task mixture, each dataset drawn in
proportion to its ``weight`` (:func:`lmcycle.data.sft.mix_tasks`). Works for decoders and encoder-decoders.

With ``peft:`` only a few parameters train on a frozen base, and the stage saves them in PEFT's format to
``<stage>/adapter`` (:mod:`lmcycle.stages.peft`):

- ``{method: lora, r, alpha, ...}``: LoRA adapters (:mod:`lmcycle.adapt.lora`); the merged plain model is saved
  too.
- ``{method: qlora, bits: 4|8, ...}``: LoRA over a base whose linear layers are quantized (NF4 or int8,
  :mod:`lmcycle.adapt.qlora`); the adapter is merged into a full-precision copy of the base, never into the
  quantized weights.
- ``{method: prompt_tuning, num_virtual_tokens, init}``: a soft prompt (:mod:`lmcycle.adapt.prompt_tuning`);
  nothing can be merged, so the stage's model is the adapter folder, which every stage loads with its base.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from lmcycle.config import Config, DatasetName, ModelRef
from lmcycle.data.batching import pad_id_of
from lmcycle.data.sft import collate_sft, encode_sft, mix_tasks
from lmcycle.stages.common import StageConfig, finish_training_stage, start_training_stage
from lmcycle.stages.context import RunContext
from lmcycle.stages.peft import PeftConfig, PromptTuningPeft, add_peft_for_training, finish_peft_stage
from lmcycle.train.loop import (
    TrainConfig,
    held_out_metrics,
    lm_loss_sum,
    micro_batch_indices,
    train,
)


class SftData(Config):
    """One task of the fine-tuning data: a recipe dataset, its mixture weight and (optionally) its template."""

    dataset: DatasetName
    weight: float = Field(1.0, gt=0)
    template: str | dict | None = Field(None, description="None: the stage's template")


class SftStage(StageConfig):
    """Fine-tune a model (every parameter, or LoRA adapters) on one task or a weighted mixture of tasks."""

    type: Literal["sft"] = "sft"
    model: ModelRef | None = None
    data: list[SftData] = Field(min_length=1)
    template: str | dict = "summarize"
    max_len: int = Field(512, ge=8)
    eval_data: DatasetName | None = Field(None, description="dataset whose held-out loss is logged every eval_every")
    peft: PeftConfig | None = Field(None, description="None: full fine-tuning of every parameter")
    train: TrainConfig


def run_sft(cfg: SftStage, ctx: RunContext) -> dict[str, str]:
    """Fine-tune the model; save it to ``<stage>/model``; return ``{"model": dir}``.

    With LoRA, also save the adapter to ``<stage>/adapter`` and return ``{"model": merged dir, "adapter": dir}``.
    """
    from lmcycle.data.templates import get_template
    from lmcycle.models.load import context_window, is_seq2seq

    stage = start_training_stage(cfg, ctx)
    model, tokenizer, tcfg, seed = stage.model, stage.tokenizer, stage.train, stage.seed
    seq2seq = is_seq2seq(model)
    max_len = min(cfg.max_len, context_window(model, tokenizer))
    if isinstance(cfg.peft, PromptTuningPeft) and not seq2seq:
        max_len -= cfg.peft.num_virtual_tokens  # the virtual tokens take positions in the decoder's window

    tasks = [(encode_sft(ctx.dataset(d.dataset), get_template(d.template or cfg.template), tokenizer, max_len,
                         seq2seq), d.weight) for d in cfg.data]
    # One task: every example once per epoch. Several: an epoch is as many draws as the tasks have examples.
    items = tasks[0][0] if len(tasks) == 1 else mix_tasks(tasks, sum(len(t) for t, _ in tasks), seed)
    pad_id = pad_id_of(tokenizer)

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
    # Adapters are injected before train(): resuming loads a checkpoint whose state dict has their keys.
    if cfg.peft is not None:
        add_peft_for_training(stage, cfg.peft)
    params = [p for p in stage.model.parameters() if p.requires_grad]
    result = train(stage.model, batch_at, lm_loss_sum, tcfg, stage.out_dir, log=stage.log, eval_fn=eval_fn,
                   params=params, desc=stage.name)
    if cfg.peft is None:
        return finish_training_stage(stage, result)
    return finish_peft_stage(stage, result, cfg.peft, base_model=ctx.model_path(cfg.model))
