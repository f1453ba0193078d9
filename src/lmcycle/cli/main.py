"""Command line: ``lmcycle run RECIPE.yaml [key=value ...]`` and one command per stage.

Single-stage commands take the stage's fields as ``key=value`` (values are YAML: ``corpus=[train]``,
``decoding.top_p=0.9``), datasets from ``--recipe FILE`` (its data section, seed, device and
attn_implementation) and/or ``--data NAME=PATH[@SPLIT]``, and write a run directory like a recipe does.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from lmcycle.cli import adapters, apps, label, plan, serve
from lmcycle.errors import LmcycleError
from lmcycle.stages import COMMANDS
from lmcycle.terminal import printable


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmcycle", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a recipe's stages in order")
    run.add_argument("recipe", help="recipe YAML file")
    run.add_argument("overrides", nargs="*", help="key=value overrides, e.g. stages.1.train.max_steps=50")
    run.add_argument("--out", help="run directory (default runs/<recipe>-<time>)")
    for command, kind in COMMANDS.items():
        s = sub.add_parser(command, help=f"run a single '{kind.name}' stage")
        s.add_argument("fields", nargs="*", help="the stage's fields as key=value")
        s.add_argument("--recipe", help="take datasets, seed, device and attn_implementation from this recipe")
        s.add_argument("--data", action="append", default=[], metavar="NAME=PATH[@SPLIT]",
                       help="a dataset by file or folder (format from the suffix; a DialogSum folder works)")
        s.add_argument("--seed", type=int)
        s.add_argument("--out", help="run directory (default runs/<stage>-<time>)")
    rep = sub.add_parser("report", help="(re)write report.md of a run directory")
    rep.add_argument("run_dir")
    rep.add_argument("--title")
    adapters.add_parser(sub)
    plan.add_parser(sub)
    serve.add_parser(sub)
    apps.add_parsers(sub)
    label.add_parser(sub)
    return p


def dataset_from_arg(arg: str) -> tuple[str, dict]:
    """``NAME=PATH[@SPLIT]`` -> (name, DatasetConfig fields), the format guessed from the path."""
    if "=" not in arg:
        raise LmcycleError(f"--data '{arg}' must look like NAME=PATH[@SPLIT]", file="command line", field="--data")
    name, path = arg.split("=", 1)
    split = None
    if "@" in path:
        path, split = path.rsplit("@", 1)
    p = Path(path)
    if p.is_dir():
        fmt = "dialogsum" if any(p.glob("dialogsum.*.jsonl*")) else "hf"
    elif path.endswith((".jsonl", ".jsonl.gz")):
        fmt = "jsonl"
    elif path.endswith((".csv", ".csv.gz")):
        fmt = "csv"
    elif path.endswith(".parquet"):
        fmt = "parquet"
    else:
        raise LmcycleError("cannot tell the format from the name (.jsonl[.gz], .csv[.gz], .parquet or a folder);"
                           " use a recipe's data section instead", file=path, field="--data")
    cfg = {"format": fmt, "path": str(p.resolve())}
    if split:
        cfg["split"] = split
    return name, cfg


def _single_stage_recipe(args) -> tuple[dict, str]:
    from lmcycle.config import apply_overrides, load_yaml  # lazy: pydantic doubles `lmcycle --help`

    recipe: dict = {"name": args.command, "data": {}}
    recipe_file = "command line"
    if args.recipe:
        loaded, _ = load_yaml(args.recipe)
        recipe.update({k: loaded[k] for k in ("seed", "device", "attn_implementation", "data") if k in loaded})
        recipe["data"] = dict(recipe.get("data") or {})
        recipe_file = args.recipe
    for item in args.data:
        name, cfg = dataset_from_arg(item)
        recipe["data"][name] = cfg
    if args.seed is not None:
        recipe["seed"] = args.seed
    stage = apply_overrides({"type": COMMANDS[args.command].name}, args.fields)
    recipe["stages"] = [stage]
    return recipe, recipe_file


def main(argv: list[str] | None = None) -> int:
    """Run the command line (``argv``, default ``sys.argv[1:]``); returns the exit code."""
    parser = _parser()
    # key=value items may come after options (`run r.yaml --out d a.b=1`): argparse leaves those over.
    args, extra = parser.parse_known_args(argv)
    stray = [x for x in extra if x.startswith("-") or "=" not in x]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        if args.command in ("report", "adapters", "serve", "label", *apps.COMMANDS):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        getattr(args, "overrides" if args.command == "run" else "fields").extend(extra)
    try:
        return _dispatch(args)
    except LmcycleError as e:
        print(f"lmcycle: error: {printable(str(e))}", file=sys.stderr)  # messages quote file names and values
        return 1
    except KeyboardInterrupt:
        print("lmcycle: interrupted; rerun with the same --out to resume", file=sys.stderr)
        return 130


def _dispatch(args) -> int:
    if args.command == "plan":
        _quiet_transformers()
        return plan.run(args)
    if args.command == "label":
        return label.run(args)  # before the torch imports below: the label database needs none
    from lmcycle.stages.recipe import Recipe, load_recipe, run_recipe  # lazy: torch (the stages' configs)
    from lmcycle.train.distributed import init_distributed, is_main  # lazy: torch

    init_distributed()  # a no-op unless started by torchrun
    _quiet_transformers()

    if args.command == "adapters":
        return adapters.run(args)
    if args.command == "serve":
        return serve.run(args)
    if args.command in apps.COMMANDS:
        return apps.run(args)
    if args.command == "report":
        if not (Path(args.run_dir) / "metrics.jsonl").exists():
            raise LmcycleError("not a run directory (no metrics.jsonl)", file=args.run_dir)
        from lmcycle.stages.report import write_run_report  # lazy: every stage's section, so torch

        print(write_run_report(Path(args.run_dir), title=args.title))
        return 0

    if args.command == "run":
        recipe, stages = load_recipe(args.recipe, args.overrides)
        recipe_file = args.recipe
    else:
        from lmcycle.config import validate  # lazy: pydantic doubles `lmcycle --help`

        raw, recipe_file = _single_stage_recipe(args)
        recipe = validate(Recipe, raw, file=recipe_file)
        stages = recipe.stage_configs(file="command line")
        if args.out is None:
            args.out = str(Path("runs") / f"{args.command}-{time.strftime('%Y%m%d-%H%M%S')}")
    t0 = time.time()
    run_dir = run_recipe(recipe, stages, out=args.out, recipe_file=recipe_file)
    if is_main():
        print(f"run directory: {run_dir}  ({time.time() - t0:.0f}s)")
        _print_outcome(run_dir, args.command)
    return 0


def _quiet_transformers() -> None:
    """Our stages show their own progress; transformers' per-load/per-save bars are noise between them."""
    from transformers.utils import logging as hf_logging  # lazy: transformers

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _print_outcome(run_dir: Path, command: str) -> None:
    artifacts = json.loads((run_dir / "artifacts.json").read_text()) if (run_dir / "artifacts.json").exists() else {}
    if command == "generate":
        for produced in artifacts.values():
            if "generations" in produced:
                for line in Path(produced["generations"]).read_text(encoding="utf-8").splitlines():
                    row = json.loads(line)
                    print(f"--- {row['prompt']!r}\n{printable(row['output'])}")
    for produced in artifacts.values():
        for key in ("model", "eval", "plot"):
            if key in produced:
                print(f"{key}: {produced[key]}")
    if (run_dir / "report.md").exists():
        print(f"report: {run_dir / 'report.md'}")
