"""``lmcycle adapters list|merge|export``: PEFT-format adapters (LoRA, QLoRA, soft prompts) on disk."""

from __future__ import annotations

from lmcycle.errors import LmcycleError


def add_parser(sub) -> None:
    """Add the ``adapters`` command and its actions to the CLI's subparsers."""
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


def run(args) -> int:
    """List, merge or export, and print what was found or written."""
    from lmcycle.adapt import adapters  # lazy: torch
    from lmcycle.artifacts import merge_adapter  # lazy: torch and transformers

    if args.action == "list":
        found = adapters.find_adapters(args.path)
        if not found:
            raise LmcycleError("no adapter folder (adapter_config.json) here", file=args.path)
        print(adapters.format_adapter_table([adapters.describe_adapter(p) for p in found]))
    elif args.action == "merge":
        print(f"merged model: {merge_adapter(args.adapter, args.out, base=args.base)}")
    else:
        print(f"exported adapter: {adapters.export_adapter(args.adapter, args.out, args.base_model_name)}")
    return 0
