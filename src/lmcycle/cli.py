"""Command line: ``lmcycle run RECIPE.yaml [key=value ...]`` and one command per stage.

Single-stage commands take the stage's fields as ``key=value`` (values are YAML: ``corpus=[train]``,
``decoding.top_p=0.9``), datasets from ``--recipe FILE`` (its data section, seed and device) and/or
``--data NAME=PATH[@SPLIT]``, and write a run directory like a recipe does.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from lmcycle.errors import LmcycleError
from lmcycle.stages import COMMANDS
from lmcycle.terminal import printable

APP_COMMANDS = ("rag", "agent", "pal", "harness")  # lmcycle.apps.commands


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
        s.add_argument("--recipe", help="take datasets, seed and device from this recipe")
        s.add_argument("--data", action="append", default=[], metavar="NAME=PATH[@SPLIT]",
                       help="a dataset by file or folder (format from the suffix; a DialogSum folder works)")
        s.add_argument("--seed", type=int)
        s.add_argument("--out", help="run directory (default runs/<stage>-<time>)")
    rep = sub.add_parser("report", help="(re)write report.md of a run directory")
    rep.add_argument("run_dir")
    rep.add_argument("--title")
    _add_adapters_parser(sub)
    _add_plan_parser(sub)
    _add_serve_parser(sub)
    from lmcycle.apps.commands import add_parsers

    add_parsers(sub)
    return p


def _add_serve_parser(sub) -> None:
    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server for a model and its LoRA adapters")
    sv.add_argument("--model", required=True, help="base model folder")
    sv.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                    help="a LoRA adapter (PEFT folder) served as model NAME; repeat for more")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $LMCYCLE_API_KEY, else none)")
    sv.add_argument("--device", default="cpu")
    sv.add_argument("--max-batch", type=int, default=8, help="most sequences decoded together")
    sv.add_argument("--max-queue", type=int, default=256,
                    help="waiting sequences (prompts x n) before answering 429")
    sv.add_argument("--max-request-tokens", type=int, default=65_536,
                    help="most prompts x n x max_tokens in one request (400 beyond)")
    sv.add_argument("--timeout", type=float, default=300.0, help="seconds per request before a 503")


def _serve(args) -> int:
    import os

    try:
        import uvicorn

        from lmcycle.serve.app import create_app, uvicorn_options
    except ImportError as e:
        raise LmcycleError(f"lmcycle serve needs the serve extra ({e.name} is missing): "
                           "pip install 'lmcycle[serve]'") from None

    adapters = {}
    for item in args.adapter:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise LmcycleError(f"--adapter takes NAME=DIR, got '{item}'", field="adapter")
        if name in adapters:
            raise LmcycleError(f"adapter name '{name}' is given twice", field="adapter")
        adapters[name] = path
    app = create_app(args.model, adapters, api_key=args.api_key or os.environ.get("LMCYCLE_API_KEY") or None,
                     device=args.device, max_batch=args.max_batch, max_queue=args.max_queue,
                     request_timeout_s=args.timeout, max_request_tokens=args.max_request_tokens)
    uvicorn.run(app, host=args.host, port=args.port, **uvicorn_options())
    return 0


def _add_adapters_parser(sub) -> None:
    ad = sub.add_parser("adapters", help="list, merge or export PEFT-format adapters (LoRA, QLoRA, soft prompts)")
    act = ad.add_subparsers(dest="action", required=True)
    ls = act.add_parser("list", help="every adapter under a run directory, stage folder or adapter folder")
    ls.add_argument("path")
    mg = act.add_parser("merge", help="merge a LoRA/QLoRA adapter into its full-precision base; save the model")
    mg.add_argument("adapter", help="adapter folder")
    mg.add_argument("--base", help="base model (default: the adapter's base_model_name_or_path)")
    mg.add_argument("--out", required=True, help="folder for the merged model (save_pretrained)")
    ex = act.add_parser("export", help="copy an adapter to a standalone folder with a model card")
    ex.add_argument("adapter", help="adapter folder")
    ex.add_argument("--out", required=True)
    ex.add_argument("--base-model-name", help="record this base (e.g. its Hub id) instead of the local path")


def _adapters(args) -> int:
    from lmcycle.adapt import adapters

    if args.action == "list":
        found = adapters.find_adapters(args.path)
        if not found:
            raise LmcycleError("no adapter folder (adapter_config.json) here", file=args.path)
        print(adapters.format_adapter_table([adapters.describe_adapter(p) for p in found]))
    elif args.action == "merge":
        print(f"merged model: {adapters.merge_adapter(args.adapter, args.out, base=args.base)}")
    else:
        print(f"exported adapter: {adapters.export_adapter(args.adapter, args.out, args.base_model_name)}")
    return 0


def _add_plan_parser(sub) -> None:
    pl = sub.add_parser("plan", help="memory (full FT / LoRA / QLoRA / prompt tuning) and compute-optimal budget")
    pl.add_argument("model", nargs="?", help="a local model folder or its config.json (only the config is read)")
    pl.add_argument("--arch", choices=("llama", "gpt2", "t5"), help="with --size: one of lmcycle's built-in sizes")
    pl.add_argument("--size", help="a named size of lmcycle build (100k, 1m, 10m)")
    pl.add_argument("--params", help="a parameter count (7e9, 7B, 125M): a llama-like shape of that size")
    pl.add_argument("--vocab", type=int, help="vocabulary for --size (default 2048) or --params (default 32000)")
    pl.add_argument("--seq-len", type=int, default=512)
    pl.add_argument("--batch", type=int, default=8, help="sequences per micro-batch")
    pl.add_argument("--precision", choices=("fp32", "bf16", "int8", "nf4"), default="fp32",
                    help="weights (and the frozen base of LoRA / prompt tuning)")
    pl.add_argument("--lora-r", type=int, default=8)
    pl.add_argument("--lora-targets", help="comma-separated module names or regex suffixes (default: q/v)")
    pl.add_argument("--virtual-tokens", type=int, default=20, help="prompt tuning's soft prompt length")
    pl.add_argument("--tokens-per-s", type=float, help="training throughput, for the time of the token budget")
    pl.add_argument("--flops-per-s", type=float, help="sustained FLOP/s, the alternative to --tokens-per-s")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")
    pl.set_defaults(fields=[])  # main() files stray key=value items here; _plan rejects them


def _plan(args) -> int:
    from lmcycle.train.plan import make_plan, render, resolve_config

    stray = args.fields + ([args.model] if args.model and "=" in args.model and not Path(args.model).exists() else [])
    if stray:
        raise LmcycleError(f"unexpected arguments: {' '.join(stray)}", file="command line")
    config, name = resolve_config(args.model, args.arch, args.size, args.params, args.vocab)
    targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()] if args.lora_targets else None
    plan = make_plan(config, seq_len=args.seq_len, batch=args.batch, precision=args.precision, lora_r=args.lora_r,
                     lora_targets=targets, virtual_tokens=args.virtual_tokens, tokens_per_s=args.tokens_per_s,
                     flops_per_s=args.flops_per_s, name=name)
    print(json.dumps(plan.to_dict(), indent=2, ensure_ascii=False) if args.json else render(plan))
    return 0


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
    from lmcycle.config import apply_overrides, load_yaml

    recipe: dict = {"name": args.command, "data": {}}
    recipe_file = "command line"
    if args.recipe:
        loaded, _ = load_yaml(args.recipe)
        recipe.update({k: loaded[k] for k in ("seed", "device", "data") if k in loaded})
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
    parser = _parser()
    # key=value items may come after options (`run r.yaml --out d a.b=1`): argparse leaves those over.
    args, extra = parser.parse_known_args(argv)
    stray = [x for x in extra if x.startswith("-") or "=" not in x]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        if args.command in ("report", "adapters", "serve", *APP_COMMANDS):
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
        return _plan(args)
    from lmcycle.stages.recipe import Recipe, load_recipe, run_recipe
    from lmcycle.train.distributed import init_distributed, is_main

    init_distributed()  # a no-op unless started by torchrun
    _quiet_transformers()

    if args.command == "adapters":
        return _adapters(args)
    if args.command == "serve":
        return _serve(args)
    if args.command in APP_COMMANDS:
        from lmcycle.apps.commands import dispatch

        return dispatch(args)
    if args.command == "report":
        from lmcycle.report import write_report
        from lmcycle.stages import report_sections

        if not (Path(args.run_dir) / "metrics.jsonl").exists():
            raise LmcycleError("not a run directory (no metrics.jsonl)", file=args.run_dir)
        print(write_report(Path(args.run_dir), title=args.title, sections=report_sections()))
        return 0

    if args.command == "run":
        recipe, stages = load_recipe(args.recipe, args.overrides)
        recipe_file = args.recipe
    else:
        from lmcycle.config import validate

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
    from transformers.utils import logging as hf_logging

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


if __name__ == "__main__":
    sys.exit(main())
