#!/usr/bin/env bash
# The first run on a GPU machine, in about 10 minutes: the cuda conformance suite for real,
# the device's copy bandwidth, and a Llama-3.1-8B-shaped dummy model (random weights) serving
# 100 requests of 512 tokens in / 256 out in bf16, its decode step against the memory floor.
# Writes gpu_check.json (and the conformance report) in the current folder.
#
#   benchmarks/gpu_check.sh                 # on a machine with the project installed
#   benchmarks/gpu_check.sh --device rocm   # any flag of runtime/crossinfer/commands/gpu_check.py
set -euo pipefail
PY="${PYTHON:-python}"
if ! "$PY" -c "import crossinfer, crossinfer_cuda" 2>/dev/null; then
    echo "install the project first: pip install torch triton && pip install -e . -e backends/triton -e backends/cuda" >&2
    exit 2
fi
exec "$PY" -m crossinfer.commands.gpu_check "$@"
