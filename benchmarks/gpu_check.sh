#!/usr/bin/env bash
# The GPU check of issue 16 (scale-out), on one CUDA GPU (sized for one H200: under 8 minutes in all).
#
#   bash benchmarks/gpu_check.sh                  # from anywhere; results as JSON under $OUT (or a temp folder)
#
# Sections, each headed on stdout, each under its own time limit; a failing section does not stop the others,
# and the script exits non-zero when any failed:
#   1. machine: nvidia-smi, torch and its view of the GPU
#   2. the gpu-marked tests:        python -m pytest -m gpu -q tests
#   3. SFT, Llama-3.2-1B shape, LoRA r=16 on 7 projections, bf16 autocast + activation checkpointing, one
#      process: tokens/s and MFU (6N / 989 TFLOP/s)        benchmarks/scale_out.py --device cuda
#   4. PPO episodes/s, 1B-shaped policy (run_ppo, fp32 full FT + frozen reference, tiny CPU reward)
#                                                           benchmarks/ppo_episodes.py --shape 1b
#   5. serving throughput, lmcycle side only (no transformers serve)   benchmarks/serve_load.py --no-peer
#
# lmcycle runs from this checkout (PYTHONPATH=src), not from an installed copy. Python packages the machine
# lacks (serve_load needs fastapi, uvicorn, openai, httpx2) can come as wheels in ./.whl, installed first into
# /tmp/site. Nothing here needs a GPU to be read or parsed: `bash -n benchmarks/gpu_check.sh`.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
ROOT=$PWD
PY=${PYTHON:-python3}
RESULTS=${OUT:-$(mktemp -d /tmp/lmcycle-gpu-check-XXXXXX)}
mkdir -p "$RESULTS"
export PYTHONPATH="$ROOT/src:$ROOT/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
FAILED=()
STARTED=$(date +%s)

section() {
    echo
    echo "=============================================================================================="
    echo "== $*"
    echo "=============================================================================================="
}

# step NAME LIMIT_S COMMAND...: run COMMAND under a time limit, record a failure, never stop the script.
step() {
    local name=$1 limit=$2 t0 rc
    shift 2
    section "$name  (limit ${limit}s)"
    echo "+ $*"
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@"
    rc=$?
    echo "-- $name: exit $rc after $(( $(date +%s) - t0 )) s"
    if [ "$rc" -ne 0 ]; then
        FAILED+=("$name (exit $rc$([ "$rc" -eq 124 ] && echo ', timed out'))")
    fi
    return 0
}

section "machine"
date -u
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || echo "nvidia-smi: not found"
if [ -d "$ROOT/.whl" ] && ls "$ROOT"/.whl/*.whl >/dev/null 2>&1; then
    echo "installing the wheels of .whl into /tmp/site"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$ROOT"/.whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
$PY - <<'EOF'
import importlib, platform
import torch
print(f"Python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuda available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU 0: {p.name}, {p.total_memory / 2**30:.0f} GiB, bf16: {torch.cuda.is_bf16_supported()}")
for name in ("transformers", "peft", "accelerate", "pydantic", "safetensors", "tokenizers", "pytest", "fastapi",
             "uvicorn", "openai", "httpx2"):
    try:
        m = importlib.import_module(name)
        print(f"  {name} {getattr(m, '__version__', '?')}")
    except Exception as e:  # noqa: BLE001
        print(f"  {name}: MISSING ({type(e).__name__})")
EOF
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    FAILED+=("machine (torch sees no CUDA device)")
fi

step "gpu-marked tests: pytest -m gpu" 60 \
    $PY -m pytest -m gpu -q tests -p no:cacheprovider

step "SFT tokens/s + MFU, Llama-3.2-1B shape, LoRA r=16, bf16, 1 GPU" 100 \
    $PY benchmarks/scale_out.py --device cuda --shape 1b --seq-len 2048 --batch 8 --steps 10 \
        --json "$RESULTS/scale_out_gpu.json"

step "PPO episodes/s, 1B-shaped policy (lmcycle run_ppo only)" 200 \
    $PY benchmarks/ppo_episodes.py --shape 1b --rollouts 6 --json "$RESULTS/ppo_episodes_gpu.json"

step "serving throughput, lmcycle serve only (serve_load.py --no-peer)" 90 \
    $PY benchmarks/serve_load.py --no-peer --clients 16 --requests 20

section "summary ($(( $(date +%s) - STARTED )) s in all; JSON in $RESULTS)"
if [ "${#FAILED[@]}" -eq 0 ]; then
    echo "all sections passed"
    exit 0
fi
echo "${#FAILED[@]} section(s) failed:"
printf '  - %s\n' "${FAILED[@]}"
exit 1
