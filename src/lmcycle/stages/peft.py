"""The PEFT set-up every training stage shares: which method (``peft:`` in a stage), adding it to the stage's
model before training, and saving it (PEFT's format) after.

- ``{method: lora, r, alpha, ...}``: LoRA adapters (:mod:`lmcycle.adapt.lora`); the merged plain model is saved
  too.
- ``{method: qlora, bits: 4|8, ...}``: LoRA over a base whose linear layers are quantized (NF4 or int8,
  :mod:`lmcycle.adapt.qlora`); the adapter is merged into a full-precision copy of the base, never into the
  quantized weights.
- ``{method: prompt_tuning, num_virtual_tokens, init}``: a soft prompt (:mod:`lmcycle.adapt.prompt_tuning`);
  nothing can be merged, so the stage's model is the adapter folder, which every stage loads with its base.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Discriminator, Tag

from lmcycle.adapt.lora import LoraConfig, add_lora, merge_and_unload, merge_qlora, save_lora
from lmcycle.adapt.prompt_tuning import PromptTuningConfig, add_prompt_tuning, save_prompt_tuning
from lmcycle.adapt.qlora import quantize_model
from lmcycle.artifacts import load_model
from lmcycle.stages.common import TrainingStage, finish_training_stage, log_training_end
from lmcycle.train.distributed import barrier, is_main
from lmcycle.train.loop import TrainResult, seed_everything


class LoraPeft(LoraConfig):
    """LoRA: rank-r adapters beside the target linear layers of a frozen base."""

    method: Literal["lora"] = "lora"


class QloraPeft(LoraConfig):
    """QLoRA: LoRA over a base whose linear layers are stored quantized (4-bit NF4 or int8) and frozen."""

    method: Literal["qlora"] = "qlora"
    bits: Literal[4, 8] = 4


class PromptTuningPeft(PromptTuningConfig):
    """Prompt tuning: trainable virtual tokens prepended to the input embeddings of a frozen base."""

    method: Literal["prompt_tuning"] = "prompt_tuning"


def _peft_method(value) -> str:
    return (value.get("method", "lora") if isinstance(value, dict) else getattr(value, "method", "lora"))


# `method` may be left out: LoRA is the default.
PeftConfig = Annotated[Annotated[LoraPeft, Tag("lora")] | Annotated[QloraPeft, Tag("qlora")]
                       | Annotated[PromptTuningPeft, Tag("prompt_tuning")], Discriminator(_peft_method)]


def add_peft_for_training(stage: TrainingStage, peft: LoraPeft | QloraPeft | PromptTuningPeft) -> None:
    """Freeze the stage's model and add what trains (seeded), then log how many parameters that is."""
    seed_everything(stage.seed)  # the adapter's random init is part of the run: same seed, same adapter
    total = sum(p.numel() for p in stage.model.parameters())  # before quantizing turns weights into buffers
    settings = peft.model_dump(exclude={"method", "bits"})
    if isinstance(peft, PromptTuningPeft):
        stage.model = add_prompt_tuning(stage.model, PromptTuningConfig(**settings), stage.tokenizer)
    else:
        if isinstance(peft, QloraPeft):
            stage.log(event="quantize", **quantize_model(stage.model, bits=peft.bits))
        add_lora(stage.model, LoraConfig(**settings))
    trainable = sum(p.numel() for p in stage.model.parameters() if p.requires_grad)
    stage.log(event="peft", method=peft.method, trainable_params=trainable, total_params=total,
              trainable_percent=round(100.0 * trainable / max(total, 1), 4),
              **({"r": peft.r} if isinstance(peft, LoraConfig) else {}))


def finish_peft_stage(stage: TrainingStage, result: TrainResult, peft, base_model: str) -> dict[str, str]:
    """Save the adapter to ``<stage>/adapter``; for (Q)LoRA also save the merged plain model as ``model``.
    ``base_model`` is the model the stage started from; the adapter records it (a local one as an absolute path).

    Dtypes: the adapter is saved as it trained, in float32 (PEFT saves and loads it so too); the merged model in
    the stage's ``model_dtype`` (each weight plus the float32 delta, rounded once), and its config.json records
    that dtype. A later stage loads it in its own ``model_dtype`` whatever it was saved in.

    QLoRA merges into the full-precision base reloaded from disk, not into its quantized weights. A soft prompt
    cannot be merged: the stage's model is the adapter folder, which loads with its base.
    """
    adapter_dir = stage.out_dir / "adapter"
    base_model = _recorded_path(base_model)
    if is_main():
        if isinstance(peft, PromptTuningPeft):
            save_prompt_tuning(stage.model, adapter_dir, base_model_name_or_path=base_model,
                               tokenizer_name_or_path=base_model)
            log_training_end(stage, result)
        else:
            save_lora(stage.model, "default", adapter_dir, base_model_name_or_path=base_model)
    barrier()
    if isinstance(peft, PromptTuningPeft):
        return {"model": str(adapter_dir), "adapter": str(adapter_dir)}
    if isinstance(peft, QloraPeft):
        # The merged model is saved in model_dtype like a LoRA stage's: the float32 delta rounds into it once.
        stage.model, _ = load_model(base_model, device=stage.ctx.device, dtype=stage.dtype,
                                    attn_implementation=stage.ctx.attn_implementation)
        merge_qlora(stage.model, adapter_dir)
    else:
        merge_and_unload(stage.model)
    produced = finish_training_stage(stage, result)
    return {**produced, "adapter": str(adapter_dir)}


def _recorded_path(model_ref: str) -> str:
    """What an adapter records as its base: an absolute path for a local model, a Hub id as it is."""
    return os.path.abspath(model_ref) if Path(model_ref).exists() else model_ref
