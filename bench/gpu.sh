#!/bin/sh
# lmzoo vs transformers on a CUDA GPU (decode, prefill, a LoRA training step); see bench/gpu.py.
# Not in CI. Needs the bench extra and a CUDA build of torch: pip install -e .[bench]
set -e
cd "$(dirname "$0")/.."
if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "bench/gpu.sh: no NVIDIA GPU here (nvidia-smi not found)" >&2
    exit 1
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
PY=${PYTHON:-.venv/bin/python}
exec "$PY" bench/gpu.py "$@"
