"""Load test of ``lmcycle serve`` on loopback: batching off vs on, mixed adapters, and the peer, in one run.

    python benchmarks/serve_load.py                              # llama-1m, 16 clients x 50 requests, 16 new tokens
    python benchmarks/serve_load.py --clients 16 --requests 10   # a quick check
    python benchmarks/serve_load.py --no-peer                    # without transformers serve

Each row starts a fresh server process on a free port (so clients and server do not share a GIL); ``--clients``
threads each send ``--requests`` greedy ``/v1/completions`` requests (synthetic-dialogue prompts, round robin)
through the official ``openai`` client, one after the other, after one untimed warm-up request per model. Rows:

- ``lmcycle serve --max-batch 1`` (batching off) and ``--max-batch N`` (dynamic batching on);
- the same with ``--adapters`` LoRA adapters (r=8, random) loaded, each client asking for the base or one of them
  in turn, so most batches mix adapters (one forward pass per step for all of them);
- the peer: Hugging Face ``transformers serve`` on the same checkpoint, plain and ``--continuous-batching``.

Reported: failed requests, p50/p95 latency, requests/s and new tokens/s (from the responses' ``usage``), and the
throughput ratios (new tokens/s, since the peer may stop at EOS differently).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx2
import openai
from measure import cpu_name, load_average, version


def build(workdir: Path, size: str) -> tuple[Path, list[str]]:
    """A built llama of ``size`` with a tokenizer trained on synthetic dialogues, and prompts from them."""
    from lmcycle.data.synthetic import synthetic_dialogues
    from lmcycle.models.build import build_model, train_tokenizer

    exs = synthetic_dialogues(200, 0)
    tokenizer = train_tokenizer([t for ex in exs for t in (ex.input, *ex.targets)], 2048, seq2seq=False,
                                max_len=256)
    model = build_model("llama", size, tokenizer, 256, seed=0)
    model.save_pretrained(workdir / "model")
    tokenizer.save_pretrained(workdir / "model")
    return workdir / "model", [ex.input[:300] for ex in exs]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def adapters(model_dir: Path, workdir: Path, count: int) -> list[str]:
    """``count`` LoRA adapters (r=8 on q/v, random B so they change the outputs) saved in PEFT format."""
    import torch

    from lmcycle.adapt.lora import LoraConfig, add_lora, lora_layers, save_lora
    from lmcycle.models.load import load_pretrained

    options = []
    for i in range(count):
        model, _ = load_pretrained(str(model_dir))
        add_lora(model, LoraConfig(r=8))
        torch.manual_seed(i)
        with torch.no_grad():
            for layer in lora_layers(model).values():
                layer.lora_B["default"].weight.normal_(0, 0.5)
        save_lora(model, "default", workdir / f"ad{i}", base_model_name_or_path=str(model_dir))
        options += ["--adapter", f"ad{i}={workdir / f'ad{i}'}"]
    return options


def wait_ready(url: str, server: subprocess.Popen) -> None:
    for _ in range(1200):
        if server.poll() is not None:
            raise RuntimeError(f"server exited with {server.returncode}")
        try:
            httpx2.get(url + "/health", timeout=5)
            return  # any answer: the server is listening
        except httpx2.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError("server did not start")


def load(label: str, command: list[str], models: list[str], prompts: list[str], args) -> dict:
    """Start ``command`` + ``--port N``, run the clients against it (client c asks for ``models[c % len]``)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen([*command, "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, server)
        warm = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
        for model in models:  # untimed: the peer's continuous batching sets itself up on the first request (~25 s)
            warm.completions.create(model=model, prompt=prompts[0], max_tokens=args.new_tokens, temperature=0)
        latencies: list[float] = []
        tokens, failures = [0], [0]
        lock = threading.Lock()

        def client(c: int) -> None:
            api = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
            for r in range(args.requests):
                t0 = time.perf_counter()
                try:
                    out = api.completions.create(model=models[c % len(models)], prompt=prompts[(c * args.requests + r) % len(prompts)],
                                                 max_tokens=args.new_tokens, temperature=0)
                except openai.OpenAIError:
                    with lock:
                        failures[0] += 1
                    continue
                with lock:
                    latencies.append(time.perf_counter() - t0)
                    tokens[0] += out.usage.completion_tokens

        threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    finally:
        server.terminate()
        server.wait(timeout=30)
    q = statistics.quantiles(latencies, n=20) if len(latencies) > 1 else [float("nan")] * 19
    return {"label": label, "failed": failures[0], "ok": len(latencies), "p50_s": statistics.median(latencies),
            "p95_s": q[18], "req_per_s": len(latencies) / wall, "tok_per_s": tokens[0] / wall, "wall_s": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="1m")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=50)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--adapters", type=int, default=3, help="LoRA adapters in the mixed-adapter row (0: no row)")
    p.add_argument("--no-peer", action="store_true", help="skip transformers serve")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, prompts = build(Path(tmp), args.size)
        ours = [sys.executable, "-m", "lmcycle.cli", "serve", "--model", str(model_dir), "--max-queue", "256"]
        rows = [load("lmcycle serve, batching off (--max-batch 1)", [*ours, "--max-batch", "1"], ["model"],
                     prompts, args),
                load(f"lmcycle serve, --max-batch {args.max_batch}", [*ours, "--max-batch", str(args.max_batch)],
                     ["model"], prompts, args)]
        if args.adapters:
            options = adapters(model_dir, Path(tmp), args.adapters)
            rows.append(load(f"lmcycle serve, --max-batch {args.max_batch}, base + {args.adapters} LoRA adapters "
                             "mixed", [*ours, "--max-batch", str(args.max_batch), *options],
                             ["model", *(f"ad{i}" for i in range(args.adapters))], prompts, args))
        if not args.no_peer:
            peer = [shutil.which("transformers") or "transformers", "serve", str(model_dir), "--device", "cpu",
                    "--host", "127.0.0.1"]
            rows += [load("transformers serve", peer, [str(model_dir)], prompts, args),
                     load("transformers serve --continuous-batching", [*peer, "--continuous-batching"],
                          [str(model_dir)], prompts, args)]
    print(f"llama-{args.size}, {args.clients} clients x {args.requests} requests, {args.new_tokens} new tokens, "
          f"greedy; {cpu_name()}; torch {version('torch')}, transformers {version('transformers')}, "
          f"fastapi {version('fastapi')}, uvicorn {version('uvicorn')}; CPU threads: torch default; "
          f"1-min load average at the end: {load_average():.2f}")
    print("| server | ok | failed | p50 s | p95 s | req/s | new tok/s | tok/s vs off |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['label']} | {r['ok']} | {r['failed']} | {r['p50_s']:.3f} | {r['p95_s']:.3f} | "
              f"{r['req_per_s']:.1f} | {r['tok_per_s']:.0f} | {r['tok_per_s'] / rows[0]['tok_per_s']:.2f} |")
    print(f"throughput ratio batching on / off: {rows[1]['tok_per_s'] / rows[0]['tok_per_s']:.2f}x (new tokens/s)")
    if not args.no_peer:
        best_peer = max(rows[-2:], key=lambda r: r["tok_per_s"])
        print(f"lmcycle serve (batching on) / best transformers serve: "
              f"{rows[1]['tok_per_s'] / best_peer['tok_per_s']:.2f}x (new tokens/s)")


if __name__ == "__main__":
    main()
