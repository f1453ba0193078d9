"""Recipes: a YAML list of stages run in order, each reading the artifacts of the ones before it.

```yaml
name: quickstart
seed: 0
data:
  train: {format: synthetic, n: 600, seed: 1}
stages:
  - {type: build, arch: llama, size: 1m, corpus: [train]}
  - {type: pretrain, corpus: [train], train: {max_steps: 200}}
  - {type: eval, name: zero_shot, data: test}
  - {type: report}
```

The whole recipe (every stage's config and every dataset) is validated before the run directory is created, so
a malformed recipe or data file leaves nothing behind. A run directory is complete only once it holds ``DONE``;
running the same recipe into the same ``--out`` again skips the stages that finished and resumes the one that was
interrupted from its last checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationInfo, field_validator

from lmcycle.atomic import atomic_write_json, atomic_write_text
from lmcycle.config import (
    Config,
    Lines,
    apply_overrides,
    dump_config,
    line_for,
    load_yaml,
    references,
    validate,
)
from lmcycle.data.loaders import STAGE_FORMATS, DatasetConfig
from lmcycle.errors import LmcycleError
from lmcycle.models.device import (
    ATTENTION,
    DEVICES,
    check_attn_implementation,
    describe_device,
    resolve_device,
)
from lmcycle.stages import STAGES
from lmcycle.stages.context import RunContext, load_datasets
from lmcycle.stages.report import write_run_report
from lmcycle.train.distributed import barrier, is_main, launch_world_size, world_size
from lmcycle.train.engines import DistributedConfig, check_launch
from lmcycle.train.loop import TrainConfig


def train_configs(cfg: Config, path: tuple = ()) -> list[tuple[TrainConfig, tuple]]:
    """The training loops a stage config holds, each with its path under ``path``: its ``train``, and one a
    section of it holds (prune's ``heal.train``)."""
    found = []
    for name in type(cfg).model_fields:
        value = getattr(cfg, name)
        if isinstance(value, TrainConfig):
            found.append((value, (*path, name)))
        elif isinstance(value, Config):
            found += train_configs(value, (*path, name))
    return found


def check_distributed(cfg: DistributedConfig, device: str, file: str | os.PathLike, lines: Lines,
                      path: tuple) -> None:
    """The engine's settings suit this launch (its ranks, the recipe's device): found when the recipe loads."""
    try:
        check_launch(cfg, resolve_device(device), launch_world_size())
    except LmcycleError as e:
        key = (*path, e.field.removeprefix("distributed."))
        raise LmcycleError(e.message, file=file, line=line_for(key, lines), field=".".join(map(str, key))) from None


class Recipe(Config):
    """A recipe file: datasets by name and the stages to run."""

    name: str
    description: str = ""
    vars: dict[str, str | int | float] = Field(default_factory=dict)
    seed: int = 0
    device: str = Field("auto", description=f"where every stage runs: {DEVICES} (auto: CUDA when torch sees a GPU, "
                                            "else the CPU; under torchrun each process its own GPU)")
    attn_implementation: str = Field("sdpa", description=f"attention of every model loaded or built: "
                                                         f"{', '.join(ATTENTION)}")
    distributed: DistributedConfig = Field(default_factory=DistributedConfig,
                                           description="the engine every training stage uses under torchrun "
                                           "(ddp or fsdp); a stage's own train.distributed overrides it")
    data: dict[str, DatasetConfig] = Field(default_factory=dict)
    stages: list[dict[str, Any]] = Field(min_length=1)

    @field_validator("device")
    @classmethod
    def _device_here(cls, value: str) -> str:
        """A device this machine has, checked when the recipe loads; the value stays as written (config.yaml
        keeps ``auto``; the device it resolved to is logged with every stage)."""
        try:
            resolve_device(value)
        except LmcycleError as e:
            raise ValueError(e.message) from None
        return value

    @field_validator("attn_implementation")
    @classmethod
    def _attention_here(cls, value: str, info: ValidationInfo) -> str:
        device = info.data.get("device")  # absent when the device itself failed
        try:
            check_attn_implementation(value, resolve_device(device) if device else None)
        except LmcycleError as e:
            raise ValueError(e.message) from None
        return value

    def stage_configs(self, file: str | os.PathLike = "<recipe>", lines: Lines | None = None) -> list[Config]:
        """Validate each stage against its own typed config; names default to the type and must be unique."""
        out: list[Config] = []
        seen: set[str] = set()
        for i, raw in enumerate(self.stages):
            kind = raw.get("type")
            line = (lines or {}).get(("stages", i))
            if kind is None:
                raise LmcycleError("stage has no 'type'", file=file, line=line, field=f"stages.{i}.type")
            if kind not in STAGES:
                raise LmcycleError(f"unknown stage type '{kind}' (known: {', '.join(STAGES)})", file=file,
                                   line=(lines or {}).get(("stages", i, "type"), line), field=f"stages.{i}.type")
            cfg = validate(STAGES[kind].config_class, raw, file=file, lines=lines, prefix=("stages", i))
            name = cfg.stage_name
            if name in seen:
                raise LmcycleError(f"two stages are named '{name}'; give one a distinct 'name'", file=file,
                                   line=line, field=f"stages.{i}.name")
            seen.add(name)
            for train, path in train_configs(cfg, ("stages", i)):
                if "distributed" not in train.model_fields_set:
                    train.distributed = self.distributed.model_copy()
                    path = ()  # the recipe's own section
                check_distributed(train.distributed, self.device, file, lines or {}, (*path, "distributed"))
            out.append(cfg)
        self.check_references(out, file, lines or {})
        for i, cfg in enumerate(out):  # what a stage needs of its datasets' formats (e.g. rankings, not pairs)
            if hasattr(cfg, "data_problem") and (problem := cfg.data_problem(self.data)):
                key = ("stages", i, problem[0])
                raise LmcycleError(problem[1], file=file, line=line_for(key, lines or {}),
                                   field=".".join(map(str, key)))
        self.check_model_dtypes(out, file, lines or {})
        return out

    def check_model_dtypes(self, stages: list[Config], file: str | os.PathLike, lines: Lines) -> None:
        """Every stage's ``model_dtype`` runs on the recipe's device (bfloat16 on a GPU without it, float16 where
        matmuls lack it) and suits what the stage trains: found before any stage loads a model."""
        if all(getattr(cfg, "model_dtype", "float32") == "float32" for cfg in stages):
            return  # nothing to probe: a float32 recipe never touches torch here
        from lmcycle.stages.common import dtype_problem_of  # lazy: torch, only for a recipe that sets a dtype

        for i, cfg in enumerate(stages):
            problem = dtype_problem_of(cfg, self.device)
            if problem:
                key = ("stages", i, "model_dtype")
                raise LmcycleError(problem, file=file, line=line_for(key, lines), field=".".join(map(str, key)))

    def check_references(self, stages: list[Config], file: str | os.PathLike, lines: Lines) -> None:
        """Every dataset a stage names is in the ``data`` section (and made by an earlier stage when it is a
        stage's labels), every stage it names is an earlier one, and every model it names is not a misspelt or
        later stage: a typo found here costs nothing, found at run time it costs the stages before it."""
        names = [cfg.stage_name for cfg in stages]
        for i, cfg in enumerate(stages):
            for kind, path, value in references(cfg):
                if kind == "dataset":
                    problem = _dataset_problem(value, list(self.data))
                    if problem is None and self.data[value].stage is not None:
                        problem = _stage_problem(self.data[value].stage, names[:i], names[i:],
                                                 what=f"dataset '{value}' reads the "
                                                 f"{STAGE_FORMATS.get(self.data[value].format, 'labels')} of stage")
                elif kind == "stage":
                    problem = _stage_problem(value, names[:i], names[i:])
                else:
                    problem = _model_problem(value, earlier=names[:i], later=names[i:])
                if problem:
                    key = ("stages", i, *path)
                    raise LmcycleError(problem, file=file, line=line_for(key, lines), field=".".join(map(str, key)))


def _dataset_problem(name: str, datasets: list[str]) -> str | None:
    if name in datasets:
        return None
    return (f"unknown dataset '{name}'{_did_you_mean(_closest(name, datasets))} (the recipe's data section has: "
            f"{', '.join(datasets) or 'nothing'})")


def _stage_problem(ref: str, earlier: list[str], later: list[str], what: str = "stage") -> str | None:
    if ref in earlier:
        return None
    if ref in later:
        which = "this stage itself" if ref == later[0] else "a later stage"
        return f"{what} '{ref}', which is {which}; it must be an earlier stage (earlier: {', '.join(earlier) or 'none'})"
    return (f"{what} '{ref}', but no earlier stage has that name{_did_you_mean(_closest(ref, earlier))} "
            f"(earlier stages: {', '.join(earlier) or 'none'})")


def _model_problem(ref: str, earlier: list[str], later: list[str]) -> str | None:
    """Why ``ref`` cannot be the model it means, or None. A name that is no stage but within two edits of
    one is taken for a typo rather than a Hub id (Hub ids without an organisation, like ``gpt2``, are few; the
    message says to write ``org/name``)."""
    if ref == "latest" or ref in earlier or Path(ref).exists():
        return None
    if ref in later:
        which = "is this stage itself" if ref == later[0] else "runs after this one"
        return (f"stage '{ref}' {which}; a model must come from an earlier stage (earlier stages: "
                f"{', '.join(earlier) or 'none'})")
    if "/" in ref or os.sep in ref:
        return None  # a path or an org/name Hub id
    close = _closest(ref, ["latest", *earlier, *later])
    if close is None:
        return None
    return (f"no earlier stage is named '{ref}'{_did_you_mean(close)} (earlier stages: "
            f"{', '.join(earlier) or 'none'}; a Hub id: write it as org/name)")


def _closest(word: str, candidates: list[str]) -> str | None:
    """The candidate fewest edits away from ``word`` if it is at most two away (a typo), else None."""
    best = min(candidates, key=lambda c: _edits(word, c), default=None)
    return best if best is not None and _edits(word, best) <= 2 else None


def _did_you_mean(match: str | None) -> str:
    return f"; did you mean '{match}'?" if match else ""


def _edits(a: str, b: str) -> int:
    """Levenshtein distance: insertions, deletions and substitutions that turn ``a`` into ``b``."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> tuple[Recipe, list[Config]]:
    """Read, override and validate a recipe file and all its stages."""
    data, lines = load_yaml(path)
    apply_overrides(data, [_absolute_path_override(o) for o in overrides or []])
    data = substitute_vars(data, data.get("vars") or {}, path, lines)
    recipe = validate(Recipe, data, file=path, lines=lines)
    return recipe, recipe.stage_configs(path, lines)


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def substitute_vars(node: Any, variables: dict, file, lines: Lines, path: tuple = ()) -> Any:
    """Replace ``${name}`` in every string with the recipe's ``vars`` (a string that is exactly one variable
    takes the variable's type)."""
    if isinstance(node, dict):
        return {k: (v if path == () and k == "vars" else substitute_vars(v, variables, file, lines, (*path, k)))
                for k, v in node.items()}
    if isinstance(node, list):
        return [substitute_vars(v, variables, file, lines, (*path, i)) for i, v in enumerate(node)]
    if not isinstance(node, str) or "${" not in node:
        return node
    for name in _VAR.findall(node):
        if name not in variables:
            raise LmcycleError(f"unknown variable '${{{name}}}' (vars: {', '.join(variables) or 'none'})",
                               file=file, line=lines.get(path), field=".".join(map(str, path)))
    whole = _VAR.fullmatch(node)
    if whole:
        return variables[whole.group(1)]
    return _VAR.sub(lambda m: str(variables[m.group(1)]), node)


def _absolute_path_override(item: str) -> str:
    """A path given on the command line is relative to the current directory, not to the recipe's folder."""
    key, sep, value = item.partition("=")
    if sep and key.rsplit(".", 1)[-1].endswith(("path", "_dir", "dir")) and value and not os.path.isabs(value):
        if not value.startswith(("${", "[", "{")) and "://" not in value:  # a URL (label_db's Postgres) stays
            return f"{key}={os.path.abspath(value)}"
    return item


def default_run_dir(recipe_name: str) -> Path:
    return Path("runs") / f"{recipe_name}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_recipe(recipe: Recipe, stages: list[Config], out: str | os.PathLike | None = None,
               recipe_file: str | os.PathLike = "<recipe>", echo=print) -> Path:
    """Run every stage in order into the run directory; return the directory.

    Datasets are loaded (and validated) before the directory is created. A stage that already finished in this
    directory (listed in ``artifacts.json``) is skipped; training stages resume from their checkpoints.
    """
    if not is_main():
        echo = _quiet
    datasets = load_datasets({k: d for k, d in recipe.data.items() if d.stage is None}, recipe_file)

    if world_size() > 1 and out is None:
        raise LmcycleError("under torchrun give --out, so that every process writes to the same run directory",
                           file=recipe_file)
    run_dir = Path(out) if out else default_run_dir(recipe.name)
    if (run_dir / "DONE").exists():
        raise LmcycleError("this run directory already holds a finished run; choose another --out",
                           file=run_dir)
    ctx = RunContext(run_dir=run_dir, seed=recipe.seed, device=recipe.device,
                     attn_implementation=recipe.attn_implementation, recipe_file=str(recipe_file),
                     data=dict(recipe.data), _datasets=datasets)
    artifacts_file = run_dir / "artifacts.json"
    if artifacts_file.exists():
        ctx.artifacts = json.loads(artifacts_file.read_text())
    barrier()  # every rank has read the artifacts of an earlier attempt before rank 0 writes anything
    if is_main():
        (run_dir / "FAILED").unlink(missing_ok=True)
        atomic_write_text(run_dir / "config.yaml", dump_config(recipe_with_stages(recipe, stages)))

    has_report = any(getattr(s, "type", None) == "report" for s in stages)
    try:
        for i, cfg in enumerate(stages):
            name = cfg.stage_name
            if name in ctx.artifacts:
                echo(f"[{i + 1}/{len(stages)}] {name}: done earlier, skipped")
                continue
            echo(f"[{i + 1}/{len(stages)}] {name} ({cfg.type})")
            start = time.time()
            ctx.log(name, event="stage_start", type=cfg.type, device=describe_device(ctx.device))
            # Under torchrun the training stages run on every rank (data parallel); the others on rank 0 alone.
            kind = STAGES[cfg.type]
            if is_main() or kind.data_parallel:
                produced = kind.runner(cfg, ctx) or {}
                ctx.add_artifacts(name, produced)
                if is_main():
                    atomic_write_json(artifacts_file, ctx.artifacts)
            barrier()
            if not is_main():
                ctx.artifacts = json.loads(artifacts_file.read_text())
            seconds = time.time() - start
            ctx.log(name, event="stage_end", type=cfg.type, seconds=round(seconds, 2))
            echo(f"      {name} finished in {seconds:.1f}s")
        if not has_report and is_main():
            write_run_report(run_dir)
    except BaseException as e:
        if is_main():
            msg = str(e) if isinstance(e, LmcycleError) else f"{type(e).__name__}: {e}"
            atomic_write_text(run_dir / "FAILED", msg + "\n")
        raise
    if is_main():
        atomic_write_text(run_dir / "DONE", time.strftime("%Y-%m-%d %H:%M:%S") + "\n")
    return run_dir


def _quiet(*_args, **_kwargs) -> None:
    pass


def recipe_with_stages(recipe: Recipe, stages: list[Config]) -> Recipe:
    """The recipe with every stage's defaults filled in (what the run directory records)."""
    resolved = recipe.model_copy()
    object.__setattr__(resolved, "stages", [s.model_dump(mode="json") for s in stages])
    return resolved
