"""Load test of ``lmcycle serve`` on loopback: dynamic batching on vs off, in one run.

    python benchmarks/serve_load.py                              # llama-1m, 16 clients x 50 requests, 16 new tokens
    python benchmarks/serve_load.py --clients 16 --requests 10   # a quick check

For each setting (``--max-batch 1``: batching off; ``--max-batch N``: on) a fresh server process is started
(``python -m lmcycle.cli serve``, so clients and server do not share a GIL) on a free port; ``--clients``
threads each send ``--requests`` greedy ``/v1/completions`` requests (synthetic-dialogue prompts, round robin)
through the official ``openai`` client, one after the other. Reported: failed requests, p50/p95 latency,
requests/s and new tokens/s (from the responses' ``usage``), and the throughput ratio on / off.
"""

from __future__ import annotations

import argparse
import os
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


def load(model_dir: Path, prompts: list[str], max_batch: int, args) -> dict:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    server = subprocess.Popen([sys.executable, "-m", "lmcycle.cli", "serve", "--model", str(model_dir),
                               "--port", str(port), "--max-batch", str(max_batch), "--max-queue", "256"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx2.get(url + "/health").status_code == 200:
                    break
            except httpx2.HTTPError:
                time.sleep(0.1)
        latencies: list[float] = []
        tokens, failures = [0], [0]
        lock = threading.Lock()

        def client(c: int) -> None:
            api = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
            for r in range(args.requests):
                t0 = time.perf_counter()
                try:
                    out = api.completions.create(model="model", prompt=prompts[(c * args.requests + r) % len(prompts)],
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
    return {"max_batch": max_batch, "failed": failures[0], "ok": len(latencies), "p50_s": statistics.median(latencies),
            "p95_s": q[18], "req_per_s": len(latencies) / wall, "tok_per_s": tokens[0] / wall, "wall_s": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="1m")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=50)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--max-batch", type=int, default=16)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, prompts = build(Path(tmp), args.size)
        rows = [load(model_dir, prompts, 1, args), load(model_dir, prompts, args.max_batch, args)]
    print(f"llama-{args.size}, {args.clients} clients x {args.requests} requests, {args.new_tokens} new tokens, "
          f"greedy, CPU threads: torch default")
    print("| max_batch | ok | failed | p50 s | p95 s | req/s | new tok/s |\n|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['max_batch']} | {r['ok']} | {r['failed']} | {r['p50_s']:.3f} | {r['p95_s']:.3f} | "
              f"{r['req_per_s']:.1f} | {r['tok_per_s']:.0f} |")
    print(f"throughput ratio batching on / off: {rows[1]['req_per_s'] / rows[0]['req_per_s']:.2f}x")


if __name__ == "__main__":
    main()
