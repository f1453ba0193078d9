"""``Run``: a run directory as report.md sees it, read once, with the small queries every section shares.

Inputs (all inside the run directory, so ``lmcycle report RUN_DIR`` can regenerate the page at any time):

- ``config.yaml`` — the resolved recipe (name, description, stages);
- ``metrics.jsonl`` — every logged event: training rows (``step``, ``loss``, ``eval_loss``, ...), eval rows
  (``kind="eval"``) and the runner's ``{"event": "stage_end", "seconds": s}``;
- ``artifacts.json`` — stage name -> ``{key: path}`` in stage order: ``eval`` -> eval.json (with
  ``predictions`` -> predictions.jsonl), ``plot`` -> PNG of an explore stage, ``model`` (and, for LoRA,
  ``adapter``) -> the saved checkpoint of a training stage.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

N_EXAMPLES = 3  # predictions kept per eval stage for the page's examples


@dataclass(frozen=True)
class Eval:
    """A stage's eval.json (``data``, ``None`` when missing or unreadable) and its first predictions."""

    stage: str
    data: dict | None
    examples: list[dict]

    @property
    def missing(self) -> bool:
        return self.data is None

    @property
    def metrics(self) -> dict:
        return (self.data or {}).get("metrics", {})

    @property
    def settings(self) -> dict:
        return (self.data or {}).get("settings", {})


@dataclass(frozen=True)
class Run:
    """What a run directory holds; build it with :meth:`Run.read`."""

    dir: Path
    config: dict
    rows: list[dict]  # metrics.jsonl
    artifacts: dict[str, dict[str, str]]
    finished: frozenset[str]  # the stages artifacts.json records on disk (``artifacts`` may be newer)
    evals: dict[str, Eval]  # every stage with an ``eval`` artifact, in stage order

    @classmethod
    def read(cls, run_dir: str | os.PathLike, artifacts: dict[str, dict[str, str]] | None = None) -> Run:
        """Read the run directory; ``artifacts`` (the runner's in-memory ones) replace artifacts.json."""
        run_dir = Path(run_dir)
        recorded = _read_json(run_dir / "artifacts.json")
        artifacts = (recorded or {}) if artifacts is None else artifacts
        evals = {stage: _read_eval(run_dir, stage, produced) for stage, produced in artifacts.items()
                 if "eval" in produced}
        return cls(run_dir, _read_yaml(run_dir / "config.yaml"), read_jsonl(run_dir / "metrics.jsonl"), artifacts,
                   frozenset(recorded or ()), evals)

    def resolve(self, recorded: str) -> Path | None:
        """Where a recorded artifact path is now (:func:`resolve`)."""
        return resolve(self.dir, recorded)

    def short_path(self, recorded: str) -> str:
        """A recorded path as the page prints it: relative to the run directory when it is inside it, else its
        last two components."""
        found = self.resolve(recorded)
        if found is not None:
            try:
                return found.resolve().relative_to(self.dir.resolve()).as_posix()
            except ValueError:
                pass
        return "/".join(Path(recorded).parts[-2:])

    def link(self, path: Path) -> str:
        """A file as report.md links to it: relative to the run directory."""
        try:
            return Path(os.path.relpath(path.resolve(), self.dir.resolve())).as_posix()
        except ValueError:  # another drive on Windows
            return path.resolve().as_posix()

    def stages_of(self, *kinds: str) -> dict[str, str]:
        """Stage name -> kind of every stage of the run whose type is one of ``kinds``, in recipe order."""
        found = {s.get("name") or s.get("type"): s.get("type") for s in self.config.get("stages") or []
                 if s.get("type") in kinds}
        for r in self.rows:  # a config.yaml without stages still has the runner's stage_end rows
            if r.get("event") == "stage_end" and r.get("type") in kinds:
                found.setdefault(str(r.get("stage")), r["type"])
        return found

    def kind_of(self, stage: str) -> str | None:
        """The stage's type, from config.yaml or else its stage_end row; ``None`` when neither records it."""
        kind = next((s.get("type") for s in self.config.get("stages") or []
                     if (s.get("name") or s.get("type")) == stage), None)
        return kind or next((r.get("type") for r in self.rows
                             if r.get("event") == "stage_end" and str(r.get("stage")) == stage), None)

    def last_event(self, stage: str, event: str) -> dict | None:
        """The stage's last logged row of that ``event`` (after a resume a stage logs it again)."""
        return next((r for r in reversed(self.rows) if r.get("stage") == stage and r.get("event") == event), None)

    def eval_json(self, stage: str) -> dict | None:
        """The stage's eval.json, or ``None`` when it has none (or it cannot be read)."""
        found = self.evals.get(stage)
        return found.data if found else None

    def generation_evals(self) -> list[Eval]:
        """The eval.json of every eval stage (and of stages whose kind the run does not record), in stage order:
        the scores of generated text. Other kinds (reward, prune, harness, ...) table their own in their
        sections."""
        return [e for e in self.evals.values() if self.kind_of(e.stage) in (None, "eval")]


def resolve(run_dir: Path, recorded: str) -> Path | None:
    """Find a recorded artifact path: as written, relative to the run directory, or (for a run directory that
    was moved or a path recorded relative to another working directory) by its trailing components."""
    p = Path(recorded)
    candidates = [p] if p.is_absolute() else [run_dir / p, p]
    candidates += [run_dir.joinpath(*p.parts[i:]) for i in range(1, len(p.parts))]
    return next((c for c in candidates if c.exists()), None)


def _read_eval(run_dir: Path, stage: str, produced: dict[str, str]) -> Eval:
    path = resolve(run_dir, produced["eval"])
    data = _read_json(path) if path and path.is_file() else None
    if not isinstance(data, dict):
        return Eval(stage, None, [])
    predictions = resolve(run_dir, produced["predictions"]) if "predictions" in produced else None
    predictions = predictions or path.with_name("predictions.jsonl")
    examples = read_jsonl(predictions)[:N_EXAMPLES] if predictions.exists() else []
    return Eval(stage, data, examples)


def read_jsonl(path: Path) -> list[dict]:
    """The JSON objects of a JSON-lines file, skipping lines that do not parse ([] when it is absent)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a killed run
    return [r for r in rows if isinstance(r, dict)]


def _read_yaml(path: Path) -> dict:
    if not path.exists():
        return {}
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
