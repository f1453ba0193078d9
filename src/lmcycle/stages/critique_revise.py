"""CritiqueReviseStage: SL-CAI's data (Bai et al., 2022, section 3): red-team answers, critiqued and revised
against a constitution's principles.

For each prompt of ``prompts`` (the first ``limit``): the model's answer after the constitution's first
``shots`` critique/revision few-shots (:func:`lmcycle.align.constitution.answer_prompt`), then ``rounds``
rounds of (a principle drawn at random → critique → revision), each round critiquing the latest revision, in
the paper's format (:mod:`lmcycle.align.constitution`). A blank revision keeps the previous response (counted).

Writes ``<stage>/traces.jsonl`` (one line per prompt and round: prompt id, prompt, the response critiqued,
principle id, critique, revision; never printed) and ``<stage>/revisions.jsonl`` (``{"id", "input", "target"}``:
the prompt and its final revision, the data an ``sft`` stage trains on, mixed with helpful data by weight,
through ``data: {format: jsonl, stage: <this stage>}``); ``eval.json`` holds the counts and the constitution's
hash. The model is any backend: a model of the run, a path or hub id, or ``backend: openai:URL#MODEL``.
"""

from __future__ import annotations

import json
import random
from dataclasses import replace
from typing import Literal

from pydantic import Field

from lmcycle.align.constitution import (
    Constitution,
    answer_prompt,
    critique_prompt,
    load_constitution,
    revision_prompt,
)
from lmcycle.apps.llm import LocalLLM, backend_from_spec
from lmcycle.atomic import atomic_write_text
from lmcycle.config import DatasetName, ModelRef
from lmcycle.models.generate import DecodingConfig, describe
from lmcycle.report.markdown import fixed, md
from lmcycle.report.rundir import Run
from lmcycle.stages.common import ModelStage, model_dtype, write_eval
from lmcycle.stages.context import RunContext

# A turn ends where the paper's format starts the next one.
STOPS = {"answer": ["\n\nHuman:", "\n\nCritiqueRequest:"],
         "critique": ["\n\nRevisionRequest:", "\n\nHuman:"],
         "revision": ["\n\nCritiqueRequest:", "\n\nHuman:"]}
SMALL_MODEL_WARNING = ("Models this small write meaningless critiques and revisions: these numbers check the "
                       "pipeline, not the method. The paper's critiques become useful at tens of billions of "
                       "parameters; expect to need a 7B+ instruction-tuned model (one GPU with 24 GB or more, "
                       "or an endpoint) for critiques that name real harms.")


class CritiqueReviseStage(ModelStage):
    """Answer red-team prompts, then critique and revise each answer ``rounds`` times against a constitution."""

    type: Literal["critique_revise"] = "critique_revise"
    model: ModelRef | None = Field(None, description="latest, a stage name, a path or a hub id")
    backend: str | None = Field(None, description="openai:BASE_URL#MODEL instead of an in-process model")
    prompts: DatasetName = Field(description="red-team prompts (formats cai_prompts, hh_red_team, any dataset)")
    constitution: str = Field(description="the paper's constitutional_ai folder, or a YAML/JSON constitution")
    rounds: int = Field(4, ge=1, le=16, description="critique → revision rounds (the paper: up to 4)")
    shots: int | None = Field(None, ge=0, description="critique few-shots in each prompt (None: all); a small "
                              "context window takes fewer")
    limit: int | None = Field(None, ge=1)
    decoding: DecodingConfig = DecodingConfig(do_sample=True, temperature=1.0, max_new_tokens=64)
    seed: int | None = Field(None, ge=0, description="principles and sampling (None: the recipe's seed)")


def run_critique_revise(cfg: CritiqueReviseStage, ctx: RunContext) -> dict[str, str]:
    name = cfg.stage_name
    constitution = load_constitution(ctx.recipe_path(cfg.constitution))
    whole = constitution.hash  # the file's constitution, whatever share of its few-shots the prompts take
    if cfg.shots is not None:
        constitution = replace(constitution, critique_fewshot=constitution.critique_fewshot[: cfg.shots])
    llm = backend_from_spec(cfg.backend) if cfg.backend else LocalLLM(
        ctx.model_path(cfg.model), device=ctx.device, attn_implementation=ctx.attn_implementation,
        dtype=model_dtype(cfg, ctx))
    examples = ctx.dataset(cfg.prompts)[: cfg.limit]
    prompts = [ex.input for ex in examples]
    seed = ctx.seed_for(cfg.seed)
    traces, finals, counts = critique_and_revise(llm, constitution, prompts, cfg.rounds, cfg.decoding, seed)
    out = ctx.stage_dir(name)
    for trace, ex in zip(traces, (ex for ex in examples for _ in range(cfg.rounds)), strict=True):
        trace["prompt_id"] = ex.id
    atomic_write_text(out / "traces.jsonl", "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in traces))
    # a prompt whose answer and revisions were all blank has nothing to train on: left out, counted
    kept = [(ex, final) for ex, final in zip(examples, finals, strict=True) if final.strip()]
    counts["blank_final_left_out"] = len(examples) - len(kept)
    atomic_write_text(out / "revisions.jsonl", "".join(
        json.dumps({"id": ex.id, "input": ex.input, "target": final}, ensure_ascii=False) + "\n"
        for ex, final in kept))
    settings = {"constitution": constitution.source, "constitution_hash": whole,
                "principles": len(constitution.critiques), "shots": len(constitution.critique_fewshot),
                "rounds": cfg.rounds, "model": cfg.backend or cfg.model or "latest", "decoding": describe(cfg.decoding), "seed": seed}
    eval_path = write_eval(out, {"metrics": counts, "settings": settings})
    ctx.log(name, **counts)
    # "data": the dataset file a `stage:` dataset of format jsonl reads (lmcycle.data.loaders.STAGE_FORMATS)
    return {"traces": str(out / "traces.jsonl"), "data": str(out / "revisions.jsonl"), "eval": eval_path}


def critique_and_revise(llm, constitution: Constitution, prompts: list[str], rounds: int,
                        decoding: DecodingConfig, seed: int) -> tuple[list[dict], list[str], dict[str, float]]:
    """``(traces, final revisions, counts)`` for ``prompts``, batched one turn at a time over all prompts.

    A trace per prompt and round (in prompt, then round order): ``{"prompt", "round", "answer" (the response
    critiqued), "principle", "critique", "revision"}``. Principles are drawn with ``random.Random(seed)``, one per
    prompt and round, in that order; every call samples with its own seed derived from ``seed``.
    """
    rng = random.Random(seed)
    calls = iter(range(1, 1_000_000))

    def complete(texts: list[str], turn: str) -> list[str]:
        return llm.complete(texts, decoding.model_copy(update={"seed": seed + next(calls), "stop": STOPS[turn]}))

    answers = complete([answer_prompt(constitution, p) for p in prompts], "answer")
    first, current = list(answers), list(answers)
    traces: list[list[dict]] = [[] for _ in prompts]
    kept_blank = 0
    for r in range(rounds):
        principles = [rng.choice(constitution.critiques) for _ in prompts]
        critiques = complete([critique_prompt(constitution, p, a, pr)
                              for p, a, pr in zip(prompts, current, principles, strict=True)], "critique")
        revisions = complete([revision_prompt(constitution, p, a, pr, c)
                              for p, a, pr, c in zip(prompts, current, principles, critiques, strict=True)],
                             "revision")
        for i, (pr, c, rev) in enumerate(zip(principles, critiques, revisions, strict=True)):
            traces[i].append({"prompt": prompts[i], "round": r, "answer": current[i], "principle": pr.id,
                              "critique": c, "revision": rev})
            if rev.strip():
                current[i] = rev.strip()
            else:
                kept_blank += 1
    n = max(len(prompts), 1)
    counts = {"prompts": len(prompts), "rounds": rounds, "blank_revisions_kept": kept_blank,
              "changed": sum(a.strip() != c for a, c in zip(first, current, strict=True)) / n,
              "answer_words": sum(len(a.split()) for a in first) / n,
              "revision_words": sum(len(c.split()) for c in current) / n}
    return [t for group in traces for t in group], current, counts


def section(run: Run) -> str:
    """report.md's SL-CAI part: per critique_revise stage, the constitution (path and hash), the counts, and
    the plain statement that a tiny model's critiques are meaningless."""
    found = [(s, d) for s in run.stages_of("critique_revise") if (d := run.eval_json(s)) is not None]
    if not found:
        return ""
    lines = ["### SL-CAI: critique → revision", "",
             "| Stage | Model | Prompts | Rounds | Principles | Changed | Answer words | Revision words "
             "| Blank revisions kept | Constitution (hash) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for stage, data in found:
        m, s = data.get("metrics") or {}, data.get("settings") or {}
        lines.append(f"| {md(stage)} | `{md(str(s.get('model')))}` | {m.get('prompts')} | {m.get('rounds')} "
                     f"| {s.get('principles')} | {fixed(m.get('changed'), 2)} | {fixed(m.get('answer_words'), 1)} "
                     f"| {fixed(m.get('revision_words'), 1)} | {m.get('blank_revisions_kept')} "
                     f"| `{md(str(s.get('constitution_hash')))}` |")
    lines += ["", f"Every round is in `<stage>/traces.jsonl` (not shown here: red-team text). {SMALL_MODEL_WARNING}"]
    return "\n".join(lines) + "\n"
