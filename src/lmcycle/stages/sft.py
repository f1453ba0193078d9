"""SftStage: supervised fine-tuning on prompt/completion pairs, one task or a mixture; full or LoRA.

Each ``data`` entry is a dataset rendered with a prompt template; the loss covers the completion only
(:func:`lmcycle.data.sft.encode_sft`). Several entries make a multi-task mixture, each dataset drawn in
proportion to its ``weight`` (:func:`lmcycle.data.sft.mix_tasks`). Works for decoders and encoder-decoders.

With ``peft:`` (``lora``, ``qlora`` or ``prompt_tuning``) only a few parameters train on a frozen base, and the
stage saves them in PEFT's format to ``<stage>/adapter``; :mod:`lmcycle.stages.peft` says what each method
saves besides.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from lmcycle.config import Config, DatasetName, ModelRef
from lmcycle.data.batching import pad_id_of
from lmcycle.data.sft import collate_sft, encode_sft, mix_tasks
from lmcycle.data.templates import get_template
from lmcycle.models.load import context_window, is_seq2seq
from lmcycle.report.markdown import duration, is_number, md, number, row
from lmcycle.report.rundir import Run
from lmcycle.stages.common import ModelStage, finish_training_stage, start_training_stage
from lmcycle.stages.context import RunContext
from lmcycle.stages.peft import (
    LoraPeft,
    PeftConfig,
    PromptTuningPeft,
    add_peft_for_training,
    finish_peft_stage,
)
from lmcycle.train.checkpoint import saved_param_count
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


class SftStage(ModelStage):
    """Fine-tune a model (every parameter, or LoRA adapters) on one task or a weighted mixture of tasks."""

    type: Literal["sft"] = "sft"
    model: ModelRef | None = None
    data: list[SftData] = Field(min_length=1)
    template: str | dict = "summarize"
    max_len: int = Field(512, ge=8)
    eval_data: DatasetName | None = Field(None, description="dataset whose held-out loss is logged every eval_every")
    peft: PeftConfig | None = Field(None, description="None: full fine-tuning of every parameter")
    train: TrainConfig

    @property
    def trains_every_parameter(self) -> bool:
        return self.peft is None


def run_sft(cfg: SftStage, ctx: RunContext) -> dict[str, str]:
    """Fine-tune the model; save it to ``<stage>/model``; return ``{"model": dir}``.

    With LoRA, also save the adapter to ``<stage>/adapter`` and return ``{"model": merged dir, "adapter": dir}``.
    """
    # Nothing reads a weight before train() but prompt tuning (its tokens start as vocabulary embeddings) and
    # QLoRA (it quantizes the loaded weights).
    stage = start_training_stage(cfg, ctx, shardable=cfg.peft is None or isinstance(cfg.peft, LoraPeft))
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


def section(run: Run) -> str:
    """The "Fine-tuning compared" table of report.md: one row per finished sft stage: what trained (full, LoRA,
    QLoRA, prompt tuning), what it cost, how big its checkpoint is, how the eval stages that scored its model
    rated it. Pre-training stages are not in it (their loss curves are under *Training*)."""
    stages = {s.get("name") or "sft": s for s in run.config.get("stages") or [] if s.get("type") == "sft"}
    for r in run.rows:  # a config.yaml without stages still has the runner's stage_end rows
        if r.get("event") == "stage_end" and r.get("type") == "sft":
            stages.setdefault(str(r.get("stage")), {})
    stages = {name: s for name, s in stages.items() if "model" in run.artifacts.get(name, {})}
    if not stages:
        return ""
    evals = run.generation_evals()
    lines = ["## Fine-tuning compared", "",
             "One row per sft stage. Full fine-tuning trains every parameter; LoRA trains low-rank adapters on "
             "a frozen model (QLoRA: on a quantized one); prompt tuning trains virtual input tokens. Wall time "
             "and peak RSS are of the training loop; the checkpoint is what the stage must keep (the adapter for "
             "PEFT, the whole model for full fine-tuning); ROUGE is from the eval stages that scored the stage's "
             "model.", "",
             "| Stage | Method | Trainable params | % of total | Wall time | Peak RSS (+ added by training), MiB "
             "| Checkpoint (MB) | ROUGE-1/2/L |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for name, stage_cfg in stages.items():
        produced = run.artifacts[name]
        peft = run.last_event(name, "peft")
        end = run.last_event(name, "train_end")
        model_dir = run.resolve(produced["model"])
        if peft is not None or "adapter" in produced or stage_cfg.get("peft"):
            method = _peft_method(peft, stage_cfg.get("peft") or {}, run.last_event(name, "quantize"))
            trainable, percent = (peft or {}).get("trainable_params"), (peft or {}).get("trainable_percent")
            checkpoint = run.resolve(produced["adapter"]) if "adapter" in produced else None
        else:
            method, trainable, percent, checkpoint = "full", _count_params(model_dir), 100.0, model_dir
        size = _dir_bytes(checkpoint)
        scores = ["/".join(number(e.metrics.get(k)) for k in ("rouge1", "rouge2", "rougeL")) + f" ({md(e.stage)})"
                  for e in evals if not e.missing and is_number(e.metrics.get("rougeL"))
                  and _same_path(run, e.settings.get("model"), produced["model"])]
        lines.append(row([md(name), md(method), f"{trainable:,}" if is_number(trainable) else "—",
                          f"{percent:.2f}%" if is_number(percent) else "—",
                          duration(end["wall_time"]) if end and is_number(end.get("wall_time")) else "—",
                          _peak_rss(end), _megabytes(size) if size is not None else "—",
                          "; ".join(scores) or "—"]))
    return "\n".join(lines) + "\n"


def _peft_method(peft: dict | None, cfg: dict, quantize: dict | None) -> str:
    """``lora r=8``, ``qlora r=8 nf4``, ``prompt_tuning 20 tokens`` from the logged peft event or the config."""
    method = str((peft or {}).get("method") or cfg.get("method") or "lora")
    if method == "prompt_tuning":
        tokens = cfg.get("num_virtual_tokens")
        return method + (f" {tokens} tokens" if tokens is not None else "")
    rank = (peft or {}).get("r", cfg.get("r"))
    method += f" r={rank}" if rank is not None else ""
    if method.startswith("qlora"):
        bits = (quantize or {}).get("bits", cfg.get("bits"))
        method += {4: " nf4", 8: " int8"}.get(bits, "")
    return method


def _peak_rss(end: dict | None) -> str:
    """``peak (+growth)``: the process's peak during training and how much of it training itself added."""
    if not end or not is_number(end.get("peak_rss_mb")):
        return "—"
    growth = end.get("rss_growth_mb")
    return f"{end['peak_rss_mb']:.0f}" + (f" (+{growth:.0f})" if is_number(growth) else "")


def _count_params(model_dir: Path | None) -> int | None:
    """Number of parameters saved in a model folder, from the safetensors headers (no tensor is loaded)."""
    files = sorted(model_dir.glob("*.safetensors")) if model_dir and model_dir.is_dir() else []
    return sum(saved_param_count(f) for f in files) if files else None


def _dir_bytes(path: Path | None) -> int | None:
    if path is None:
        return None
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _same_path(run: Run, a: Any, b: Any) -> bool:
    """Whether two recorded paths name the same folder (also when the run directory was moved)."""
    if not a or not b:
        return False
    if str(a) == str(b):
        return True
    found_a, found_b = run.resolve(str(a)), run.resolve(str(b))
    return found_a is not None and found_b is not None and found_a.resolve() == found_b.resolve()


def _megabytes(n_bytes: int) -> str:
    mb = n_bytes / 1e6
    return f"{mb:.1f}" if mb >= 10 else f"{mb:.2f}" if mb >= 0.1 else f"{mb:.3f}"
