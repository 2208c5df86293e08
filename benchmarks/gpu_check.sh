#!/usr/bin/env bash
# The GPU check: one call on an H200 machine (torch 2.11 cu130, triton 3.6, Python 3.12, pytest,
# pytest-benchmark, timm, torchvision 0.26; no network), within about 9 minutes, from a fresh copy
# of the repository with nothing installed:
#   1. environment   what is there (GPU, versions, nvcc, compute-sanitizer)
#   2. build         the extension, compiled on first use, with its CUDA kernel (sm_90 only)
#   3. gpu-tests     pytest tests -m gpu (the Triton kernel compiles one config per case there)
#   4. memcheck      compute-sanitizer memcheck on benchmarks/cuda_sanitizer_calls.py
#   5. racecheck     compute-sanitizer racecheck on the same calls
#   6. benchmarks    the GPU subset of the benchmarks (profile "quick"), results into <outdir>
#   7. other-tests   the rest of tests, if time is left
# Every step runs under `timeout` and logs to <outdir>/log.txt; the script keeps going past a
# failing step and exits nonzero at the end if any step failed. GPU_CHECK_STEPS (a space-separated
# list of step names) reruns only those steps (the build always runs: it is cached).
#
# usage: benchmarks/gpu_check.sh <outdir> [--cpu-dry-run]
#   --cpu-dry-run   without a GPU, still run the parts a CPU can (build, test collection, the CPU
#                   benchmarks' quick profile) instead of stopping
# environment: PYTHON (default python3), GPU_CHECK_BUDGET_S (default 540: the whole script),
#              GPU_CHECK_OTHER_TESTS=0 to leave out step 7, GPU_CHECK_STEPS as above.
set -u

usage() { echo "usage: $0 <outdir> [--cpu-dry-run]" >&2; exit 2; }
[ $# -ge 1 ] || usage
out=$1
dry_run=0
if [ $# -ge 2 ]; then
    [ "$2" = "--cpu-dry-run" ] || usage
    dry_run=1
fi

repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out" || exit 2
# Per-step logs stay outside <outdir>: the device tool brings back at most 8 files, and log.txt
# already holds every step's output.
steps=$(mktemp -d)
out=$(cd "$out" && pwd)
log=$out/log.txt
: > "$log"
cd "$repo" || exit 2

export PYTHONPATH=$repo${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
PY=${PYTHON:-$(command -v python3 || command -v python)}
start=$(date +%s)
deadline=$((start + ${GPU_CHECK_BUDGET_S:-540}))
failed=0
summary=()

say() { echo "$*" | tee -a "$log"; }

# run_step NAME CAP_S RESERVE_S COMMAND...: runs COMMAND under timeout, for at most CAP_S and
# never into the last RESERVE_S seconds of the budget (kept for the steps after it).
run_step() {
    local name=$1 cap=$2 reserve=$3
    shift 3
    local now limit rc t0 t1 status
    if [ -n "${GPU_CHECK_STEPS:-}" ] && [ "$name" != build ] && ! [[ " $GPU_CHECK_STEPS " == *" $name "* ]]; then
        say "[$name] skipped: not in GPU_CHECK_STEPS"
        summary+=("$name: skipped (GPU_CHECK_STEPS)")
        return
    fi
    now=$(date +%s)
    limit=$((deadline - now - reserve))
    [ "$limit" -gt "$cap" ] && limit=$cap
    if [ "$limit" -lt 20 ]; then
        say "[$name] FAILED: not started, out of time (${limit}s left for it)"
        summary+=("$name: FAILED (out of time)")
        failed=1
        return
    fi
    say "[$name] running (timeout ${limit}s)"
    t0=$(date +%s)
    { echo "===== [$name] $*"; } >> "$log"
    timeout -k 10 "$limit" "$@" > "$steps/$name.log" 2>&1
    rc=$?
    t1=$(date +%s)
    cat "$steps/$name.log" >> "$log"
    if [ $rc -eq 0 ]; then
        status="ok"
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        status="FAILED (timed out after ${limit}s)"
        failed=1
    else
        status="FAILED (exit $rc)"
        failed=1
    fi
    say "[$name] $status in $((t1 - t0))s"
    if [ "$status" != "ok" ]; then
        tail -n 25 "$steps/$name.log" | sed "s/^/    [$name] /"
    fi
    summary+=("$name: $status, $((t1 - t0))s")
}

skip_step() {
    say "[$1] skipped: $2"
    summary+=("$1: skipped ($2)")
}

# --- 0. is there a GPU? ------------------------------------------------------------------------
if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >> "$log" 2>&1; then
    gpu=1
    say "GPU check: $("$PY" -c "import torch; print(torch.cuda.get_device_name(0))" 2>>"$log") — results into $out"
else
    gpu=0
    say "GPU check: no CUDA device visible (or torch does not import; see $log)."
    if [ $dry_run -eq 0 ]; then
        say "Nothing to check without a GPU; --cpu-dry-run runs the CPU-runnable parts."
        exit 1
    fi
    say "Dry run on CPU: build, test collection and the CPU benchmarks' quick profile; no sanitizers."
fi

sanitizer=$(command -v compute-sanitizer || true)
[ -z "$sanitizer" ] && [ -x /usr/local/cuda/bin/compute-sanitizer ] && sanitizer=/usr/local/cuda/bin/compute-sanitizer

# --- 1. environment ----------------------------------------------------------------------------
run_step environment 60 0 bash -c '
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || echo "no nvidia-smi"
    "$1" -c "import sys, torch; print(\"python\", sys.version.split()[0], \"torch\", torch.__version__, \"cuda\", torch.version.cuda)"
    "$1" -c "import triton; print(\"triton\", triton.__version__)" || echo "triton: not importable"
    "$1" -c "import pytest_benchmark; print(\"pytest-benchmark\", pytest_benchmark.__version__)"
    echo "nvcc: $(command -v nvcc || ls /usr/local/cuda/bin/nvcc 2>/dev/null || echo none)"
    echo "compute-sanitizer: ${2:-none}"
    echo "CPU cores: $(nproc)"' environment "$PY" "$sanitizer"

# --- 2. build ----------------------------------------------------------------------------------
# Compiled on first use (torch.utils.cpp_extension + ninja) from the source list setup.py uses, for
# the H200's sm_90 alone; on a GPU machine the CUDA kernel must be in it.
run_step build 300 200 env TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="$(nproc)" \
    XCEPTION_FAST_BUILD_CUDA=1 "$PY" -c '
import os, sys, time, torch
from xception_fast import _extension
start = time.monotonic()
loaded = _extension.load(require_cuda=torch.cuda.is_available())
cuda = _extension.has_cuda_kernel()
print(f"extension: {loaded} | CUDA kernel: {cuda} | {time.monotonic() - start:.0f} s")
skip = os.environ.get("XCEPTION_FAST_SKIP_CUDA", "0") not in ("", "0")
if torch.cuda.is_available() and not cuda and not skip:
    sys.exit("a GPU is present but the extension has no CUDA kernel (no nvcc / CUDA toolkit found?)")
'

# --- 3. GPU tests ------------------------------------------------------------------------------
# Exit 5 (nothing collected) fails the step too: a GPU check that ran no GPU test checked nothing.
run_step gpu-tests 180 250 env TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
    "$PY" -m pytest tests -m gpu -q -p no:cacheprovider --maxfail=10

# --- 4, 5. compute-sanitizer -------------------------------------------------------------------
if [ $gpu -eq 0 ]; then
    skip_step memcheck "no GPU"
    skip_step racecheck "no GPU"
elif [ -z "$sanitizer" ]; then
    skip_step memcheck "compute-sanitizer not on PATH nor in /usr/local/cuda/bin"
    skip_step racecheck "compute-sanitizer not on PATH nor in /usr/local/cuda/bin"
else
    # Without the caching allocator every tensor is its own allocation, so memcheck sees an access
    # past a tensor's end instead of into the cached block around it.
    run_step memcheck 90 190 env TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
        "$sanitizer" --tool memcheck \
        --error-exitcode 1 --target-processes all "$PY" benchmarks/cuda_sanitizer_calls.py
    run_step racecheck 90 170 env TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
        "$sanitizer" --tool racecheck --error-exitcode 1 --target-processes all \
        "$PY" benchmarks/cuda_sanitizer_calls.py
fi

# --- 6. benchmarks -----------------------------------------------------------------------------
# The results (markdown, JSON, PNG named by device) are rewritten after every benchmark, so a
# timeout still leaves what was measured.
bench_device=cuda
[ $gpu -eq 0 ] && bench_device=cpu
run_step benchmarks 300 0 env TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" XCEPTION_FAST_BENCH_PROFILE=quick \
    XCEPTION_FAST_BENCH_DEVICE=$bench_device \
    XCEPTION_FAST_BENCH_DIR="$out" "$PY" -m pytest benchmarks --benchmark-only -q -p no:cacheprovider

# --- 7. the other tests, with what time is left ------------------------------------------------
left=$((deadline - $(date +%s)))
if [ "${GPU_CHECK_OTHER_TESTS:-1}" = "0" ]; then
    skip_step other-tests "GPU_CHECK_OTHER_TESTS=0"
elif [ $left -lt 90 ]; then
    skip_step other-tests "only ${left}s of the budget left"
else
    run_step other-tests "$left" 0 "$PY" -m pytest tests -m "not gpu" -x -q -p no:cacheprovider
fi

# --- summary -----------------------------------------------------------------------------------
say ""
say "===== GPU check summary ($(( $(date +%s) - start ))s; log: $log)"
for line in "${summary[@]}"; do say "  $line"; done
for md in "$out"/*.md; do
    [ -e "$md" ] && cat "$md" | tee -a "$log"
done
if [ $failed -ne 0 ]; then
    say "GPU check: FAILED (see the steps above)"
    exit 1
fi
say "GPU check: all steps passed"
