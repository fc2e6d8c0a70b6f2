#!/usr/bin/env bash
# The GPU machine's check, within about 8 minutes: build lmeye_fast against the torch
# installed there, run the tests that need a GPU, the benchmarks (gpu shape set) and the
# compute-sanitizer script, then print the benchmark summary last. Every step runs under
# `timeout` inside one overall deadline, so a hang costs its step, not the machine.
# Results (summary JSON, speedup PNG, logs) land in benchmarks/out/gpu_check/, and are
# copied to $OUT when it is set.
#
#   bash scripts/gpu_check.sh            # GPU_CHECK_SECONDS=470 by default
set -uo pipefail
cd "$(dirname "$0")/.."

export CUDA_HOME=/usr/local/cuda
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
# H100 and H200 are sm_90: building one architecture halves the compile time.
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
PY="${PYTHON:-$(command -v python || command -v python3)}"
DIR=benchmarks/out/gpu_check
mkdir -p "$DIR"
DEADLINE=$((SECONDS + ${GPU_CHECK_SECONDS:-470}))
STEPS=()

# step NAME LIMIT RESERVE CMD...: run CMD for at most LIMIT seconds, and never into the
# RESERVE seconds that the later steps need before the deadline.
step() {
    local name=$1 limit=$2 reserve=$3
    shift 3
    local left=$((DEADLINE - SECONDS - reserve))
    if ((left < limit)); then limit=$left; fi
    if ((limit < 5)); then
        echo "== $name: skipped, the ${GPU_CHECK_SECONDS:-470} s deadline is near"
        STEPS+=("$name: skipped (deadline)")
        return 0
    fi
    echo "== $name (at most ${limit} s): $*"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$DIR/$name.log"
    local rc=${PIPESTATUS[0]}
    local verdict="rc=$rc"
    if ((rc == 124 || rc == 137)); then verdict="timed out after ${limit} s"; fi
    echo "== $name: $verdict in $((SECONDS - start)) s"
    STEPS+=("$name: $verdict in $((SECONDS - start)) s")
}

step build 170 260 "$PY" -m pip install --no-index --no-deps --no-build-isolation -e .
step info 20 250 "$PY" -m lmeye_fast.info
# First the tests that only a GPU can run: bf16 and the 7B shape through the whole layer
# (both attention schedules), the CUDA extension, opcheck on real triton_ops and inductor.
step gpu-tests 150 230 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_triton_gpu.py tests/test_cuda_gpu.py \
    tests/test_triton_compile.py tests/test_write_safety.py
# The benchmark budget leaves room for the case in flight, the sanitizer and the summary after it.
BENCH_LIMIT=200
BENCH_LEFT=$((DEADLINE - SECONDS - 70))
if ((BENCH_LEFT < BENCH_LIMIT)); then BENCH_LIMIT=$BENCH_LEFT; fi
BENCH_BUDGET=$((BENCH_LIMIT - 50 > 10 ? BENCH_LIMIT - 50 : 10))
step benchmarks "$BENCH_LIMIT" 70 "$PY" -m pytest benchmarks/ --benchmark-only -q -rs -p no:cacheprovider \
    --shape-set gpu --bench-budget "$BENCH_BUDGET" --bench-summary "$DIR/summary.json" \
    --benchmark-json "$DIR/pytest-benchmark.json"
if [ -f scripts/sanitize.sh ]; then
    step sanitize 60 20 bash scripts/sanitize.sh
fi
# Last, in the time left: the parity suites the CPU interpreter already runs in fp32/fp16, here on
# the GPU's compiled kernels and in bf16 (each odd shape compiles its own kernel specialisation,
# so this is the slow part).
step gpu-tests-wide 300 15 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_triton_ops.py \
    tests/test_triton_layer.py tests/test_layers.py
echo
echo "== steps"
printf '   %s\n' "${STEPS[@]}"
echo
# Last: the plot, and the summary table printed from the JSON (also after an interrupted run).
if [ -f "$DIR/summary.json" ]; then
    timeout 60 "$PY" benchmarks/plot.py "$DIR/summary.json" -o "$DIR/speedup.png" --table 2>&1 | tee "$DIR/summary.txt"
else
    echo "== no benchmark summary was written (see $DIR/benchmarks.log)"
fi
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    cp -r "$DIR"/. "$OUT"/
fi
