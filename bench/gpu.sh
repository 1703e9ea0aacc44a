#!/bin/sh
# lmzoo on a CUDA GPU: first the correctness checks (bench/gpu_check.py), then the speed of
# decode, prefill and a LoRA training step against transformers (bench/gpu.py). Both run even
# if the other fails; the exit status is 1 if either did.
# Not in CI. Needs the bench extra and a CUDA build of torch: pip install -e .[bench]
#     bench/gpu.sh [--model DIR|FILE.gguf] [either script's options]   (default: the embedded model)
cd "$(dirname "$0")/.." || exit 1
if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "bench/gpu.sh: no NVIDIA GPU here (nvidia-smi not found)" >&2
    exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
PY=${PYTHON:-.venv/bin/python}
status=0
"$PY" bench/gpu_check.py "$@" || status=1
"$PY" bench/gpu.py "$@" || status=1
exit $status
