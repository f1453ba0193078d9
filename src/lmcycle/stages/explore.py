"""Transitional: the explore stage still lives in lmcycle.models.explore (moved here by issue 15)."""

from lmcycle.models.explore import ExploreStage, run_explore  # noqa: F401
from lmcycle.report.markdown import md
from lmcycle.report.rundir import Run


def section(run: Run) -> str:
    """The decoding explorer of report.md: the plot of every stage that made one (the explore stages)."""
    lines = []
    for stage, produced in run.artifacts.items():
        path = run.resolve(produced["plot"]) if "plot" in produced else None
        if path is not None:
            lines += [f"### {md(stage)}", "", f"![{md(stage)}]({run.link(path)})", ""]
    return "\n".join(["## Decoding explorer", "", *lines]) if lines else ""
