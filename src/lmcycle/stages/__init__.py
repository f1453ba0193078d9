"""The stage registry: every kind of recipe stage, listed once.

A kind ``k`` lives in ``lmcycle.stages.k`` and that module has three names: ``<K>Stage`` (its typed config),
``run_<k>(cfg, ctx) -> artifacts`` and ``section(run) -> str`` (its part of report.md, ``""`` when the run has
no such stage). The recipe runner, the single-stage commands of the CLI and the report page all read this
table, so a new kind is one line here and one file beside it. Modules are imported when first used, so that
``lmcycle --help`` does not pay for torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class Kind:
    name: str  # the recipe's `type:`
    command: str | None = None  # its single-stage command (`lmcycle <command> key=value ...`), if it has one
    data_parallel: bool = False  # under torchrun it runs on every rank; other kinds run on rank 0 alone

    @property
    def module_name(self) -> str:
        return f"{__name__}.{self.name}"

    def module(self) -> ModuleType:
        return importlib.import_module(self.module_name)

    @property
    def config_class(self):
        return getattr(self.module(), f"{self.name.capitalize()}Stage")

    @property
    def runner(self):
        return getattr(self.module(), f"run_{self.name}")

    @property
    def section(self):
        return getattr(self.module(), "section", None)


# In recipe order of a typical run, which is also the order of the CLI's commands and the report's sections.
KINDS: tuple[Kind, ...] = (
    Kind("build", "build"),
    Kind("pretrain", "pretrain", data_parallel=True),
    Kind("sft", "sft", data_parallel=True),
    Kind("generate", "generate"),
    Kind("explore", "explore"),
    Kind("eval", "eval"),
    Kind("reward", "rm"),
    Kind("dpo", "dpo"),
    Kind("classifier", "classifier"),
    Kind("ppo", "ppo"),
    Kind("distill", "distill"),
    Kind("quantize", "quantize"),
    Kind("prune", "prune"),
    Kind("compare", "compare"),
    Kind("retrieval"),
    Kind("harness"),
    Kind("report"),
)
STAGES: dict[str, Kind] = {k.name: k for k in KINDS}
COMMANDS: dict[str, Kind] = {k.command: k for k in KINDS if k.command}
