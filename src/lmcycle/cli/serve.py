"""``lmcycle serve``: the OpenAI-compatible HTTP server for a model and its LoRA adapters."""

from __future__ import annotations

import os

from lmcycle.errors import LmcycleError


def add_parser(sub) -> None:
    """Add the ``serve`` command to the CLI's subparsers."""
    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server for a model and its LoRA adapters")
    sv.add_argument("--model", required=True, help="base model folder")
    sv.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                    help="a LoRA adapter (PEFT folder) served as model NAME; repeat for more")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $LMCYCLE_API_KEY, else none)")
    sv.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N")
    sv.add_argument("--attn-implementation", default="sdpa", metavar="NAME",
                    help="sdpa (default), eager or flash_attention_2 (needs the flash_attn package and CUDA)")
    sv.add_argument("--max-batch", type=int, default=8, help="most sequences decoded together")
    sv.add_argument("--max-queue", type=int, default=256,
                    help="waiting sequences (prompts x n) before answering 429")
    sv.add_argument("--max-request-tokens", type=int, default=65_536,
                    help="most prompts x n x max_tokens in one request (400 beyond)")
    sv.add_argument("--timeout", type=float, default=300.0, help="seconds per request before a 503")


def run(args) -> int:
    """Serve until interrupted."""
    try:
        import uvicorn  # lazy: an optional extra, and it loads starlette

        from lmcycle.serve.app import create_app, uvicorn_options  # lazy: torch, transformers, fastapi
    except ImportError as e:
        raise LmcycleError(f"lmcycle serve needs the serve extra ({e.name} is missing): "
                           "pip install 'lmcycle[serve]'") from None
    from lmcycle.models.device import check_attn_implementation, resolve_device  # lazy: torch

    device = resolve_device(args.device, field="--device")
    check_attn_implementation(args.attn_implementation, device, field="--attn-implementation")

    adapters = {}
    for item in args.adapter:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise LmcycleError(f"--adapter takes NAME=DIR, got '{item}'", field="adapter")
        if name in adapters:
            raise LmcycleError(f"adapter name '{name}' is given twice", field="adapter")
        adapters[name] = path
    app = create_app(args.model, adapters, api_key=args.api_key or os.environ.get("LMCYCLE_API_KEY") or None,
                     device=device, attn_implementation=args.attn_implementation, max_batch=args.max_batch,
                     max_queue=args.max_queue, request_timeout_s=args.timeout,
                     max_request_tokens=args.max_request_tokens)
    uvicorn.run(app, host=args.host, port=args.port, **uvicorn_options())
    return 0
