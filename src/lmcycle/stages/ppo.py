"""Transitional: the ppo stage still lives in lmcycle.align.ppo_stage (moved here by issue 15)."""

from lmcycle.align.ppo_stage import PpoStage, run_ppo  # noqa: F401
from lmcycle.report.markdown import figure, filename, fraction, is_number, md, plain, save_png
from lmcycle.report.rundir import Run

PPO_COLUMNS = [("score", "Score"), ("judge", "Judge"), ("kl", "KL k1"), ("kl_k3", "KL k3"), ("beta", "β"),
               ("response_len", "Length"), ("distinct_2", "Distinct-2"), ("repetition", "Repetition"),
               ("entropy", "Entropy"), ("alarms", "Alarms")]


def section(run: Run) -> str:
    """A section of report.md per stage that logged PPO rollouts: its setup, a table of selected rollouts, the
    guard's alarms, and a grid of the curves a reward hacker would bend."""
    stages = list(dict.fromkeys(r["stage"] for r in run.rows if r.get("event") == "rollout"))
    parts = []
    for stage in stages:
        mine = [r for r in run.rows if r.get("stage") == stage]
        # After a resume a rollout can be logged twice: the last row of each rollout wins.
        rollouts = list({r["rollout"]: r for r in mine if r.get("event") == "rollout"}.values())
        rollouts.sort(key=lambda r: r["rollout"])
        setup = next((r for r in mine if r.get("event") == "ppo_setup"), {})
        lines = [f"## PPO: {md(stage)}", "",
                 f"{len(rollouts)} rollouts, prompts drawn from a pool of {setup.get('prompts', '?')}; reference: "
                 f"{setup.get('reference', '?')}; reward: {md(_reward_label(setup.get('reward')))}"
                 + (f"; judge (never optimised): {md(_reward_label(setup.get('judge')))}"
                    if setup.get("judge") else "")
                 + ". Score = the reward before the KL penalty; KL is per response token, in nats "
                 "(k1 = log π − log π_ref, k3 = its never-negative estimator).", ""]
        cols = [(k, h) for k, h in PPO_COLUMNS if any(is_number(r.get(k)) for r in rollouts)]
        lines += ["| Rollout | " + " | ".join(h for _, h in cols) + " |", "|---:|" + "---:|" * len(cols)]
        for r in _spread(rollouts, 8):
            lines.append(f"| {r['rollout']} | " + " | ".join(_ppo_cell(r.get(k)) for k, _ in cols) + " |")
        alarms = [r for r in mine if r.get("event") == "alarm"]
        if alarms:
            kinds = [a.get("alarm") for a in alarms]
            lines += ["", "Guard alarms: " + ", ".join(f"{k} × {kinds.count(k)}" for k in dict.fromkeys(kinds))
                      + f"; first: rollout {alarms[0].get('rollout')}: {md(str(alarms[0].get('message')))}"]
        stop = next((r for r in mine if r.get("event") == "early_stop"), None)
        if stop:
            lines += ["", f"**Stopped early** at rollout {stop.get('rollout')}: {md(str(stop.get('reason')))}"]
        plot = _ppo_plot(run, stage, rollouts)
        if plot:
            lines += ["", f"![PPO curves of {stage}]({plot})"]
        lines += ["", f"Sample responses: `{stage}/samples/` (kept in files, not shown here: RL samples can be "
                      "offensive)."]
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def _reward_label(spec: object) -> str:
    """``classifier toxicity: not_toxic, log_odds``-style summary of a logged reward spec."""
    if not isinstance(spec, dict):
        return plain(spec)
    what = spec.get("path") or spec.get("function") or ""
    extra = [str(spec[k]) for k in ("label", "output") if spec.get(k)]
    return f"{spec.get('kind', '?')} {what}" + (f" ({', '.join(extra)})" if extra else "")


def _spread(items: list, k: int) -> list:
    """At most ``k`` items: the first, the last, and evenly spaced ones between."""
    if len(items) <= k:
        return items
    picks = sorted({round(i * (len(items) - 1) / (k - 1)) for i in range(k)})
    return [items[i] for i in picks]


def _ppo_cell(value: object) -> str:
    return str(value) if isinstance(value, int) else fraction(value)


def _ppo_plot(run: Run, stage: str, rollouts: list[dict]) -> str | None:
    if not rollouts:
        return None
    xs = [r["rollout"] for r in rollouts]
    panels = [("reward score (judge: right axis)", [("score", "score")]),
              ("KL per token (nats)", [("kl", "k1"), ("kl_k3", "k3")]), ("β", [("beta", "β")]),
              ("response length (tokens)", [("response_len", "mean")]),
              ("diversity", [("distinct_2", "distinct-2"), ("repetition", "repetition")]),
              ("entropy (nats)", [("entropy", "mean")])]
    fig = figure(11, 6)
    axes = fig.subplots(2, 3).flatten()
    for ax, (title, series) in zip(axes, panels, strict=True):
        for key, label in series:
            ys = [r.get(key) for r in rollouts]
            if any(is_number(y) for y in ys):
                ax.plot(xs, [y if is_number(y) else float("nan") for y in ys], label=label, linewidth=1.2)
        if series[0][0] == "score" and any(is_number(r.get("judge")) for r in rollouts):
            # The judge has its own scale (often a probability): a second axis, not the score's.
            judge_ax = ax.twinx()
            judge_ax.plot(xs, [r["judge"] if is_number(r.get("judge")) else float("nan") for r in rollouts],
                          color="tab:orange", linewidth=1.2, label="judge")
            judge_ax.set_ylabel("judge")
        for x in [r["rollout"] for r in rollouts if r.get("alarms")]:
            ax.axvline(x, color="red", alpha=0.15, linewidth=2)
        ax.set_title(title)
        ax.set_xlabel("rollout")
        if len(series) > 1:
            ax.legend(fontsize=8)
    fig.suptitle(f"{stage}: PPO rollouts (red: a guard alarm)")
    fig.tight_layout()
    name = f"ppo_{filename(stage)}.png"
    save_png(fig, run.dir / "plots" / name)
    return f"plots/{name}"
