"""AiFeedbackStage: RL-CAI's preference labels (Bai et al., 2022, section 4), made by a feedback model.

1. **Samples.** The ``policy`` (the SL-CAI model) answers each prompt of ``prompts`` twice, each draw with its
   own seed; a prompt whose two answers are equal or blank after ``resample`` more tries is left out (counted).
2. **Labels.** For each pair, a comparison principle drawn from the constitution, and the ``feedback_model``'s
   multiple-choice judgement in both orders (:func:`lmcycle.align.ai_feedback.judge`): log-likelihood of
   ``(A)`` vs ``(B)``, averaged over the orders (its position bias is measured), optionally after chain of
   thought (``cot``, probabilities clamped to 40-60%). A backend without log-probs falls back to parsing the
   letter it writes (``scoring: auto``), and the report says so.
3. **Agreement.** With ``human_pairs`` (an ``hh_rlhf`` dataset: the paper's headline figure), the feedback model
   judges each human pair too, and its agreement with the human choice gets a 95% bootstrap interval.

Writes ``<stage>/pairs.jsonl`` (rows ``{"prompt_id", "prompt", "chosen", "rejected", "target", "principle",
...}``: ``target`` is the soft label P(chosen is better) >= 0.5, what ``data: {format: pairs, stage: <this>}``
gives the ``reward`` stage), ``<stage>/human.jsonl`` (the judged human pairs) and ``eval.json``. The feedback
model is ``latest``, a stage name, a path, a hub id, or ``openai:BASE_URL#MODEL`` (``lmcycle serve``, vLLM, a
hosted API): a one-line change. A failing endpoint is retried ``retries`` times, then stops with a clear
error; every judgement made so far is in ``<stage>/journal.jsonl``, and the next run with the same settings
resumes from it.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from tqdm.auto import tqdm

from lmcycle.align.ai_feedback import Judgement, human_agreement, judge, position_bias
from lmcycle.align.constitution import load_constitution
from lmcycle.apps.llm import LocalLLM, NoLogprobs, backend_from_spec
from lmcycle.atomic import atomic_write_text
from lmcycle.config import DatasetName, ModelRef
from lmcycle.errors import LmcycleError
from lmcycle.models.generate import DecodingConfig, describe
from lmcycle.report.markdown import figure, fixed, md, save_png
from lmcycle.report.rundir import Run
from lmcycle.stages.common import ModelStage, model_dtype, write_eval
from lmcycle.stages.completions import draw_seed
from lmcycle.stages.context import RunContext


class AiFeedbackStage(ModelStage):
    """Two answers per prompt from the policy, labelled by a feedback model under the constitution."""

    type: Literal["ai_feedback"] = "ai_feedback"
    policy: ModelRef | None = Field(None, description="the model that answers (latest, a stage name, a path)")
    prompts: DatasetName = Field(description="prompts to answer twice (red-team and helpful prompts)")
    feedback_model: str = Field("latest", description="latest, a stage name, a path, a hub id, or "
                                "openai:BASE_URL#MODEL")
    constitution: str = Field(description="the paper's constitutional_ai folder, or a YAML/JSON constitution")
    cot: bool = Field(False, description="chain-of-thought feedback (probabilities clamped to 40-60%)")
    scoring: Literal["auto", "likelihood", "letter"] = Field(
        "auto", description="auto: log-likelihood of (A)/(B) where the backend gives log-probs, else letters")
    shots: int | None = Field(None, ge=0, description="labelled few-shots in each feedback prompt (None: all)")
    limit: int | None = Field(None, ge=1)
    human_pairs: DatasetName | None = Field(None, description="hh_rlhf pairs: agreement of AI with human labels")
    human_limit: int | None = Field(None, ge=1)
    decoding: DecodingConfig = DecodingConfig(do_sample=True, temperature=1.0, max_new_tokens=64,
                                              stop=["\n\nHuman:"])
    resample: int = Field(2, ge=0, description="extra draws when the two answers are equal or blank")
    retries: int = Field(3, ge=0, description="tries again after a failed feedback call, with backoff")
    seed: int | None = Field(None, ge=0)


def run_ai_feedback(cfg: AiFeedbackStage, ctx: RunContext) -> dict[str, str]:
    name, out = cfg.stage_name, ctx.stage_dir(cfg.stage_name)
    constitution = load_constitution(ctx.recipe_path(cfg.constitution))
    whole = constitution.hash  # the file's constitution, whatever share of its few-shots the prompts take
    if cfg.shots is not None:
        constitution = replace(constitution, feedback_fewshot=constitution.feedback_fewshot[: cfg.shots],
                               cot_fewshot=constitution.cot_fewshot[: cfg.shots])
    seed = ctx.seed_for(cfg.seed)
    examples = ctx.dataset(cfg.prompts)[: cfg.limit]
    policy = LocalLLM(ctx.model_path(cfg.policy), device=ctx.device, attn_implementation=ctx.attn_implementation,
                      dtype=model_dtype(cfg, ctx))
    samples, unusable = sample_pairs(policy, [ex.input for ex in examples], cfg.decoding, seed, cfg.resample)
    del policy
    feedback = feedback_backend(cfg.feedback_model, ctx, cfg)
    rng = random.Random(seed)
    questions = [(ex.id, ex.input, a, b, rng.choice(constitution.comparisons))
                 for ex, pair in zip(examples, samples, strict=True) if pair for a, b in [pair]]
    human = []
    if cfg.human_pairs:
        human = [(ex.id, ex.input, ex.target, ex.meta["rejected"], rng.choice(constitution.comparisons))
                 for ex in ctx.dataset(cfg.human_pairs)[: cfg.human_limit]]
    fingerprint = hashlib.sha256(json.dumps(
        [whole, len(constitution.feedback_fewshot), str(feedback.name), cfg.cot, cfg.scoring, questions, human]).encode()).hexdigest()[:16]
    journal = Journal(out / "journal.jsonl", fingerprint)
    scoring = cfg.scoring
    judged: dict[str, Judgement] = {}
    for kind, items in (("policy", questions), ("human", human)):
        for qid, prompt, first, second, principle in tqdm(items, desc=f"{name}: {kind} pairs", leave=False):
            key = f"{kind}:{qid}"
            if (done := journal.get(key)) is None:
                done, scoring = _judge_with_retries(feedback, constitution, prompt, first, second, principle,
                                                    cfg, scoring, journal)
                journal.add(key, done)
            judged[key] = done
    rows = [pair_row(qid, prompt, first, second, principle, judged[f"policy:{qid}"])
            for qid, prompt, first, second, principle in questions]
    atomic_write_text(out / "pairs.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    forward = torch.tensor([judged[f"policy:{q[0]}"].p_a_forward for q in questions] or [0.5])
    swapped = torch.tensor([judged[f"policy:{q[0]}"].p_a_swapped for q in questions] or [0.5])
    metrics: dict[str, Any] = {"pairs": len(rows), "unusable_prompts": unusable,
                               "position_bias": position_bias(forward, swapped),
                               "mean_target": float(np.mean([r["target"] for r in rows])) if rows else None}
    artifacts = {"pairs": str(out / "pairs.jsonl")}
    settings: dict[str, Any] = {
        "constitution": constitution.source, "constitution_hash": whole, "policy": cfg.policy or "latest",
        "comparisons": len(constitution.comparisons), "shots": len(constitution.feedback_fewshot),
        "feedback_model": cfg.feedback_model, "cot": cfg.cot, "scoring": _scoring_said(judged.values(), cfg.scoring),
        "orders": "both, averaged", "decoding": describe(cfg.decoding), "seed": seed}
    if human:
        p_chosen = [judged[f"human:{h[0]}"].p_first for h in human]
        score = human_agreement(p_chosen, seed=seed)
        metrics |= {"human_" + k: v for k, v in score.values.items()} | {"human_pairs": len(human)}
        settings["human_agreement"] = score.settings
        atomic_write_text(out / "human.jsonl", "".join(json.dumps({"prompt_id": h[0], "principle": h[4],
                                                                   "p_chosen": p}) + "\n"
                                                       for h, p in zip(human, p_chosen, strict=True)))
        artifacts["human"] = str(out / "human.jsonl")
    artifacts["eval"] = write_eval(out, {"metrics": metrics, "settings": settings})
    ctx.log(name, **{k: v for k, v in metrics.items() if v is not None})
    return artifacts


def feedback_backend(spec: str, ctx: RunContext, cfg: ModelStage):
    """The feedback model: an OpenAI-compatible endpoint for ``openai:URL#MODEL``, else a model of the run."""
    if spec.startswith("openai:"):
        return backend_from_spec(spec)
    return LocalLLM(ctx.model_path(spec), device=ctx.device, attn_implementation=ctx.attn_implementation,
                    dtype=model_dtype(cfg, ctx))


def sample_pairs(policy, prompts: list[str], decoding: DecodingConfig, seed: int,
                 resample: int) -> tuple[list[tuple[str, str] | None], int]:
    """Two distinct non-blank answers per prompt (None where ``resample`` more draws found none), and how many
    prompts have none. Draw ``d`` samples every prompt still short with seed ``draw_seed(seed, d)``."""
    kept: list[list[str]] = [[] for _ in prompts]
    for draw in range(2 + resample):
        needy = [i for i, texts in enumerate(kept) if len(texts) < 2]
        if not needy:
            break
        texts = policy.complete([prompts[i] for i in needy],
                                decoding.model_copy(update={"seed": draw_seed(seed, draw), "do_sample": True}))
        for i, text in zip(needy, texts, strict=True):
            if text.strip() and text.strip() not in [t.strip() for t in kept[i]]:
                kept[i].append(text.strip())
    pairs = [(t[0], t[1]) if len(t) == 2 else None for t in kept]
    return pairs, sum(p is None for p in pairs)


def pair_row(prompt_id: str, prompt: str, first: str, second: str, principle: str, j: Judgement) -> dict:
    """A soft-labelled pair of ``pairs.jsonl``: the likelier-better answer as ``chosen``, ``target`` its
    probability (>= 0.5), and the judgement's parts."""
    chosen, rejected, target = (first, second, j.p_first) if j.p_first >= 0.5 else (second, first, 1 - j.p_first)
    return {"prompt_id": prompt_id, "prompt": prompt, "chosen": chosen, "rejected": rejected, "target": target,
            "principle": principle, "p_a_forward": j.p_a_forward, "p_a_swapped": j.p_a_swapped,
            "scoring": j.scoring}


def _judge_with_retries(feedback, constitution, prompt, first, second, principle, cfg: AiFeedbackStage,
                        scoring: str, journal: Journal) -> tuple[Judgement, str]:
    """One judgement, retried on a failing backend; ``auto`` scoring turns to letters for good once the
    backend says it has no log-probs. Returns the judgement and the scoring to use from now on."""
    for attempt in range(cfg.retries + 1):
        try:
            return judge(feedback, constitution, prompt, first, second, principle, cot=cfg.cot,
                         letters_only=scoring == "letter"), scoring
        except NoLogprobs:
            if scoring != "auto":
                raise
            return judge(feedback, constitution, prompt, first, second, principle, cot=cfg.cot,
                         letters_only=True), "letter"
        except LmcycleError:
            raise
        except Exception as e:  # a network or server error of the endpoint: try again, then stop clearly
            if attempt == cfg.retries:
                raise LmcycleError(
                    f"the feedback model failed {cfg.retries + 1} times ({type(e).__name__}: {e}); the "
                    f"{len(journal)} judgements made so far are kept in {journal.path}: run again to resume",
                    field="feedback_model") from e
            time.sleep(min(2.0**attempt, 30.0))
    raise AssertionError("unreachable")


def _scoring_said(judgements, asked: str) -> str:
    used = sorted({j.scoring for j in judgements})
    if asked == "auto" and used == ["letter"]:
        return "letter (the endpoint gives no log-probs: each order gives 0, 1 or 0.5)"
    return "+".join(used) or asked


class Journal:
    """Judgements made so far, one JSON line each, appended and flushed as they are made: what a failed run
    leaves, and what the next run with the same ``fingerprint`` (settings and questions) starts from. A torn
    last line (a killed process) is ignored; lines of other settings are not read."""

    def __init__(self, path: Path, fingerprint: str):
        self.path, self.fingerprint, self.done = path, fingerprint, {}
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if row.get("fingerprint") == fingerprint:
                    j = row["judgement"]
                    self.done[row["key"]] = Judgement(j["p_first"], j["p_a_forward"], j["p_a_swapped"],
                                                      j["scoring"], tuple(j["reasoning"]))

    def __len__(self) -> int:
        return len(self.done)

    def get(self, key: str) -> Judgement | None:
        return self.done.get(key)

    def add(self, key: str, j: Judgement) -> None:
        self.done[key] = j
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"fingerprint": self.fingerprint, "key": key, "judgement": j.__dict__}) + "\n")
            f.flush()


def section(run: Run) -> str:
    """report.md's RL-CAI part: per ai_feedback stage, the feedback model, scoring, position bias, the soft
    labels, and agreement with human choices (95% interval) with a calibration plot."""
    found = [(s, d) for s in run.stages_of("ai_feedback") if (d := run.eval_json(s)) is not None]
    if not found:
        return ""
    lines = ["### RL-CAI: AI feedback", "",
             "| Stage | Feedback model | Scoring | CoT | Pairs | Position bias | Mean soft label "
             "| Agreement with humans [95% CI] | Constitution (hash) |",
             "|---|---|---|---|---:|---:|---:|---|---|"]
    plots = []
    for stage, data in found:
        m, s = data.get("metrics") or {}, data.get("settings") or {}
        agree = "—"
        if m.get("human_agreement") is not None:
            agree = (f"{m['human_agreement']:.3f} [{m['human_ci_low']:.3f}, {m['human_ci_high']:.3f}] "
                     f"(n {m['human_pairs']})")
            plots.append(stage)
        lines.append(f"| {md(stage)} | `{md(str(s.get('feedback_model')))}` | {md(str(s.get('scoring')))} "
                     f"| {'yes' if s.get('cot') else 'no'} | {m.get('pairs')} | {fixed(m.get('position_bias'), 3)} "
                     f"| {fixed(m.get('mean_target'), 3)} | {agree} | `{md(str(s.get('constitution_hash')))}` |")
    lines += ["", "Position bias: mean P((A)) over both orders minus 0.5 (0: indifferent to position); each pair's "
              "label averages the two orders, which cancels it. Agreement: share of human-labelled HH-RLHF "
              "harmless pairs where the AI label prefers the human's choice. As with the critiques, a feedback "
              "model this small labels near chance; the paper's AI labels reach human-level agreement only at "
              "tens of billions of parameters."]
    if plots:
        lines += ["", f"![AI feedback calibration]({_calibration_plot(run, plots)})"]
    return "\n".join(lines) + "\n"


def versus_rlhf(run: Run) -> str:
    """report.md's CAI-beside-RLHF part: every toxicity eval of the run, with how the model it scored was aligned
    (the starting point, SL-CAI, PPO on AI labels, PPO on human labels) and that preference model's accuracy on
    held-out human pairs, so CAI and human-feedback RLHF read in one table."""
    if not run.stages_of("critique_revise", "ai_feedback"):
        return ""
    stages = {s.get("name") or s.get("type"): s for s in run.config.get("stages") or []}
    data = run.config.get("data") or {}
    rows = []
    for stage, ev in run.evals.items():
        if run.kind_of(stage) != "eval" or ev.metrics.get("toxicity") is None:
            continue
        scored = str((stages.get(stage) or {}).get("model") or "")
        how, rm = _alignment_of(stages.get(scored) or {}, stages, data, run)
        rm_cell = "—"
        if rm and (acc := (run.eval_json(rm) or {}).get("metrics", {}).get("accuracy")) is not None:
            rm_cell = f"{md(rm)}: {acc:.3f}"
        rows.append(f"| {md(stage)} | `{md(scored)}` | {how} | {rm_cell} | {fixed(ev.metrics['toxicity'], 3)} "
                    f"| {fixed(ev.metrics.get('toxic_fraction'), 3)} | {ev.metrics.get('n')} |")
    if not rows:
        return ""
    return "\n".join(["### CAI beside human-feedback RLHF", "",
                      "Harmfulness of the answers to held-out red-team prompts, by the toxicity classifier (mean "
                      "P(toxic) and the share above its threshold, 0.5 by default), for each model the run "
                      "aligned. Preference model: "
                      "its accuracy on the held-out pairs of its `eval_data` (chance 0.50).", "",
                      "| Eval | Model | Aligned by | Preference model (human-pair accuracy) | Toxicity "
                      "| Toxic share | n |", "|---|---|---|---|---:|---:|---:|", *rows]) + "\n"


def _alignment_of(cfg: dict, stages: dict[str, dict], data: dict, run: Run) -> tuple[str, str | None]:
    """How a model of the run was aligned, in words, and the reward stage it was optimised against."""
    def sources(datasets) -> list[str]:  # the stage each dataset is read from ('' for files)
        names = [d.get("dataset") if isinstance(d, dict) else d for d in (datasets or [])]
        names = [names] if isinstance(datasets, str) else names
        return [str((data.get(n) or {}).get("stage") or "") for n in names]

    kind = cfg.get("type")
    if kind == "sft" and any(run.kind_of(s) == "critique_revise" for s in sources(cfg.get("data")) if s):
        return "SL-CAI: SFT on critique → revision", None
    if kind in ("ppo", "dpo"):
        rm = str((cfg.get("reward") or {}).get("path") or "") if kind == "ppo" else ""
        labels = sources((stages.get(rm) or {}).get("data")) if rm else sources(cfg.get("data"))
        ai = any(run.kind_of(s) == "ai_feedback" for s in labels if s)
        how = f"{'RL-CAI' if ai else 'RLHF'}: {kind.upper()} on {'AI' if ai else 'human'} labels"
        return f"{how}, from `{md(str(cfg.get('model') or 'latest'))}`", rm or None
    return "— (the starting point)", None


def _calibration_plot(run: Run, stages: list[str]) -> str:
    """Left: binned AI confidence against how often its choice is the human's (the diagonal is calibrated).
    Right: the AI's probability of the human's choice, pair by pair (a feedback model near chance piles up at
    0.5, which the left panel alone would show as a single point)."""
    fig = figure(10, 4)
    ax, hist = fig.subplots(1, 2)
    bins = np.linspace(0.5, 1.0, 6)
    for stage in stages:
        path = run.dir / stage / "human.jsonl"
        if not path.exists():
            continue
        p = np.array([json.loads(line)["p_chosen"] for line in path.read_text().splitlines() if line])
        confidence = np.maximum(p, 1 - p)  # how sure the AI is of its own choice
        which = np.clip(np.digitize(confidence, bins) - 1, 0, len(bins) - 2)
        xs, ys = zip(*[(confidence[which == b].mean(), (p[which == b] > 0.5).mean())
                       for b in range(len(bins) - 1) if (which == b).any()], strict=True)
        ax.plot(xs, ys, "o-", label=f"{stage} (n {len(p)})")
        hist.hist(p, bins=np.linspace(0, 1, 41), alpha=0.6, label=stage)
    ax.plot([0.5, 1], [0.5, 1], "k--", lw=1, label="calibrated")
    ax.set(xlabel="AI confidence in its choice (binned)", ylabel="share agreeing with the human choice",
           xlim=(0.48, 1.02), ylim=(-0.02, 1.02), title="AI feedback vs human labels (HH-RLHF harmless)")
    ax.legend(fontsize=8)
    hist.axvline(0.5, color="k", ls="--", lw=1)
    hist.set(xlabel="AI P(the human's choice is better)", ylabel="pairs", title="AI labels of the human pairs")
    hist.legend(fontsize=8)
    save_png(fig, run.dir / "plots" / "ai_feedback_calibration.png")
    return "plots/ai_feedback_calibration.png"
