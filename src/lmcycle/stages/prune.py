"""PruneStage: prune a model of the run (:mod:`lmcycle.optimize.prune`), optionally heal it with LoRA.

``method``: ``magnitude`` or ``wanda`` (``sparsity`` per layer), ``nm`` (N:M by either score) or ``structured``
(``heads`` / ``mlp`` fractions removed). Wanda scores calibrate on ``n_calibration`` seeded texts of
``calibration``. With ``heal``, LoRA adapters on the pruned layers train on the ``heal.data`` texts, are merged,
and the masks are applied again. The stage saves ``<stage>/model``, ``<stage>/sparsity.json`` (per layer, then the
pruned layers' and the whole model's totals) and ``<stage>/eval.json`` (perplexity on each ``eval_data`` dataset
before, after pruning and after healing, with the settings).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field

from lmcycle.adapt.lora import LoraConfig
from lmcycle.artifacts import load_model
from lmcycle.atomic import atomic_write_json
from lmcycle.config import DatasetName, ModelRef
from lmcycle.data.examples import plain_texts
from lmcycle.errors import LmcycleError
from lmcycle.evals.perplexity import perplexity
from lmcycle.optimize.prune import (
    check_sparsity,
    heal_with_lora,
    magnitude_prune,
    nm_prune,
    sparsity_report,
    structured_prune,
    tokenize_calibration,
    wanda_prune,
)
from lmcycle.report.markdown import fixed, is_number, md, millions, row
from lmcycle.report.rundir import Run
from lmcycle.stages.common import StageConfig, write_eval
from lmcycle.stages.context import RunContext
from lmcycle.train.checkpoint import save_model_dir
from lmcycle.train.distributed import is_main
from lmcycle.train.loop import TrainConfig, seed_everything


class HealConfig(LoraConfig):
    """LoRA healing after pruning: adapters on the pruned layers, trained on text, merged, re-masked."""

    target_modules: list[str] | None = Field(None, description="None: every pruned layer")
    # Healing scales the update by alpha / r: rsLoRA is not offered, so `heal` takes no use_rslora key and the
    # run's config.yaml records none.
    use_rslora: Literal[False] = Field(False, exclude=True)
    data: list[DatasetName] = Field(min_length=1, description="dataset names; each input and target is one text")
    train: TrainConfig


class PruneStage(StageConfig):
    """Prune a model (magnitude | wanda | nm | structured), report sparsity and perplexity, optionally heal."""

    type: Literal["prune"] = "prune"
    model: ModelRef | None = None
    method: Literal["magnitude", "wanda", "nm", "structured"] = "wanda"
    sparsity: float = Field(0.5, gt=0, lt=1, description="fraction of weights zeroed per layer (magnitude, wanda)")
    n: int = Field(2, ge=1, description="nm: weights kept in every group of m")
    m: int = Field(4, ge=2)
    score: Literal["magnitude", "wanda"] = Field("wanda", description="nm: which score picks the kept weights")
    heads: float = Field(0.0, ge=0, lt=1, description="structured: fraction of attention heads removed")
    mlp: float = Field(0.0, ge=0, lt=1, description="structured: fraction of MLP channels removed")
    layers: str | None = Field(None, description="regex: only prunable layers whose path matches")
    calibration: DatasetName | None = Field(None, description="dataset name; each input and target is one text")
    n_calibration: int = Field(128, ge=1)
    max_len: int = Field(256, ge=8)
    eval_data: list[DatasetName] = Field(default_factory=list, description="datasets for perplexity before/after")
    heal: HealConfig | None = None
    seed: int | None = None


def example_texts(ctx: RunContext, names: Sequence[str], field: str) -> list[str]:
    """Every non-blank input and target of the named datasets (as pre-training reads a corpus)."""
    texts = []
    for name in names:
        examples = ctx.dataset(name)
        for i, ex in enumerate(examples):
            if not all(isinstance(t, str) for t in (ex.input, *ex.targets)):
                raise LmcycleError(f"dataset '{name}' item {i} is not text", file=ctx.recipe_file, field=field)
        texts += plain_texts(examples)
    if not texts:
        raise LmcycleError(f"datasets {list(names)} have no text", file=ctx.recipe_file, field=field)
    return texts


def _is_causal_lm(model) -> bool:
    return type(model).__name__.endswith("ForCausalLM")


def _perplexities(model, tokenizer, texts: dict[str, list[str]], max_len: int) -> dict[str, float]:
    return {name: perplexity(model, tokenizer, t, max_len=max_len).values["perplexity"] for name, t in texts.items()}


def run_prune(cfg: PruneStage, ctx: RunContext) -> dict[str, str]:
    """Prune ``cfg.model``; save ``<stage>/model`` (pruned, healed and re-masked with ``heal``),
    ``<stage>/sparsity.json`` (:func:`sparsity_report`) and ``<stage>/eval.json`` (perplexities and settings)."""
    name = cfg.stage_name
    err = {"file": ctx.recipe_file}
    seed = ctx.seed_for(cfg.seed)
    if cfg.method in ("magnitude", "wanda"):
        check_sparsity(cfg.sparsity)
    if cfg.method == "wanda" or (cfg.method == "nm" and cfg.score == "wanda"):
        if cfg.calibration is None:
            raise LmcycleError(f"method '{cfg.method}' with Wanda scores needs 'calibration' (a dataset)",
                               field="calibration", **err)
    model, tokenizer = load_model(ctx.model_path(cfg.model), device=ctx.device,
                                  attn_implementation=ctx.attn_implementation)
    if (cfg.eval_data or cfg.heal) and not _is_causal_lm(model):
        raise LmcycleError(f"eval_data and heal need a causal LM, not {type(model).__name__}",
                           field="eval_data" if cfg.eval_data else "heal", **err)
    out = ctx.stage_dir(name)
    seed_everything(seed)
    batches = None
    if cfg.calibration is not None:
        texts = example_texts(ctx, [cfg.calibration], "calibration")
        order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
        batches = tokenize_calibration(tokenizer, [texts[i] for i in order[:cfg.n_calibration]], cfg.max_len)
    eval_texts = {d: example_texts(ctx, [d], "eval_data") for d in cfg.eval_data}
    heal_texts = example_texts(ctx, cfg.heal.data, "heal.data") if cfg.heal else None

    ppl = {"before": _perplexities(model, tokenizer, eval_texts, cfg.max_len)}
    try:
        if cfg.method == "magnitude":
            masks, info = magnitude_prune(model, cfg.sparsity, cfg.layers), {}
        elif cfg.method == "wanda":
            masks, info = wanda_prune(model, batches, cfg.sparsity, cfg.layers), {}
        elif cfg.method == "nm":
            masks, info = nm_prune(model, cfg.n, cfg.m, cfg.score, batches, cfg.layers), {}
        else:
            masks, info = {}, structured_prune(model, cfg.heads, cfg.mlp, batches)
    except LmcycleError as e:
        raise LmcycleError(e.message, field=e.field, **err) from None
    report = sparsity_report(model, cfg.layers if cfg.method != "structured" else None, cfg.n, cfg.m)
    ppl["after_prune"] = _perplexities(model, tokenizer, eval_texts, cfg.max_len)
    ctx.log(name, event="prune", method=cfg.method, sparsity=report[-2]["sparsity"],
            model_sparsity=report[-1]["sparsity"], params=report[-1]["params"], **info,
            **{f"ppl_after_prune/{d}": v for d, v in ppl["after_prune"].items()},
            **{f"ppl_before/{d}": v for d, v in ppl["before"].items()})

    if cfg.heal is not None:
        heal_with_lora(model, tokenizer, heal_texts, masks, cfg.heal, cfg.heal.train, out / "heal",
                       log=lambda **m: ctx.log(name, phase="heal", **m), max_len=cfg.max_len,
                       seed=cfg.heal.train.seed if cfg.heal.train.seed is not None else seed)
        ppl["after_heal"] = _perplexities(model, tokenizer, eval_texts, cfg.max_len)
        report = sparsity_report(model, cfg.layers if cfg.method != "structured" else None, cfg.n, cfg.m)
        ctx.log(name, event="heal", sparsity=report[-2]["sparsity"],
                **{f"ppl_after_heal/{d}": v for d, v in ppl["after_heal"].items()})

    model_dir = out / "model"
    if is_main():  # under torchrun every rank pruned and healed the same way (the healing data-parallel)
        save_model_dir(model, tokenizer, model_dir)
        atomic_write_json(out / "sparsity.json", report)
    settings = cfg.model_dump(exclude={"type", "name", "heal"}) | {
        "seed": seed, "calibration_texts": sum(int(b["attention_mask"].shape[0]) for b in batches or []),
        "heal": cfg.heal.model_dump() if cfg.heal else None,
        "perplexity": "lmcycle.evals.perplexity on each input and target text, max_len tokens"}
    eval_path = write_eval(out, {"perplexity": ppl, "structured": info or None, "settings": settings})
    return {"model": str(model_dir), "sparsity": str(out / "sparsity.json"), "eval": eval_path}


def section(run: Run) -> str:
    """The pruning table of report.md's Optimization chapter: sparsity, and perplexity before pruning, after it
    and after healing, per stage and dataset."""
    found = [(s, d) for s in run.stages_of("prune") if (d := run.eval_json(s))]
    if not found:
        return ""
    # Only the perplexity columns some stage measured: no eval_data, no perplexity; no heal, no "Healed".
    measured = [(k, label) for k, label in PERPLEXITY_COLUMNS if any((d.get("perplexity") or {}).get(k)
                                                                      for _, d in found)]
    head = ["Stage", "Method", "Sparsity of pruned layers", "Whole model", "Parameters"]
    if measured:
        head += ["Data", *(label for _, label in measured)]
    healed = any(k == "after_heal" for k, _ in measured)
    intro = ["Perplexity (lower is better) before pruning, after it, and after LoRA healing (merged, then re-masked: "
             "the sparsity stays)." if healed else "Perplexity (lower is better) before and after pruning.", ""]
    lines = ["### Pruning", "", *(intro if measured else []),
             row(head), "|---|---|" + "---:|" * 3 + ("---|" + "---:|" * len(measured) if measured else "")]
    for stage, data in found:
        s, ppl = data.get("settings") or {}, data.get("perplexity") or {}
        event = run.last_event(stage, "prune") or {}
        method = s.get("method", "—")
        method = {"nm": f"{s.get('n')}:{s.get('m')} ({s.get('score')})",
                  "structured": f"structured (heads {s.get('heads')}, MLP {s.get('mlp')})"}.get(method, method)
        cells = [md(stage), md(str(method)), _percent(event.get("sparsity")), _percent(event.get("model_sparsity")),
                 millions(event.get("params"))]
        if not measured:
            lines.append(row(cells))
        for ds in (list(ppl.get("before") or {}) or ["—"]) if measured else []:
            lines.append(row([*cells, md(ds), *(fixed((ppl.get(k) or {}).get(ds), 2) for k, _ in measured)]))
    return "\n".join(lines) + "\n"


PERPLEXITY_COLUMNS = (("before", "Before"), ("after_prune", "Pruned"), ("after_heal", "Healed"))


def _percent(value) -> str:
    return f"{100 * value:.1f}%" if is_number(value) else "—"
