"""The alignment sections of report.md: text classifiers, reward models and DPO (their held-out eval.json),
and PPO (its rollout log: reward, judge, KL, length, diversity, alarms, as a table and a grid of curves)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from lmcycle.report import (
    _filename,
    _fraction,
    _is_number,
    _md,
    _number,
    _plain,
    _read_json,
    _save_png,
    resolve,
    stages_of_kinds,
)


def alignment_stages(config: dict, rows: list[dict]) -> dict[str, str]:
    """Stage name -> kind of every alignment stage of the run, in recipe order."""
    return stages_of_kinds(config, rows, ALIGNMENT_TABLES)


def alignment_section(run_dir: Path, aligned: dict[str, str], rows: list[dict],
               artifacts: dict[str, dict[str, str]]) -> str:
    """Held-out metrics of every finished alignment stage (its eval.json), a table per kind, and a plot of
    held-out accuracy over the training steps."""
    results: dict[str, list[tuple[str, dict]]] = {}
    for name, kind in aligned.items():
        path = resolve(run_dir, artifacts.get(name, {}).get("eval", ""))
        data = _read_json(path) if path and path.is_file() else None
        if isinstance(data, dict):
            results.setdefault(kind, []).append((name, data))
    if not results:
        return ""
    lines = ["## Alignment", ""]
    for kind, (title, intro, table) in ALIGNMENT_TABLES.items():
        if kind in results:
            lines += [f"### {title}", "", intro, "", *table(results[kind]), ""]
    preference = [n for kind in ("reward", "dpo") for n, _ in results.get(kind, [])]
    plot = _held_out_accuracy_plot(run_dir, rows, preference)
    if plot:
        lines += [f"![held-out accuracy over training steps]({plot})", ""]
    return "\n".join(lines)


def _reward_table(results: list[tuple[str, dict]]) -> list[str]:
    lines = ["| Stage | Backbone | Train pairs | Held-out pairs | Pair accuracy | Loss | Margin (r_c − r_r) "
             "| Reward mean ± std |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, data in results:
        m, s = data.get("metrics") or {}, data.get("settings") or {}
        spread = (f"{m['reward_mean']:.3f} ± {m['reward_std']:.3f}"
                  if _is_number(m.get("reward_mean")) and _is_number(m.get("reward_std")) else "—")
        lines.append(f"| {_md(name)} | {_md(str(s.get('backbone', '—')))} | {s.get('train_pairs', '—')} | "
                     f"{m.get('n', '—')} | {_fraction(m.get('accuracy'))} | {_fraction(m.get('loss'))} | "
                     f"{_fraction(m.get('margin'))} | {spread} |")
    return lines


def _dpo_table(results: list[tuple[str, dict]]) -> list[str]:
    lines = ["| Stage | Method | Loss, β | Train pairs | Held-out pairs | Implicit-reward accuracy | Margin "
             "| Chosen reward | Rejected reward |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, data in results:
        m, s = data.get("metrics") or {}, data.get("settings") or {}
        peft = s.get("peft") or {}
        method = f"lora r={peft.get('r')}" if peft else "full"
        loss = f"{s.get('loss_type', 'sigmoid')}, β={s.get('beta', '—')}"
        lines.append(f"| {_md(name)} | {method} | {_md(loss)} | {s.get('train_pairs', '—')} | {m.get('n', '—')} | "
                     f"{_fraction(m.get('accuracy'))} | {_fraction(m.get('margin'))} | "
                     f"{_fraction(m.get('chosen_reward'))} | {_fraction(m.get('rejected_reward'))} |")
    return lines


def _classifier_table(results: list[tuple[str, dict]]) -> list[str]:
    lines = ["| Stage | Held-out dataset | n | Accuracy | Macro-F1 | TF-IDF + LR macro-F1 |",
             "|---|---|---:|---:|---:|---:|"]
    for name, data in results:
        m, s = data.get("metrics") or {}, data.get("settings") or {}
        for dataset in s.get("eval_data") or []:
            lines.append(f"| {_md(name)} | {_md(dataset)} | {m.get(f'{dataset}.n', '—')} | "
                         f"{_number(m.get(f'{dataset}.accuracy'))} | {_number(m.get(f'{dataset}.macro_f1'))} | "
                         f"{_number(m.get(f'baseline.{dataset}.macro_f1'))} |")
    return lines


PREFERENCE_INTRO = ("Held-out preference pairs (prompts never trained on). A reward model is right on a pair when "
                    "the chosen reply scores higher; a DPO policy when its implicit reward β·(log π − log π_ref) "
                    "of the chosen reply is higher. Chance is 0.50.")
# stage type -> (heading, intro, table rows from [(stage name, its eval.json)]); a new kind adds a line here
ALIGNMENT_TABLES = {
    "classifier": ("Text classifiers (reward and judge models)", "Held-out datasets; accuracy and macro-F1 × 100, "
                   "next to a TF-IDF + logistic-regression baseline fitted on the same training texts.",
                   _classifier_table),
    "reward": ("Reward models", PREFERENCE_INTRO, _reward_table),
    "dpo": ("DPO", PREFERENCE_INTRO, _dpo_table),
}


def _held_out_accuracy_plot(run_dir: Path, rows: list[dict], stages: list[str]) -> str | None:
    from matplotlib.figure import Figure

    curves = {name: [(r["step"], r["eval_accuracy"]) for r in rows if r.get("stage") == name
                     and _is_number(r.get("step")) and _is_number(r.get("eval_accuracy"))] for name in stages}
    curves = {name: points for name, points in curves.items() if points}
    if not curves:
        return None
    fig = Figure(figsize=(6, 3.6))
    ax = fig.subplots()
    for name, points in curves.items():
        ax.plot([s for s, _ in points], [a for _, a in points], "o-", label=name)
    ax.axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlabel("step")
    ax.set_ylabel("held-out accuracy")
    ax.set_title("Held-out preference accuracy")
    ax.legend()
    _save_png(fig, run_dir / "plots" / "alignment_accuracy.png")
    return "plots/alignment_accuracy.png"


# -- PPO: the rollout log, the guard's alarms, and the curves a reward hacker would bend -------------------------

PPO_COLUMNS = [("score", "Score"), ("judge", "Judge"), ("kl", "KL k1"), ("kl_k3", "KL k3"), ("beta", "β"),
               ("response_len", "Length"), ("distinct_2", "Distinct-2"), ("repetition", "Repetition"),
               ("entropy", "Entropy"), ("alarms", "Alarms")]


def ppo_sections(run_dir: Path, rows: list[dict]) -> str:
    """A section per PPO stage: setup, a table of selected rollouts, alarms, and a grid of curves."""
    stages = list(dict.fromkeys(r["stage"] for r in rows if r.get("event") == "rollout"))
    parts = []
    for stage in stages:
        mine = [r for r in rows if r.get("stage") == stage]
        # After a resume a rollout can be logged twice: the last row of each rollout wins.
        rollouts = list({r["rollout"]: r for r in mine if r.get("event") == "rollout"}.values())
        rollouts.sort(key=lambda r: r["rollout"])
        setup = next((r for r in mine if r.get("event") == "ppo_setup"), {})
        lines = [f"## PPO: {_md(stage)}", "",
                 f"{len(rollouts)} rollouts, prompts drawn from a pool of {setup.get('prompts', '?')}; reference: "
                 f"{setup.get('reference', '?')}; reward: {_md(_reward_label(setup.get('reward')))}"
                 + (f"; judge (never optimised): {_md(_reward_label(setup.get('judge')))}"
                    if setup.get("judge") else "")
                 + ". Score = the reward before the KL penalty; KL is per response token, in nats "
                 "(k1 = log π − log π_ref, k3 = its never-negative estimator).", ""]
        shown = _spread(rollouts, 8)
        cols = [(k, h) for k, h in PPO_COLUMNS if any(_is_number(r.get(k)) for r in rollouts)]
        lines += ["| Rollout | " + " | ".join(h for _, h in cols) + " |",
                  "|---:|" + "---:|" * len(cols)]
        for r in shown:
            lines.append(f"| {r['rollout']} | " + " | ".join(_ppo_cell(r.get(k)) for k, _ in cols) + " |")
        alarms = [r for r in mine if r.get("event") == "alarm"]
        if alarms:
            kinds = Counter(a.get("alarm") for a in alarms)
            lines += ["", "Guard alarms: " + ", ".join(f"{k} × {n}" for k, n in kinds.items())
                      + f"; first: rollout {alarms[0].get('rollout')}: {_md(str(alarms[0].get('message')))}"]
        stop = next((r for r in mine if r.get("event") == "early_stop"), None)
        if stop:
            lines += ["", f"**Stopped early** at rollout {stop.get('rollout')}: {_md(str(stop.get('reason')))}"]
        plot = _ppo_plot(run_dir, stage, rollouts)
        if plot:
            lines += ["", f"![PPO curves of {stage}]({plot})"]
        lines += ["", f"Sample responses: `{stage}/samples/` (kept in files, not shown here: RL samples can be "
                      "offensive)."]
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def _reward_label(spec: Any) -> str:
    """``classifier toxicity: not_toxic, log_odds``-style summary of a logged reward spec."""
    if not isinstance(spec, dict):
        return _plain(spec)
    what = spec.get("path") or spec.get("function") or ""
    extra = [str(spec[k]) for k in ("label", "output") if spec.get(k)]
    return f"{spec.get('kind', '?')} {what}" + (f" ({', '.join(extra)})" if extra else "")


def _spread(items: list, k: int) -> list:
    """At most ``k`` items: the first, the last, and evenly spaced ones between."""
    if len(items) <= k:
        return items
    picks = sorted({round(i * (len(items) - 1) / (k - 1)) for i in range(k)})
    return [items[i] for i in picks]


def _ppo_cell(value: Any) -> str:
    return str(value) if isinstance(value, int) else _fraction(value)


def _ppo_plot(run_dir: Path, stage: str, rollouts: list[dict]) -> str | None:
    from matplotlib.figure import Figure

    if not rollouts:
        return None
    xs = [r["rollout"] for r in rollouts]
    panels = [("reward score (judge: right axis)", [("score", "score")]), ("KL per token (nats)", [("kl", "k1"),
              ("kl_k3", "k3")]), ("β", [("beta", "β")]), ("response length (tokens)", [("response_len", "mean")]),
              ("diversity", [("distinct_2", "distinct-2"), ("repetition", "repetition")]),
              ("entropy (nats)", [("entropy", "mean")])]
    fig = Figure(figsize=(11, 6))
    axes = fig.subplots(2, 3).flatten()
    for ax, (title, series) in zip(axes, panels, strict=True):
        for key, label in series:
            ys = [r.get(key) for r in rollouts]
            if any(_is_number(y) for y in ys):
                ax.plot(xs, [y if _is_number(y) else float("nan") for y in ys], label=label, linewidth=1.2)
        if series[0][0] == "score" and any(_is_number(r.get("judge")) for r in rollouts):
            # The judge has its own scale (often a probability): a second axis, not the score's.
            judge_ax = ax.twinx()
            judge_ax.plot(xs, [r["judge"] if _is_number(r.get("judge")) else float("nan") for r in rollouts],
                          color="tab:orange", linewidth=1.2, label="judge")
            judge_ax.set_ylabel("judge")
        alarmed = [r["rollout"] for r in rollouts if r.get("alarms")]
        for x in alarmed:
            ax.axvline(x, color="red", alpha=0.15, linewidth=2)
        ax.set_title(title)
        ax.set_xlabel("rollout")
        if len(series) > 1:
            ax.legend(fontsize=8)
    fig.suptitle(f"{stage}: PPO rollouts (red: a guard alarm)")
    fig.tight_layout()
    name = f"ppo_{_filename(stage)}.png"
    _save_png(fig, run_dir / "plots" / name)
    return f"plots/{name}"
