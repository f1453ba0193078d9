"""The applications' commands: ``lmcycle rag ingest|query|delete``, ``lmcycle agent``, ``lmcycle pal`` and
``lmcycle harness gsm8k|truthfulqa|hhh``, each with any backend (``--backend local:PATH`` or
``--backend openai:BASE_URL#MODEL``)."""

from __future__ import annotations

import argparse
import json
import os
import textwrap

from lmcycle.apps.rag.ingest import load_documents
from lmcycle.atomic import atomic_write_json
from lmcycle.errors import LmcycleError
from lmcycle.terminal import printable

COMMANDS = ("rag", "agent", "pal", "harness")


def _backend_options(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--backend", required=required, metavar="SPEC",
                   help="local:PATH_OR_HUB_ID, or openai:BASE_URL#MODEL (e.g. openai:http://127.0.0.1:8000/v1#base)")
    p.add_argument("--api-key", help="for openai: backends (default: $LMCYCLE_API_KEY, then $OPENAI_API_KEY)")
    p.add_argument("--chat", action="store_true", help="openai: backends: use the chat endpoint")
    p.add_argument("--context-window", type=int, default=4096, help="openai: backends: the model's window")
    p.add_argument("--tokenizer", help="openai: backends: a tokenizer (path or hub id) for exact token counts")
    p.add_argument("--max-tokens", type=int, default=256, help="most new tokens per model call")


def add_parsers(sub) -> None:
    """Add the applications' commands to the CLI's subparsers."""
    rag = sub.add_parser("rag", help="retrieval-augmented generation: ingest files into a store, query it")
    act = rag.add_subparsers(dest="action", required=True)
    ing = act.add_parser("ingest", help="chunk, embed and store text / markdown / HTML files (re-ingest replaces)")
    ing.add_argument("paths", nargs="+", help="files or folders")
    ing.add_argument("--store", required=True, help="store folder (created on first use)")
    ing.add_argument("--encoder", default=None, help="HF encoder (default: all-MiniLM-L6-v2)")
    ing.add_argument("--chunk-tokens", type=int, default=254)
    ing.add_argument("--overlap", type=int, default=32)
    dele = act.add_parser("delete", help="remove every chunk of the given source files")
    dele.add_argument("sources", nargs="+")
    dele.add_argument("--store", required=True)
    q = act.add_parser("query", help="retrieve passages; with --backend also answer with checked citations")
    q.add_argument("question")
    q.add_argument("--store", required=True)
    q.add_argument("--k", type=int, default=5)
    q.add_argument("--mode", default="hybrid", choices=["hybrid", "dense", "bm25"])
    q.add_argument("--json", action="store_true", help="print one JSON object")
    _backend_options(q, required=False)

    ag = sub.add_parser("agent", help="a ReAct agent with calculator, sandboxed python and (with --store) search")
    ag.add_argument("question")
    ag.add_argument("--store", help="a RAG store for the search and lookup tools")
    ag.add_argument("--max-steps", type=int, default=8)
    ag.add_argument("--trace", help="write the agent's full trace here (JSON)")
    _backend_options(ag)

    pal = sub.add_parser("pal", help="program-aided answer: the model writes solution(), the sandbox runs it")
    pal.add_argument("question")
    pal.add_argument("--timeout", type=float, default=5.0, help="sandbox wall-clock seconds")
    _backend_options(pal)

    hr = sub.add_parser("harness", help="score a backend on GSM8K, TruthfulQA or the CAI paper's 438 HHH questions")
    hr.add_argument("benchmark", choices=["gsm8k", "truthfulqa", "hhh"])
    hr.add_argument("--data", required=True, help="GSM8K jsonl (or folder) / TruthfulQA mc_task.json (or folder) / "
                    "438HHHEvaluations.jsonl (or the constitutional_ai folder)")
    hr.add_argument("--method", default="cot", help="gsm8k: direct|cot|self_consistency|pal; truthfulqa, hhh: "
                                                    "letter|likelihood")
    hr.add_argument("--limit", type=int, help="the first N questions")
    hr.add_argument("--n", type=int, default=5, help="self-consistency samples")
    hr.add_argument("--out", help="write the result (settings and per-question records) here as JSON")
    _backend_options(hr)


def _say(text: str) -> None:
    """Print text that holds documents, file names or model output: its terminal controls come out escaped."""
    print(printable(text))


def _backend(args):
    from lmcycle.apps.llm import backend_from_spec  # lazy: torch, transformers

    key = args.api_key or os.environ.get("LMCYCLE_API_KEY") or os.environ.get("OPENAI_API_KEY")
    return backend_from_spec(args.backend, api_key=key, chat=args.chat, context_window=args.context_window,
                             tokenizer=args.tokenizer)


def _decoding(args):
    from lmcycle.models.generate import DecodingConfig  # lazy: torch, transformers

    if args.max_tokens < 1:
        raise LmcycleError(f"--max-tokens must be at least 1, got {args.max_tokens}", field="max_tokens")
    return DecodingConfig(max_new_tokens=args.max_tokens)


def run(args) -> int:
    """Run the application command in ``args.command``; returns the exit code."""
    return {"rag": _rag, "agent": _agent, "pal": _pal, "harness": _harness}[args.command](args)


def _rag(args) -> int:
    # lazy: torch, transformers
    from lmcycle.apps.rag.answer import answer_question, open_store, store_settings

    if args.action == "ingest":
        from lmcycle.apps.rag.encoder import DEFAULT_ENCODER, Encoder  # lazy: torch, transformers
        from lmcycle.apps.rag.retrieve import Retriever  # lazy: torch, transformers
        from lmcycle.apps.rag.store import SqliteVectorStore  # lazy: numpy

        settings = store_settings(args.store, args.encoder or DEFAULT_ENCODER, args.chunk_tokens, args.overlap)
        documents = [doc for path in args.paths for doc in load_documents(path)]
        retriever = Retriever(SqliteVectorStore(args.store), Encoder(settings["encoder"]))
        written = retriever.index(documents, max_tokens=args.chunk_tokens, overlap_tokens=args.overlap)
        print(f"{len(documents)} documents, {written} chunks written; the store holds {len(retriever.store)} chunks")
        return 0
    retriever = open_store(args.store)
    if args.action == "delete":
        gone = 0
        for source in args.sources:
            keys = retriever.store.keys_of_source(source)
            retriever.store.delete(keys)
            gone += len(keys)
        print(f"{gone} chunks deleted; the store holds {len(retriever.store)} chunks")
        return 0
    if args.backend is None:
        hits = retriever.retrieve(args.question, args.k, args.mode)
        rows = [{"rank": i, "key": h.key, "score": h.score, "source": h.metadata.get("source"),
                 "text": h.metadata.get("text", "")} for i, h in enumerate(hits, start=1)]
        if args.json:
            _say(json.dumps({"question": args.question, "mode": args.mode, "hits": rows}, ensure_ascii=False))
        else:
            for r in rows:
                # every passage line indented: a line of a document cannot pass for another hit's header
                passage = textwrap.indent(r["text"][:300], "    ", lambda line: True)
                _say(f"[{r['rank']}] {printable(r['key'], layout=False)}  ({r['score']:.4f})\n{passage}")
        return 0
    result = answer_question(_backend(args), retriever, args.question, k=args.k, mode=args.mode, cfg=_decoding(args))
    problems = [{"kind": p.kind, "detail": p.detail} for p in result.citations.problems]
    if args.json:
        _say(json.dumps({"question": args.question, "answer": result.answer,
                          "sources": [{"number": s.number, "key": s.key} for s in result.sources],
                          "citations_ok": result.citations.ok, "problems": problems}, ensure_ascii=False))
    else:
        _say(result.answer)
        print("\nsources:")
        for s in result.sources:
            _say(f"  [{s.number}] {printable(s.key, layout=False)}")
        _say("citations: ok" if result.citations.ok else
             "citations: " + "; ".join(f"{p['kind']}: {p['detail']}" for p in problems))
    return 0


def _agent(args) -> int:
    # lazy: torch, transformers
    from lmcycle.apps.builtin_tools import calculator_tool, lookup_tool, python_tool, search_tool
    from lmcycle.apps.react import run_agent  # lazy: torch, transformers

    tools = [calculator_tool(), python_tool()]
    if args.store:
        from lmcycle.apps.rag.answer import open_store  # lazy: torch, transformers

        retriever = open_store(args.store)
        tools += [search_tool(retriever), lookup_tool(retriever)]
    result = run_agent(_backend(args), args.question, tools, _decoding(args), max_steps=args.max_steps)
    if args.trace:
        result.trace.save(args.trace)
    for step in result.trace.steps[1:]:
        if step["step"] == "action":
            _say(f"[{step['step']} {step['tool']}] {step['input']!r} -> {step['observation'][:200]!r}")
        elif step["step"] == "parse_error":
            _say(f"[unreadable step] {step['error']}")
    why = {"max_steps": f"the step cap of {args.max_steps} was reached",
           "context_window": f"the transcript outgrew the model's context window ({result.steps} steps done)"}
    _say(f"answer: {result.answer}" if result.answer is not None else f"no answer: {why[result.stopped]}")
    return 0


def _pal(args) -> int:
    from lmcycle.apps.pal import answer_with_program  # lazy: torch, transformers
    from lmcycle.apps.sandbox import SandboxConfig, active_layers  # lazy: pydantic (its config), for --help

    result = answer_with_program(_backend(args), args.question, _decoding(args), SandboxConfig(timeout_s=args.timeout))
    _say(result.program or f"(no solution() in the model's output)\n{result.completion}")
    if result.result is not None and not result.result.ok:
        _say(f"sandbox: {result.result.error.kind}: {result.result.error.message}")
    _say(f"answer: {result.answer}\nsandbox layers active: {', '.join(active_layers())}")
    return 0


def _harness(args) -> int:
    from lmcycle.apps.harness import run_benchmark  # lazy: torch, transformers

    llm, cfg = _backend(args), _decoding(args)
    if args.method == "self_consistency":  # sampled paths, as in Wang et al. (T = 0.7)
        cfg = cfg.model_copy(update={"do_sample": True, "temperature": 0.7})
    if args.benchmark in ("truthfulqa", "hhh"):  # a letter is all a reply needs
        cfg = cfg.model_copy(update={"max_new_tokens": 4})
    result = run_benchmark(llm, args.benchmark, args.data, args.method, cfg, limit=args.limit, n=args.n)
    metric = next(iter(result))
    print(f"{metric}: {result[metric]:.2f} (n={result['n']})  settings: {json.dumps(result['settings'])}")
    if args.out:
        atomic_write_json(args.out, result)
        print(f"written: {args.out}")
    return 0
