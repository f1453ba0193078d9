"""CompletionsStage: k sampled completions of every prompt of a dataset, as the items of a labeling project.

The first step of the human-feedback loop (completions → labels → reward model → RL → completions again).
Writes ``<stage>/completions.jsonl`` in the format :func:`lmcycle.feedback.items.read_completions` reads (and
``lmcycle label import`` imports), one line per prompt::

    {"prompt_id": "<the example's id>", "prompt": "...",
     "completions": [{"id": "c0", "text": "...", "model": "sft", "decoding": {...}}, ...],
     "meta": {"reference": "<the example's target, when it has one>", "model": "sft"}}

- **Prompts.** Each example of ``prompts`` (the first ``limit``), rendered with ``template`` when set (as ppo's
  prompts are), else its input as it is. A prompt id seen again with the same prompt (a preference dataset
  lists a prompt once per pair) is kept once; blank prompts are left out; both are counted.
- **Sampling.** Draw ``d`` of every prompt samples with its own seed (:func:`draw_seed` of the stage's seed and
  ``d``), one call per draw over the list of prompts. With an in-process model, prompt ``i`` of that call
  samples from the stream ``(draw seed, i)`` (:func:`lmcycle.models.generate.generate`); ``lmcycle serve``
  samples a list of prompts the same way, so a served copy of the model writes the same file; any server that
  honours ``seed`` gives k different samples, where one seed for k copies of a prompt would give k equal ones.
- **Repeats.** A draw that is blank, or equal to a draw already kept for its prompt, is not kept: a labeler
  cannot prefer one of two equal texts, and the completions format refuses them. Up to ``resample`` more draws
  per prompt replace them. A prompt still short of k keeps its (at least 2) distinct completions, counted as
  short; one with fewer than 2 is left out, counted, with a warning. Every count is in the metrics row.

With ``label_db`` the file is also imported into that label database's ``project`` (created, with ``overlap``,
when missing; the database too, as ``lmcycle label init`` would), in one transaction.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from lmcycle.apps.llm import backend_from_spec
from lmcycle.artifacts import load_model
from lmcycle.atomic import atomic_write_text
from lmcycle.config import DatasetName, ModelRef
from lmcycle.data.examples import Example
from lmcycle.data.templates import get_template
from lmcycle.errors import LmcycleError
from lmcycle.feedback.db import is_postgres
from lmcycle.feedback.items import Completion, ItemSpec
from lmcycle.feedback.store import DEFAULT_PROJECT, LabelStore, NotFound
from lmcycle.models.generate import DecodingConfig, describe, generate
from lmcycle.report.markdown import excerpt, fixed, md, share
from lmcycle.report.rundir import Run, read_jsonl
from lmcycle.stages.common import ModelStage, model_dtype
from lmcycle.stages.context import RunContext

logger = logging.getLogger(__name__)
EXAMPLE_ITEMS = 2  # items the report shows with their completions

Complete = Callable[[list[str], DecodingConfig], list[str]]


class CompletionsStage(ModelStage):
    """k sampled completions per prompt of a dataset, written as a labeling project's items."""

    type: Literal["completions"] = "completions"
    model: ModelRef | None = Field(None, description="latest, a stage name, a path or a hub id")
    backend: str | None = Field(None, description="openai:BASE_URL#MODEL instead of an in-process model")
    api_key_env: str | None = Field(None, description="backend: the environment variable holding its API key")
    prompts: DatasetName = Field(description="dataset whose examples are the prompts")
    template: str | dict | None = Field(None, description="None: each input as it is")
    limit: int | None = Field(None, ge=1, description="the first N prompts")
    k: int = Field(4, description="completions per prompt (at least 2: one is nothing to rank)")
    decoding: DecodingConfig = Field(DecodingConfig(do_sample=True), description="must sample (do_sample "
                                     "defaults to true here); its seed is the stage's")
    seed: int | None = Field(None, ge=0, description="None: the recipe's seed")
    resample: int = Field(4, ge=0, description="extra draws per prompt to replace blank or repeated texts")
    overlap: int | None = Field(None, ge=1, description="labelers per item (None: the project's)")
    label_db: str | None = Field(None, description="also import the items into this label database (SQLite "
                                 "file or postgresql:// URL)")
    project: str | None = Field(None, description="label_db: the project to import into (default: default)")

    @field_validator("k")
    @classmethod
    def _something_to_rank(cls, k: int) -> int:
        if k < 2:
            raise ValueError(f"k = {k}: a labeler ranks at least 2 completions of a prompt (k >= 2)")
        return k

    @field_validator("backend")
    @classmethod
    def _model_or_backend(cls, backend: str | None, info) -> str | None:
        if backend is not None and info.data.get("model") is not None:
            raise ValueError("give 'model' (a model of the run, a path or a hub id) or 'backend' (a served "
                             "model), not both")
        return backend

    @field_validator("decoding", mode="before")
    @classmethod
    def _sample_by_default(cls, value: Any) -> Any:
        # k completions of one prompt are a choice only when sampled: unless the recipe says otherwise
        if isinstance(value, dict):
            if value.get("seed", 0) != 0:  # 0, the default, is what config.yaml records: let it load again
                raise ValueError("set the stage's 'seed' (every draw derives its own from it), not decoding.seed")
            return {"do_sample": True, **value}
        return value

    @field_validator("decoding")
    @classmethod
    def _must_sample(cls, decoding: DecodingConfig, info) -> DecodingConfig:
        if not decoding.do_sample:
            raise ValueError(f"do_sample: false gives {info.data.get('k', 'k')} equal greedy completions of "
                             "each prompt, which is no choice; sample (do_sample: true)")
        return decoding

    @model_validator(mode="after")
    def _backend_options(self) -> CompletionsStage:
        if self.api_key_env is not None and self.backend is None:
            raise ValueError("'api_key_env' only applies with 'backend'")
        if self.project is not None and self.label_db is None:
            raise ValueError("'project' only applies with 'label_db' (the database to import into)")
        return self


def draw_seed(seed: int, draw: int) -> int:
    """The sampling seed of draw number ``draw`` (0, 1, ...) of a stage seeded ``seed``: independent streams
    for every draw, and not ``seed + draw``, which would make a run seeded 1 repeat the draws of one seeded 0."""
    return int(np.random.SeedSequence([seed, draw]).generate_state(1, dtype=np.uint32)[0])


def sample_completions(complete: Complete, prompts: list[str], decoding: DecodingConfig, k: int, seed: int,
                       resample: int) -> tuple[list[list[str]], dict[str, int | float]]:
    """``(texts per prompt, counts)``: up to ``k`` distinct non-blank completions of each prompt, in draw order
    (see the module docstring). ``complete(prompts, decoding)`` returns one completion per prompt. The counts:
    ``draws`` made, ``repeats`` (blank or repeated draws not kept) and ``distinct_share``, the share of the
    first k draws of each prompt that were kept: how diverse the decoding is, before any resampling."""
    kept: list[list[str]] = [[] for _ in prompts]
    draws = repeats = first_kept = 0
    for draw in range(k + resample):
        needy = [i for i, texts in enumerate(kept) if len(texts) < k]
        if not needy:
            break
        texts = complete([prompts[i] for i in needy], decoding.model_copy(update={"seed": draw_seed(seed, draw)}))
        for i, text in zip(needy, texts, strict=True):
            draws += 1
            if text.strip() and text not in kept[i]:
                kept[i].append(text)
                first_kept += draw < k
            else:
                repeats += 1
    return kept, {"draws": draws, "repeats": repeats,
                  "distinct_share": first_kept / (k * len(prompts)) if prompts else 0.0}


def stage_prompts(examples: list[Example], template: str | dict | None,
                  dataset: str) -> tuple[list[tuple[Example, str]], dict[str, int]]:
    """``([(example, rendered prompt)], counts)``: the examples once per id, blank prompts left out (counted as
    ``blank_prompts`` and ``repeated_ids``). An id repeated with another prompt is an error: the completions file
    needs one prompt per id."""
    shown = get_template(template) if template is not None else None
    out: list[tuple[Example, str]] = []
    seen: dict[str, str] = {}
    blank = repeated = 0
    for index, ex in enumerate(examples):
        prompt = shown.render(ex, []) if shown else ex.input
        prompt_id = ex.id or f"{dataset}:{index}"
        if prompt_id in seen:
            if seen[prompt_id] != prompt:
                raise LmcycleError(f"dataset '{dataset}' has two different prompts with id '{prompt_id}'; a "
                                   "labeling item needs one prompt per id", field="prompts")
            repeated += 1
            continue
        seen[prompt_id] = prompt
        if not prompt.strip():
            blank += 1
            continue
        out.append((ex if ex.id else Example(ex.input, ex.targets, ex.task, prompt_id, ex.meta), prompt))
    return out, {"blank_prompts": blank, "repeated_ids": repeated}


def build_items(prompts: list[tuple[Example, str]], texts: list[list[str]], k: int, model: str,
                decoding: dict[str, Any], overlap: int | None) -> tuple[list[ItemSpec], int, int]:
    """``(items, short, dropped)``: an item per prompt with at least 2 completions (ids ``c0``.. in draw order);
    ``short`` items have fewer than ``k``, ``dropped`` prompts had fewer than 2."""
    items: list[ItemSpec] = []
    short = dropped = 0
    for (ex, prompt), found in zip(prompts, texts, strict=True):
        if len(found) < 2:
            dropped += 1
            continue
        short += len(found) < k
        meta = {"model": model}
        if ex.targets and ex.target.strip():
            meta = {"reference": ex.target, **meta}
        items.append(ItemSpec(ex.id, prompt, [Completion(f"c{j}", text, model, decoding)
                                              for j, text in enumerate(found)], overlap=overlap, meta=meta))
    return items, short, dropped


def item_line(item: ItemSpec) -> str:
    """One line of a completions file."""
    row: dict[str, Any] = {"prompt_id": item.prompt_id, "prompt": item.prompt,
                           "completions": [{"id": c.id, "text": c.text, "model": c.model, "decoding": c.decoding}
                                           for c in item.completions]}
    if item.overlap is not None:
        row["overlap"] = item.overlap
    row["meta"] = item.meta
    return json.dumps(row, ensure_ascii=False)


def run_completions(cfg: CompletionsStage, ctx: RunContext) -> dict[str, str]:
    """Write ``completions.jsonl`` (and import it into ``label_db``); returns ``{"completions": path}``."""
    name = cfg.stage_name
    prompts, counts = stage_prompts(ctx.dataset(cfg.prompts)[: cfg.limit], cfg.template, cfg.prompts)
    if not prompts:
        raise LmcycleError(f"dataset '{cfg.prompts}' has no non-blank prompt", file=ctx.recipe_file,
                           field="prompts")
    complete, model = _backend(cfg, ctx)
    seed = ctx.seed_for(cfg.seed)
    texts, sampled = sample_completions(complete, [p for _, p in prompts], cfg.decoding, cfg.k, seed, cfg.resample)
    settings = cfg.decoding.model_dump(exclude={"batch_size"}) | {"seed": seed}
    items, short, dropped = build_items(prompts, texts, cfg.k, model, settings, cfg.overlap)
    if dropped:
        logger.warning("%s: left out %d of %d prompt(s) with fewer than 2 distinct completions after %d extra "
                       "draw(s) each", name, dropped, len(prompts), cfg.resample)
    if not items:
        raise LmcycleError(f"no prompt got 2 distinct non-blank completions in {cfg.k + cfg.resample} draws: "
                           "sample more freely (temperature, top_p, max_new_tokens)", file=ctx.recipe_file,
                           field="decoding")
    path = ctx.stage_dir(name) / "completions.jsonl"
    atomic_write_text(path, "".join(item_line(item) + "\n" for item in items))
    if cfg.label_db:
        url = cfg.label_db if is_postgres(cfg.label_db) else ctx.recipe_path(cfg.label_db.removeprefix("sqlite:///"))
        _import(url, path, cfg)
    lengths = [len(c.text) for item in items for c in item.completions]
    ctx.log(name, event="completions", prompts=len(items), k=cfg.k, model=model, decoding=describe(cfg.decoding),
            max_new_tokens=cfg.decoding.max_new_tokens, completions=len(lengths),
            mean_chars=sum(lengths) / len(lengths), short_items=short, dropped_items=dropped,
            **counts, **sampled, label_db=bool(cfg.label_db))
    return {"completions": str(path)}


def _backend(cfg: CompletionsStage, ctx: RunContext) -> tuple[Complete, str]:
    """``(complete, model name)``: the served model, or the run's model (its stage's name, else the path or id
    as given) with a progress bar."""
    if cfg.backend:
        key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        if cfg.api_key_env and not key:
            raise LmcycleError(f"the environment variable {cfg.api_key_env} is not set", file=ctx.recipe_file,
                               field="api_key_env")
        llm = backend_from_spec(cfg.backend, api_key=key)
        return llm.complete, llm.name
    path = ctx.model_path(cfg.model)
    model, tokenizer = load_model(path, device=ctx.device, dtype=model_dtype(cfg, ctx),
                                  attn_implementation=ctx.attn_implementation)
    stage = next((s for s, produced in ctx.artifacts.items() if produced.get("model") == path), None)

    def complete(prompts: list[str], decoding: DecodingConfig) -> list[str]:
        return generate(model, tokenizer, prompts, decoding, progress=True)

    return complete, stage or cfg.model or path


def _import(url: str, path: Path, cfg: CompletionsStage) -> None:
    """Import the file into the project, creating the database and the project when missing."""
    project = cfg.project or DEFAULT_PROJECT
    with LabelStore.init(url) as store:
        try:
            store.project(project)
        except NotFound:
            store.create_project(project, **({"overlap": cfg.overlap} if cfg.overlap else {}))
        store.import_file(path, project)


def section(run: Run) -> str:
    """The completions table of report.md (prompts, k, model, decoding, mean length, distinct share), and the
    first items of each stage with their completions, escaped (model output is never markup here)."""
    stages = [s for s in run.stages_of("completions") if run.last_event(s, "completions")]
    if not stages:
        return ""
    lines = ["### Completions for labeling", "",
             "| Stage | Prompts | k | Model | Decoding | Mean length | Distinct share | Short / dropped |",
             "|---|---:|---:|---|---|---:|---:|---:|"]
    for stage in stages:
        r = run.last_event(stage, "completions")
        lines.append(f"| {md(stage)} | {r.get('prompts', '—')} | {r.get('k', '—')} | {md(str(r.get('model')))} "
                     f"| {md(str(r.get('decoding')))}, ≤ {r.get('max_new_tokens', '—')} tokens "
                     f"| {fixed(r.get('mean_chars'), 1)} chars | {share(r.get('distinct_share'), 1)} "
                     f"| {r.get('short_items', '—')} / {r.get('dropped_items', '—')} |")
    lines += ["", "Distinct share: the first k draws of each prompt that were neither blank nor a repeat; "
              "repeats were replaced by more draws."]
    for stage in stages:
        recorded = (run.artifacts.get(stage) or {}).get("completions")
        found = run.resolve(recorded) if recorded else None
        items = read_jsonl(found)[:EXAMPLE_ITEMS] if found else []
        if items:
            lines += ["", f"Examples of **{md(stage)}**:", ""]
        for item in items:
            lines.append(f"- **{md(str(item.get('prompt_id', '')))}**: {excerpt(item.get('prompt', ''))}")
            lines += [f"  - {md(str(c.get('id', '')))}: {excerpt(c.get('text', ''))}"
                      for c in item.get("completions") or [] if isinstance(c, dict)]
    return "\n".join(lines) + "\n"
