#!/usr/bin/env bash
# Installs lmeye_fast and its test/benchmark tools into the current Python,
# building the CUDA extension against the torch that is already there.
# A machine without torch gets torch==2.14.1 (its CUDA 13 build runs on the CPU too).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install -q "torch==2.14.1"
fi
"$PY" -m pip install -q "setuptools>=64" wheel ninja
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
    export CUDA_HOME=/usr/local/cuda
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
"$PY" -m pip install -q -e ".[dev]" --no-build-isolation
"$PY" -m lmeye_fast.info
