"""The run directory and the context every stage receives.

A run directory holds: ``config.yaml`` (the resolved recipe), ``metrics.jsonl`` (one JSON object per logged
event), one sub-directory per stage (checkpoints, saved models, eval outputs), ``report.md`` with PNG plots, and
``DONE`` once every stage finished. A directory without ``DONE`` is an unfinished or failed run; its
``FAILED`` file (when present) holds the one-line error.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmcycle.atomic import atomic_write_text
from lmcycle.data.loaders import STAGE_FORMATS, load_examples
from lmcycle.errors import LmcycleError
from lmcycle.feedback.db import is_postgres
from lmcycle.models.device import resolve_device
from lmcycle.models.load import local_copy
from lmcycle.train.distributed import is_main


@dataclass
class RunContext:
    """What a stage may use: where to write, how to log, and the artifacts of earlier stages.

    ``artifacts`` maps a stage name to what it produced, e.g. ``{"pretrain": {"model": ".../pretrain/model"}}``;
    stages never hard-code another stage's paths, they ask :meth:`model_path` or :meth:`artifact`.
    ``device`` is resolved on creation (``auto`` becomes ``cuda:LOCAL_RANK`` or ``cpu``), so stages read the
    device they run on; every model a stage loads or builds computes attention with ``attn_implementation``.
    """

    run_dir: Path
    seed: int = 0
    device: str = "auto"
    attn_implementation: str = "sdpa"
    recipe_file: str = "<command line>"
    data: dict[str, Any] = field(default_factory=dict)  # name -> lmcycle.data.loaders.DatasetConfig
    artifacts: dict[str, dict[str, str]] = field(default_factory=dict)
    _datasets: dict[str, list] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.run_dir = Path(self.run_dir)
        self.device = str(resolve_device(self.device, file=self.recipe_file))
        self.run_dir.mkdir(parents=True, exist_ok=True)

    def seed_for(self, seed: int | None) -> int:
        """A stage's seed: its own when it sets one, else the recipe's."""
        return self.seed if seed is None else seed

    # -- where to write ---------------------------------------------------------------------------------
    def stage_dir(self, stage_name: str) -> Path:
        d = self.run_dir / stage_name
        d.mkdir(parents=True, exist_ok=True)
        return d

    # -- metrics ----------------------------------------------------------------------------------------
    def log(self, stage: str, **metrics: Any) -> None:
        """Append one event to ``metrics.jsonl`` (flushed at once so a killed run keeps what it logged).

        An ``event="train_start"`` row (a training loop starting after ``step`` steps: 0, or its checkpoint's)
        first drops the stage's rows of later steps, which an interrupted attempt logged and this one logs
        again, so that every step appears once. Under torchrun only rank 0 writes."""
        if not is_main():
            return
        if metrics.get("event") == "train_start":
            self.drop_rows_after(stage, metrics["step"])
        rec = {"stage": stage, "time": round(time.time(), 3), **metrics}
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(rec, ensure_ascii=False, default=_json_default) + "\n")
            f.flush()

    def drop_rows_after(self, stage: str, step: int) -> None:
        """Remove from ``metrics.jsonl`` the rows of ``stage`` whose ``step`` is greater than ``step``."""
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = [line for line in lines if not _after(line, stage, step)]
        if len(kept) < len(lines):
            atomic_write_text(path, "".join(kept))

    def read_metrics(self, stage: str | None = None) -> list[dict]:
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return []
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return [r for r in rows if stage is None or r.get("stage") == stage]

    # -- artifacts of earlier stages -------------------------------------------------------------------
    def add_artifacts(self, stage_name: str, produced: dict[str, str | os.PathLike]) -> None:
        self.artifacts[stage_name] = {k: str(v) for k, v in produced.items()}

    def artifact(self, stage_name: str, key: str) -> str:
        if stage_name not in self.artifacts:
            raise LmcycleError(f"stage '{stage_name}' has not run before this one (earlier stages: "
                               f"{', '.join(self.artifacts) or 'none'})", file=self.recipe_file)
        if key not in self.artifacts[stage_name]:
            raise LmcycleError(f"stage '{stage_name}' produced no '{key}'", file=self.recipe_file)
        return self.artifacts[stage_name][key]

    def model_path(self, ref: str | None) -> str:
        """Resolve a model reference: ``None``/``"latest"`` = the newest model an earlier stage produced,
        an earlier stage's name = that stage's model, anything else = a local path or hub id as given (a Hub id
        with a packaged local copy, such as all-MiniLM-L6-v2's, resolves to that copy)."""
        if ref in (None, "latest"):
            for produced in reversed(list(self.artifacts.values())):
                if "model" in produced and not is_scorer(produced["model"]):
                    return produced["model"]
            raise LmcycleError("no earlier stage produced a language model; set 'model' to a path or hub id",
                               file=self.recipe_file)
        if ref in self.artifacts:
            return self.artifact(ref, "model")
        return local_copy(ref)

    def recipe_path(self, path: str) -> str:
        """A file path a stage field names: relative paths resolve against the recipe's folder, as dataset
        paths do (from the command line, against the working directory)."""
        p = Path(path)
        if p.is_absolute() or not Path(self.recipe_file).is_file():
            return str(p)
        return os.path.normpath(Path(self.recipe_file).parent / p)

    def dataset(self, name: str) -> list:
        """The examples of the recipe's dataset ``name`` (loaded once, then cached)."""
        if name not in self._datasets:
            if name not in self.data:
                raise LmcycleError(f"unknown dataset '{name}' (the recipe's data section has: "
                                   f"{', '.join(self.data) or 'nothing'})", file=self.recipe_file)
            cfg = self.data[name]
            if getattr(cfg, "stage", None) is not None:  # a label database, pairs or a file an earlier stage made
                path = self.artifact(cfg.stage, STAGE_FORMATS[cfg.format])
                # absolute: a run directory given relative to the working directory is not the recipe's
                path = path if is_postgres(path) else os.path.abspath(path)
                cfg = cfg.model_copy(update={"path": path, "stage": None})
            self._datasets.update(load_datasets({name: cfg}, self.recipe_file))
        return self._datasets[name]


def is_scorer(model_dir: str | os.PathLike) -> bool:
    """Whether a saved model scores text rather than generating it (a reward model or a sequence classifier):
    "the latest model" skips those, so a reward or classifier stage never becomes the next stage's policy."""
    path = Path(model_dir)
    if (path / "reward_model.json").is_file():
        return True
    try:
        architectures = json.loads((path / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError):
        return False
    return any(a.endswith("ForSequenceClassification") for a in architectures)


def load_datasets(data: dict[str, Any], recipe_file: str | os.PathLike) -> dict[str, list]:
    """Load (and so validate) each named dataset; relative paths resolve against the recipe's folder. An error
    that names no file is about the dataset's config (a label database that is not there, an unknown project):
    it is told as the recipe's, on the field ``data.<name>.<field>``."""
    base = Path(recipe_file).parent
    loaded = {}
    for name, cfg in data.items():
        try:
            loaded[name] = load_examples(cfg, base_dir=base)
        except LmcycleError as e:
            if e.file is not None:
                raise
            raise LmcycleError(e.message, file=recipe_file, field=f"data.{name}" + (f".{e.field}" if e.field
                                                                                    else "")) from None
    return loaded


def _after(line: str, stage: str, step: int) -> bool:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return False  # a line cut by a kill is left for the readers to skip, as before
    later = isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] > step
    return later and row.get("stage") == stage


def _json_default(o: Any):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    return str(o)
