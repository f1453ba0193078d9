"""The stage registry: every kind of recipe stage, listed once.

A kind ``k`` lives in ``lmcycle.stages.k`` and that module has three names: ``<K>Stage`` (its typed config; ``critique_revise``: ``CritiqueReviseStage``),
``run_<k>(cfg, ctx) -> artifacts`` and ``section(run) -> str`` (its part of report.md, ``""`` when the run has
no such stage). The recipe runner, the single-stage commands of the CLI and the report page all read this
table, so a new kind is one line here (and one in ``PAGE_ORDER`` for its section) and one file beside it.
Modules are imported when first used, so that ``lmcycle --help`` does not pay for torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from lmcycle.report.page import Section, chapter, training


@dataclass(frozen=True)
class Kind:
    name: str  # the recipe's `type:`
    command: str | None = None  # its single-stage command (`lmcycle <command> key=value ...`), if it has one
    # Under torchrun it runs on every rank (it trains: every rank takes its share of each batch, and only rank 0
    # writes); other kinds run on rank 0 alone.
    data_parallel: bool = False

    @property
    def module_name(self) -> str:
        return f"{__name__}.{self.name}"

    def module(self) -> ModuleType:
        return importlib.import_module(self.module_name)

    @property
    def config_class(self):
        return getattr(self.module(), "".join(part.capitalize() for part in self.name.split("_")) + "Stage")

    @property
    def runner(self):
        return getattr(self.module(), f"run_{self.name}")

    @property
    def section(self):
        return getattr(self.module(), "section", None)


# In recipe order of a typical run, which is also the order of the CLI's commands.
KINDS: tuple[Kind, ...] = (
    Kind("build", "build"),
    Kind("pretrain", "pretrain", data_parallel=True),
    Kind("sft", "sft", data_parallel=True),
    Kind("critique_revise"),
    Kind("generate", "generate"),
    Kind("completions", "completions"),
    Kind("labelers"),
    Kind("explore", "explore"),
    Kind("eval", "eval"),
    Kind("ai_feedback"),
    Kind("reward", "rm", data_parallel=True),
    Kind("dpo", "dpo", data_parallel=True),
    Kind("classifier", "classifier", data_parallel=True),
    Kind("ppo", "ppo", data_parallel=True),
    Kind("winrate"),
    Kind("distill", "distill", data_parallel=True),
    Kind("quantize", "quantize"),
    Kind("prune", "prune", data_parallel=True),
    Kind("compare", "compare"),
    Kind("retrieval"),
    Kind("harness"),
    Kind("report"),
)
STAGES: dict[str, Kind] = {k.name: k for k in KINDS}
COMMANDS: dict[str, Kind] = {k.command: k for k in KINDS if k.command}

# report.md from top to bottom, between the page's own header and stage times and its examples and settings. Not
# KINDS order: every eval stage's scores come first. A name is that kind's `section` ("kind.function": another
# part of its module); "training" is the page's own loss curves; (heading, names...) is a chapter: one
# "## heading" over the parts of kinds that read together, left out when none of them has anything.
PAGE_ORDER: tuple[str | tuple[str, ...], ...] = (
    "eval",
    "sft",
    ("Human feedback", "completions", "labelers"),
    ("Constitutional AI", "critique_revise", "ai_feedback", "ai_feedback.versus_rlhf"),
    ("Alignment", "classifier", "reward", "dpo", "reward.preference_curves"),
    "ppo",
    "winrate",
    ("Optimization", "distill", "prune", "quantize", "compare"),
    ("Applications", "retrieval", "harness"),
    "training",
    "explore",
)


def report_sections() -> list[Section]:
    """The parts ``PAGE_ORDER`` names, in its order, for :func:`lmcycle.report.write_report` (which never imports
    the stages: its callers hand these in). Imports the module of every kind named."""
    return [_page_part(entry) for entry in PAGE_ORDER]


def _page_part(entry: str | tuple[str, ...]) -> Section:
    if isinstance(entry, tuple):
        heading, *names = entry
        return chapter(heading, *(_page_part(name) for name in names))
    if entry == "training":
        return training
    kind, _, function = entry.partition(".")
    part = getattr(STAGES[kind].module(), function) if function else STAGES[kind].section
    if part is None:
        raise ValueError(f"PAGE_ORDER names {entry!r}, whose module has no section")
    return part
