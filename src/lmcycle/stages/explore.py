"""ExploreStage: the decoding explorer (:mod:`lmcycle.models.explore`) on one prompt of a recipe.

The prompt is given as text, or is example ``index`` of a recipe dataset rendered zero-shot with ``template``.
Writes ``explore.json`` (:func:`~lmcycle.models.explore.explore`'s result), ``explore.png`` (one panel per
setting) and ``explore.md`` (the same numbers as tables) under the stage directory.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from lmcycle.artifacts import load_model
from lmcycle.atomic import atomic_write_json, atomic_write_text
from lmcycle.config import DatasetName, ModelRef
from lmcycle.data.templates import get_template
from lmcycle.errors import LmcycleError
from lmcycle.models.explore import default_settings, exploration_markdown, explore, plot_exploration
from lmcycle.models.generate import DecodingConfig
from lmcycle.report.markdown import md
from lmcycle.report.rundir import Run
from lmcycle.stages.common import ModelStage, model_dtype
from lmcycle.stages.context import RunContext


class ExploreStage(ModelStage):
    """Show how decoding settings reshape the next-token distribution of one prompt."""

    type: Literal["explore"] = "explore"
    model: ModelRef | None = None
    prompt: str | None = None
    data: DatasetName | None = None  # a dataset of the recipe: the prompt is example `index` rendered with `template`
    index: int = Field(default=0, ge=0)
    template: str = "summarize"
    top_n: int = Field(default=20, ge=1, le=100)
    settings: list[DecodingConfig] = Field(default_factory=default_settings, min_length=1)

    @model_validator(mode="after")
    def _one_prompt_source(self) -> ExploreStage:
        if (self.prompt is None) == (self.data is None):
            raise ValueError("set exactly one of 'prompt' (a text) and 'data' (a dataset name)")
        return self


def stage_prompt(cfg: ExploreStage, ctx: RunContext) -> str:
    """The prompt given, or example ``index`` of dataset ``data`` rendered zero-shot with ``template``."""
    if cfg.prompt is not None:
        return cfg.prompt
    examples = ctx.dataset(cfg.data)
    if cfg.index >= len(examples):
        raise LmcycleError(f"index {cfg.index} is out of range: dataset '{cfg.data}' has {len(examples)} examples",
                           file=ctx.recipe_file, field="index")
    return get_template(cfg.template).render(examples[cfg.index], [])


def run_explore(cfg: ExploreStage, ctx: RunContext) -> dict[str, str]:
    """Write ``explore.json``, ``explore.png`` and ``explore.md`` under the stage directory."""
    name = cfg.stage_name
    model, tokenizer = load_model(ctx.model_path(cfg.model), device=ctx.device, dtype=model_dtype(cfg, ctx),
                                  attn_implementation=ctx.attn_implementation)
    result = explore(model, tokenizer, stage_prompt(cfg, ctx), cfg.settings, top_n=cfg.top_n)
    out = ctx.stage_dir(name)
    atomic_write_json(out / "explore.json", result)
    plot_exploration(result, out / "explore.png")
    atomic_write_text(out / "explore.md", exploration_markdown(result))
    ctx.log(name, settings=len(cfg.settings), top_token=result["tokens"][0]["label"],
            top_prob=result["tokens"][0]["prob"])
    return {"plot": str(out / "explore.png"), "explore": str(out / "explore.json"),
            "table": str(out / "explore.md")}


def section(run: Run) -> str:
    """The decoding explorer of report.md: the plot of every stage that made one (the explore stages)."""
    lines = []
    for stage, produced in run.artifacts.items():
        path = run.resolve(produced["plot"]) if "plot" in produced else None
        if path is not None:
            lines += [f"### {md(stage)}", "", f"![{md(stage)}]({run.link(path)})", ""]
    return "\n".join(["## Decoding explorer", "", *lines]) if lines else ""
