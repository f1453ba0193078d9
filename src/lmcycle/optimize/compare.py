"""Measuring a model as a deployer sees it, each model in a fresh process, and the ratios between models.

:func:`measure` gives one model's row:

- task quality: macro-F1 and accuracy per eval dataset (sequence classifiers), or perplexity (language models);
- size on disk of the weight files, and the parameter count (with the share of zeros, which pruning creates);
- memory: the resident memory the loaded model adds to a fresh process, and the peak while it serves the timed
  batches (batch 1, then batch 32), both minus that process's memory before loading (so the ~400 MB of Python +
  torch is not counted in every row); on a GPU, the memory torch allocates there instead;
- latency at batch 1 (p50 / p95 over real eval texts, one forward pass each) and throughput at batch 32.

:func:`measure_in_child` runs it in its own child process (``python -m lmcycle.optimize.compare SPEC OUT``): peak
memory is then that model's alone, and one variant's ``torch.compile`` or allocator state cannot leak into the
next. :func:`with_ratios` sets every row against the first. The ``compare`` stage
(:mod:`lmcycle.stages.compare`) measures a model and its optimized variants this way, on the same threads.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from lmcycle.config import Config
from lmcycle.data.examples import Example, plain_texts
from lmcycle.errors import LmcycleError
from lmcycle.evals.classification import score_labels

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


class MeasureConfig(Config):
    """How a model is measured: which texts, how many timed passes, which batch, how many threads."""

    label_map: dict[str, str] | None = Field(None, description="classifiers: dataset label -> class name "
                                                               "(default: the dataset's labels as they are)")
    max_len: int = Field(128, ge=8, description="tokens per text, for scoring and timing")
    n_eval: int | None = Field(None, ge=1, description="at most this many examples per eval dataset")
    latency_runs: int = Field(100, ge=5, description="batch-1 forward passes timed (after the warm-up)")
    warmup: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1, description="the throughput batch")
    throughput_batches: int = Field(8, ge=1)
    threads: int | None = Field(None, ge=1, description="torch threads (default: torch's, i.e. the cores)")
    compile: bool = Field(False, description="torch.compile every model before timing (torchao's int8 kernels "
                                             "need it to be fast); the warm-up absorbs the compile")
    score: bool = Field(True, description="score quality (false: size, memory and speed only, e.g. for a second "
                                          "table of the same models compiled)")


def with_ratios(rows: list[dict]) -> list[dict]:
    """Add ``size_ratio``, ``params_ratio``, ``memory_ratio`` (variant / first) and ``speedup_b1``,
    ``speedup_throughput`` (first's latency / variant's; higher is faster) to every row."""
    ref = rows[0]
    for row in rows:
        row["size_ratio"] = _ratio(row.get("size_bytes"), ref.get("size_bytes"))
        row["params_ratio"] = _ratio(row.get("params"), ref.get("params"))
        row["memory_ratio"] = _ratio(row.get("peak_memory_mb"), ref.get("peak_memory_mb"))
        row["speedup_b1"] = _ratio(ref.get("latency_p50_ms"), row.get("latency_p50_ms"))
        row["speedup_throughput"] = _ratio(row.get("throughput"), ref.get("throughput"))
    return rows


def _ratio(a: Any, b: Any) -> float | None:
    return round(a / b, 4) if is_scalar(a) and is_scalar(b) and b else None


def is_scalar(v: Any) -> bool:
    """A number of a row (not a bool, not a nested dict): what gets a ratio, and what a metrics row logs."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# -- the parent: one child process per model ----------------------------------------------------------------------


def measure_in_child(model_path: str, data: dict[str, list[dict]], cfg: MeasureConfig, device: str = "auto"
                     ) -> dict[str, Any]:
    """Run :func:`measure` for one model on ``device`` in a fresh Python process; its JSON result.

    ``cfg`` may be a config that extends :class:`MeasureConfig` (the compare stage's): the child gets its
    measuring settings only."""
    settings = cfg.model_dump(mode="json", include=set(MeasureConfig.model_fields))
    with tempfile.TemporaryDirectory(prefix="lmcycle-compare-") as tmp:
        spec, out = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec.write_text(json.dumps({"model": str(model_path), "data": data, "cfg": settings, "device": str(device)}))
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.run([sys.executable, "-m", "lmcycle.optimize.compare", str(spec), str(out)],
                              env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise LmcycleError(f"measuring this model failed: {tail}", file=str(model_path), field="models")
        return json.loads(out.read_text())


# -- the child: load, score, time -----------------------------------------------------------------------------------


def measure(model_path: str, data: dict[str, list[dict]], cfg: MeasureConfig, prepare=None,
            device: str = "auto") -> dict[str, Any]:
    """Load the model at ``model_path`` on ``device`` (``auto``: CUDA when present, else CPU) and return its
    quality, size, parameters, memory and speed.

    ``data``: ``{dataset: [{"input", "targets", "id"}]}``, of which the first ``cfg.n_eval`` examples of each
    dataset are scored and their inputs timed. ``prepare(model) -> (model, size_bytes)``, when given, transforms
    the loaded model first (the benchmarks use it to apply a peer library's method in the same process); its size
    replaces the folder's. On the CPU memory is the process's resident memory; on CUDA it is the memory torch
    allocates on the GPU (host memory is then not the model's), and timings wait for the GPU's kernels.
    """
    import torch

    from lmcycle.models.device import (  # lazy, like torch (the parent's import)
        describe_device,
        resolve_device,
    )
    from lmcycle.models.load import eval_mode  # lazy, like torch: the stage's parent process never needs them

    target = resolve_device(device)
    data = {name: rows[:cfg.n_eval] for name, rows in data.items()}
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    import_architecture(model_path)
    memory = _memory_meter(target)
    start = time.perf_counter()
    model, tokenizer, kind, classifier = load_for_compare(model_path, target)
    size = weight_bytes(model_path)
    if prepare is not None:
        model, size = prepare(model)
        if classifier is not None:
            classifier.model = model
    load_s = time.perf_counter() - start
    params, zeros = count_parameters(model)
    row: dict[str, Any] = {"kind": kind, "params": params, "zero_params": zeros, "size_bytes": size,
                           "load_s": round(load_s, 2), "loaded_memory_mb": round(memory("now"), 1)}
    with eval_mode(model), torch.inference_mode():
        # Timing first: the peak is then the model serving batch 1 and batch cfg.batch_size, not the scoring.
        forward = timed_forward(kind, model, cfg.compile)
        inputs = [ex["input"] for rows in data.values() for ex in rows]
        row.update(time_latency(forward, tokenizer, inputs, cfg, target))
        row.update(time_throughput(forward, tokenizer, inputs, cfg, target))
        row["peak_memory_mb"] = round(memory("peak"), 1)
        row["quality"] = score_quality(kind, model, tokenizer, classifier, data, cfg) if cfg.score else {}
    row["threads"] = torch.get_num_threads()
    row["device"] = describe_device(target)
    return row


def _memory_meter(device):
    """``memory("now" | "peak")``: MB above what the process held when this was called, of resident memory on
    the CPU, of torch's CUDA allocations on a GPU."""
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)

        def cuda(which: str) -> float:
            used = torch.cuda.max_memory_allocated(device) if which == "peak" else torch.cuda.memory_allocated(device)
            return (used - before) / 2**20

        return cuda
    rss_before = _rss_mb()
    return lambda which: (_peak_rss_mb() if which == "peak" else _rss_mb()) - rss_before


def import_architecture(model_path: str) -> None:
    """Import the model's transformers classes (lazy modules, ~100 MB) so that they are not counted as its memory."""
    import transformers
    from transformers import AutoConfig

    try:
        architectures = AutoConfig.from_pretrained(model_path).architectures or []
    except (OSError, ValueError):
        return
    for name in architectures:
        getattr(transformers, name, None)


def load_for_compare(model_path: str, device: Any = "auto"):
    """``(model, tokenizer, kind, classifier)`` on ``device``: kind is ``classifier``, ``causal_lm`` or
    ``seq2seq``."""
    from transformers import AutoConfig

    from lmcycle.artifacts import load_model  # lazy, with the loaders: torch and transformers
    from lmcycle.models.classifier import TextClassifier  # lazy
    from lmcycle.models.load import is_seq2seq  # lazy

    try:
        architectures = AutoConfig.from_pretrained(model_path).architectures or []
    except (OSError, ValueError):
        architectures = []
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        clf = TextClassifier.load(model_path, device=device)
        return clf.model, clf.tokenizer, "classifier", clf
    model, tokenizer = load_model(model_path, device=device)
    return model, tokenizer, "seq2seq" if is_seq2seq(model) else "causal_lm", None


def count_parameters(model) -> tuple[int, int | None]:
    """(parameters, of which exactly zero). Quantized weights count their logical elements; their zeros are not
    counted (None) because a zero int8 code is not a pruned weight."""
    import torch

    total, zeros, exact = 0, 0, True
    for p in model.parameters():
        total += p.numel()
        if type(p.data) is torch.Tensor and p.dtype.is_floating_point:
            zeros += int((p.data == 0).sum())
        else:
            exact = False
    return total, zeros if exact else None


def weight_bytes(model_path: str) -> int | None:
    """Bytes of the weight files in a model folder (None for a hub id)."""
    folder = Path(model_path)
    if not folder.is_dir():
        return None
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))


def weights_mb(path: str | os.PathLike) -> float:
    """Size in MB of the weight files in a model folder."""
    return (weight_bytes(str(path)) or 0) / 1e6


def score_quality(kind: str, model, tokenizer, classifier, data: dict[str, list[dict]],
                  cfg: MeasureConfig) -> dict[str, float]:
    """``{"<dataset>.macro_f1": .., "<dataset>.accuracy": ..}`` for a classifier, ``{"<dataset>.perplexity"}``
    for a language model (each input and each target is one text, as pre-training saw them)."""
    from lmcycle.evals.perplexity import perplexity, seq2seq_perplexity  # lazy, with the scorers: torch

    quality: dict[str, float] = {}
    for name, rows in data.items():
        if kind == "classifier":
            label_map = cfg.label_map or {}
            gold = [label_map.get(r["targets"][0], r["targets"][0]) for r in rows]
            unknown = sorted(set(gold) - set(classifier.labels))
            if unknown:
                raise LmcycleError(f"dataset '{name}' has labels {unknown} the classifier does not have "
                                   f"({', '.join(classifier.labels)}); set label_map", field="label_map")
            predicted = classifier.predict([r["input"] for r in rows], max_len=cfg.max_len)
            metrics = score_labels(predicted, gold)["metrics"]
            quality.update({f"{name}.{k}": v for k, v in metrics.items() if k in ("macro_f1", "accuracy")})
        elif kind == "seq2seq":
            score = seq2seq_perplexity(model, tokenizer, [r["input"] for r in rows], [r["targets"][0] for r in rows],
                                       max_len=cfg.max_len)
            quality[f"{name}.perplexity"] = score.values["perplexity"]
        else:
            texts = plain_texts(Example(input=r["input"], targets=r["targets"]) for r in rows)
            quality[f"{name}.perplexity"] = perplexity(model, tokenizer, texts, max_len=cfg.max_len).values["perplexity"]
    return quality


def timed_forward(kind: str, model, compile_model: bool):
    """``forward(batch)``: one forward pass of the model as a deployment would run it (logits only), returning
    once the device has computed it."""
    import torch

    from lmcycle.models.device import synchronize  # lazy, like torch

    run = torch.compile(model) if compile_model else model
    device = next(model.parameters()).device

    def forward(batch: dict) -> None:
        if kind == "seq2seq":
            run(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                decoder_input_ids=batch["input_ids"][:, :1])
        elif kind == "causal_lm":
            run(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        else:
            run(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        synchronize(device)  # CUDA returns before its kernels ran; a timer must wait for them

    return forward


def _batch(tokenizer, texts: list[str], max_len: int, device: Any = "cpu") -> dict:
    """Tokenized ``texts`` already on ``device``: the timers time the model, not the copy to the GPU."""
    encoded = tokenizer(texts, truncation=True, max_length=max_len, padding=True, return_tensors="pt")
    return {k: v.to(device) for k, v in encoded.items()}


def time_latency(forward, tokenizer, inputs: list[str], cfg: MeasureConfig, device: Any = "cpu"
                 ) -> dict[str, float]:
    """p50 / p95 / mean milliseconds of one forward pass at batch 1, cycling through ``inputs`` (on ``device``,
    the model's)."""
    batches = [_batch(tokenizer, [inputs[i % len(inputs)]], cfg.max_len, device)
               for i in range(cfg.warmup + cfg.latency_runs)]
    times = []
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        forward(batch)
        if i >= cfg.warmup:
            times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return {"latency_p50_ms": round(statistics.median(times), 3),
            "latency_p95_ms": round(times[min(len(times) - 1, int(0.95 * len(times)))], 3),
            "latency_mean_ms": round(statistics.fmean(times), 3)}


def time_throughput(forward, tokenizer, inputs: list[str], cfg: MeasureConfig, device: Any = "cpu"
                    ) -> dict[str, float]:
    """Examples per second at batch ``cfg.batch_size`` (padded to the batch's longest input), on ``device``."""
    n = cfg.batch_size
    batches = [_batch(tokenizer, [inputs[(b * n + i) % len(inputs)] for i in range(n)], cfg.max_len, device)
               for b in range(cfg.throughput_batches + 1)]
    forward(batches[0])
    start = time.perf_counter()
    for batch in batches[1:]:
        forward(batch)
    seconds = time.perf_counter() - start
    return {"throughput": round(n * cfg.throughput_batches / seconds, 2), "batch_size": n}


def _status_mb(field: str) -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def _rss_mb() -> float:
    return _status_mb("VmRSS")


def _peak_rss_mb() -> float:
    """This process's peak RSS. Not ``getrusage``'s ``ru_maxrss``: Linux carries that over fork and exec, so a
    child of a large parent would report the parent's size; ``VmHWM`` belongs to the child's own memory."""
    return _status_mb("VmHWM")


def _child_main(spec_path: str, out_path: str) -> int:
    import importlib.util

    from transformers.utils import logging as hf_logging

    import lmcycle.artifacts  # noqa: F401  (lazy)

    # Import every library any variant needs before measuring, so that "memory before loading" is the same
    # base for all rows and the table compares the models, not their imports.
    import lmcycle.evals.perplexity  # noqa: F401  (lazy, like torch: only the child process needs them)
    import lmcycle.models.classifier  # noqa: F401  (lazy)

    if importlib.util.find_spec("torchao") is not None:
        import torchao  # noqa: F401
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    spec = json.loads(Path(spec_path).read_text())
    row = measure(spec["model"], spec["data"], MeasureConfig.model_validate(spec["cfg"]),
                  device=spec.get("device", "auto"))
    Path(out_path).write_text(json.dumps(row))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(_child_main(*sys.argv[1:3]))
    except LmcycleError as e:
        print(f"lmcycle: error: {e}", file=sys.stderr)
        sys.exit(1)
