"""Datasets from files (JSON Lines, CSV, Parquet), Hugging Face ``datasets``, the named datasets (DialogSum,
GSM8K, the Davidson tweets, XQuAD-en), a label database (``label_db``: :mod:`lmcycle.feedback`) or the built-in
task.

:class:`DatasetConfig` is the recipe's ``data.<name>`` section; :func:`load_examples` turns it into
:class:`~lmcycle.data.examples.Example` objects. Every problem in the data is one
:class:`~lmcycle.errors.LmcycleError` that names the file, the line (1-based; in a CSV the header is line 1, so
the first record is line 2) and the field.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from lmcycle.config import Config
from lmcycle.data.davidson import load_davidson
from lmcycle.data.dialogsum import load_dialogsum
from lmcycle.data.dynahate import load_dynahate
from lmcycle.data.examples import Example
from lmcycle.data.gsm8k import load_gsm8k
from lmcycle.data.preferences import Ranking, load_preference_examples, ranking_examples
from lmcycle.data.records import SourceRecord, check_text, read_records, text_field
from lmcycle.data.red_team import load_cai_prompts, load_hh_red_team
from lmcycle.data.synthetic import synthetic_dialogues, synthetic_preferences
from lmcycle.data.xquad import load_xquad
from lmcycle.errors import LmcycleError
from lmcycle.feedback.db import is_postgres, redact
from lmcycle.feedback.export import rankings_from_snapshot
from lmcycle.feedback.store import DEFAULT_PROJECT, LabelStore

Format = Literal["jsonl", "csv", "parquet", "hf", "dialogsum", "gsm8k", "davidson", "dynahate", "xquad",
                 "hh_rlhf", "pairs", "rankings", "label_db", "cai_prompts", "hh_red_team", "synthetic",
                 "synthetic_preferences"]
# format -> the artifact of an earlier stage it reads: a label database, soft-labelled pairs (ai_feedback), a
# dataset file (critique_revise's revisions)
STAGE_FORMATS = {"label_db": "labels", "pairs": "pairs", "jsonl": "data"}


class DatasetConfig(Config):
    """Where a dataset comes from and which fields hold the input and the reference targets.

    ``path`` is a file, a directory (holding ``<split>.<ext>`` for file formats, the dataset's own files for
    ``dialogsum``, ``gsm8k``, ``davidson`` and ``xquad``, or a ``save_to_disk`` dataset for ``hf``) or, for
    ``hf``, a dataset name on the Hub. Relative paths resolve against the recipe's directory. ``n`` and ``seed``
    only apply to ``synthetic`` and ``synthetic_preferences`` (the built-in dialogues, and preference pairs over
    them: :func:`lmcycle.data.synthetic.synthetic_preferences`) (the Davidson and XQuAD splits use fixed seeds of their own, so that no recipe
    seed can move a test example into training). ``keep_calculator`` only applies to ``gsm8k``: keep the
    ``<<expr=value>>`` annotations in the training target. ``hh_rlhf`` and ``rankings`` are preference pairs
    (a file, or a folder with one ``.jsonl[.gz]``), split ``train``/``test``/``all`` by prompt with 15% of the
    prompts in test (:func:`lmcycle.data.preferences.load_preference_examples`). ``pairs`` are rows
    ``{"prompt", "chosen", "rejected"}`` with an optional soft ``target`` (:func:`lmcycle.data.preferences.load_pairs`):
    a file, split so too, or a folder of ``<split>.jsonl[.gz]`` files; or, with ``stage``, the ``pairs`` artifact
    (a JSON Lines file) of an earlier stage of the run, such as AI feedback. ``cai_prompts`` are the Constitutional AI paper's 66 red-team prompts (its
    ``constitutional_ai`` folder), ``hh_red_team`` the distinct opening human turns of an HH-RLHF file, split
    by turn (:mod:`lmcycle.data.red_team`). ``label_db`` reads the live
    labels of ``project`` (default ``default``) straight from a label database (``path``: a SQLite file or a
    ``postgresql://`` URL) and gives exactly the examples ``rankings`` gives on that project's export.
    """

    format: Format
    path: str | None = None
    split: str = "train"
    input_field: str = "input"
    target_fields: list[str] = Field(default_factory=lambda: ["target"])
    task: str = "default"
    id_field: str | None = None
    limit: int | None = Field(default=None, ge=1)
    n: int = Field(default=200, ge=1)
    seed: int = 0
    keep_calculator: bool = False
    prompt_words: int | None = Field(default=None, ge=1, description="keep only the first N words of each "
                                     "input: continuation prompts, as RealToxicityPrompts cuts texts")
    project: str | None = Field(default=None, description="label_db: the labeling project (default: default)")
    stage: str | None = Field(default=None, description="label_db: an earlier stage of the run whose label "
                              "database (its 'labels' artifact) this reads, instead of a path; pairs: an earlier "
                              "stage whose 'pairs' artifact (a JSON Lines file) this reads; loaded when a stage "
                              "first uses it")

    @model_validator(mode="after")
    def _path_given(self) -> DatasetConfig:
        if self.stage is not None and self.format not in STAGE_FORMATS:
            raise ValueError(f"'stage' only applies to format {' or '.join(map(repr, STAGE_FORMATS))}")
        if self.stage is not None and self.path:
            raise ValueError("give 'path' or 'stage', not both")
        if not self.format.startswith("synthetic") and not self.path and self.stage is None:
            raise ValueError(f"'path' is required for format '{self.format}'")
        if self.keep_calculator and self.format != "gsm8k":
            raise ValueError("'keep_calculator' only applies to format 'gsm8k'")
        if self.project is not None and self.format != "label_db":
            raise ValueError("'project' only applies to format 'label_db'")
        return self


def load_examples(cfg: DatasetConfig, base_dir: Path = Path(".")) -> list[Example]:
    """Load the examples ``cfg`` describes; the first ``cfg.limit`` of them when a limit is set; with
    ``prompt_words``, each input cut to its first words."""
    examples = _load_examples(cfg, base_dir)
    if not examples:
        where = redact(str(_source(cfg, base_dir))) if cfg.path else None
        raise LmcycleError(f"no examples in split '{cfg.split}'", file=where, field="split")
    if cfg.prompt_words:
        examples = [replace(ex, input=" ".join(ex.input.split()[: cfg.prompt_words])) for ex in examples]
    return examples


def _load_examples(cfg: DatasetConfig, base_dir: Path) -> list[Example]:
    if cfg.format.startswith("synthetic"):
        make = synthetic_preferences if cfg.format == "synthetic_preferences" else synthetic_dialogues
        examples = make(min(cfg.n, cfg.limit or cfg.n), cfg.seed)
        return _with_task(examples, cfg.task)
    if cfg.format == "label_db":
        return _with_task(load_label_db(cfg, base_dir)[: cfg.limit], cfg.task)
    path = _resolve(cfg.path, base_dir)
    if cfg.format in NAMED_LOADERS:
        return _with_task(_load_named(cfg, path)[: cfg.limit], cfg.task)
    if cfg.format == "hf" and not Path(path).exists():
        path = cfg.path  # not a local directory: a dataset name on the Hub
    records = read_records(path, cfg.format, cfg.split)[: cfg.limit]
    return [_to_example(rec, cfg) for rec in records]


NAMED_LOADERS = ("dialogsum", "gsm8k", "davidson", "dynahate", "xquad", "hh_rlhf", "pairs", "rankings",
                 "cai_prompts", "hh_red_team")


def _load_named(cfg: DatasetConfig, path: Path) -> list[Example]:
    if cfg.format == "dialogsum":
        return load_dialogsum(path, cfg.split)
    if cfg.format == "gsm8k":
        return load_gsm8k(path, cfg.split, keep_calculator=cfg.keep_calculator)
    if cfg.format == "davidson":
        return load_davidson(path, cfg.split)
    if cfg.format == "dynahate":
        return load_dynahate(path, cfg.split)
    if cfg.format in ("hh_rlhf", "pairs", "rankings"):
        return load_preference_examples(path, cfg.format, cfg.split)
    if cfg.format == "cai_prompts":
        return load_cai_prompts(path)
    if cfg.format == "hh_red_team":
        return load_hh_red_team(path, cfg.split)
    return load_xquad(path, cfg.split)


def load_label_db(cfg: DatasetConfig, base_dir: Path) -> list[Example]:
    """The ``label_db`` examples: :func:`label_db_rankings` made into examples by the very function the
    ``rankings`` format uses (:func:`ranking_examples`)."""
    rankings, where = label_db_rankings(cfg, base_dir)
    return ranking_examples(rankings, cfg.split, where)


def label_db_rankings(cfg: DatasetConfig, base_dir: Path) -> tuple[list[Ranking], str]:
    """``(rankings, where)``: the live labels of a ``label_db`` dataset's project as rankings
    (:func:`lmcycle.feedback.export.rankings_from_snapshot`, the rows ``lmcycle label export`` writes), and the
    database and project as errors name them. A missing database file is an error on ``path``, an unknown
    project one on ``project`` (fields of the dataset's config), a project without labels one on the database."""
    source = str(_source(cfg, base_dir))
    if not is_postgres(source) and not Path(source).is_file():
        raise LmcycleError(f"no label database at {source} (create one with `lmcycle label init --db ...`)",
                           field="path")
    project = cfg.project or DEFAULT_PROJECT
    with LabelStore.open(source) as store:
        rankings, _ = rankings_from_snapshot(store.snapshot(project))
    where = f"{redact(source)} (project {project})"
    if not rankings:
        raise LmcycleError(f"project '{project}' has no labels yet", file=where, field="project")
    return rankings, where


def _source(cfg: DatasetConfig, base_dir: Path) -> str | Path:
    """Where the dataset is read from: a Postgres URL as written, else the path resolved against ``base_dir``."""
    if cfg.format == "label_db" and is_postgres(cfg.path or ""):
        return cfg.path
    path = cfg.path or ""
    return _resolve(path.removeprefix("sqlite:///") if cfg.format == "label_db" else path, base_dir)


def _to_example(rec: SourceRecord, cfg: DatasetConfig) -> Example:
    text = text_field(rec, cfg.input_field)
    targets: list[str] = []
    for name in cfg.target_fields:
        value = rec.data.get(name)
        # A field holding a list of strings (several references in one column) is allowed.
        if isinstance(value, list) and value:
            targets.extend(check_text(v, rec, name) for v in value)
        else:
            targets.append(text_field(rec, name))
    ex_id = _example_id(rec, cfg.id_field)
    used = {cfg.input_field, *cfg.target_fields, cfg.id_field}
    meta = {k: v for k, v in rec.data.items() if k not in used}
    return Example(input=text, targets=targets, task=cfg.task, id=ex_id, meta=meta)


def _example_id(rec: SourceRecord, id_field: str | None) -> str:
    if id_field is None:
        # Unique across files, so a few-shot pool from one file never mistakes a query from another for itself.
        return f"{Path(rec.file).name}:{rec.line if rec.line is not None else rec.index + 1}"
    if id_field not in rec.data:
        raise LmcycleError(f"{rec.where()}missing field", file=rec.file, line=rec.line, field=id_field)
    value = rec.data[id_field]
    if isinstance(value, bool) or not isinstance(value, str | int) or str(value).strip() == "":
        raise LmcycleError(f"{rec.where()}expected a non-empty string or an integer id, got {value!r:.40}",
                           file=rec.file, line=rec.line, field=id_field)
    return str(value)


def _with_task(examples: list[Example], task: str) -> list[Example]:
    """Keep each loader's own task name unless the recipe set one."""
    if task != "default":
        for ex in examples:
            ex.task = task
    return examples


def _resolve(path: str | None, base_dir: Path) -> Path:
    p = Path(path or "").expanduser()
    return p if p.is_absolute() else Path(base_dir) / p


