#!/usr/bin/env bash
# GPU check, CUDA backend section: build the CUDA extension, run the torch-free kernel test plain and under
# compute-sanitizer (memcheck, racecheck, synccheck, initcheck), the GPU tests, memcheck over a few torch-level
# tests, and a quick timing against cuDNN. Run from the repository root on the GPU machine:
#
#   bash scripts/gpu_check_cuda.sh [OUT_DIR]        (default: $OUT or /tmp/gpu_check)
#
# Environment: ARCH (default 90 = H100/H200) picks sm_XX; SKIP_BUILD=1 reuses an existing build;
# SANITIZE_ALL=1 adds synccheck and initcheck to memcheck and racecheck on the kernel test;
# SANITIZE_TORCH=0 skips compute-sanitizer over the torch tests (the slowest step); TIMING=0 skips timing.
# Expected duration on an H100 with 16 cores: about 5-7 minutes, most of it the build.
# Every step runs even if an earlier one failed; each writes OUT_DIR/cuda/<step>.log, and the end prints a
# summary (also in OUT_DIR/cuda/summary.txt). The exit status is the number of failed steps.
set -u -o pipefail
set -x

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
OUT_DIR=${1:-${OUT:-/tmp/gpu_check}}/cuda
mkdir -p "$OUT_DIR"
ARCH=${ARCH:-90}
ARCH_DOT="${ARCH:0:${#ARCH}-1}.${ARCH: -1}"
PY=${PYTHON:-python}
FAILED=()
SUMMARY=()

# step NAME TIMEOUT_S COMMAND...: runs it with a time limit, logs it, records pass/fail, never exits.
step() {
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS rc
  timeout --kill-after=10 "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
  rc=$?
  tail -n 25 "$OUT_DIR/$name.log"
  if [ "$rc" -eq 0 ]; then
    SUMMARY+=("PASS $name ($((SECONDS - t0)) s)")
  else
    [ "$rc" -eq 124 ] && rc="$rc (timed out after $limit s)"
    SUMMARY+=("FAIL $name rc=$rc ($((SECONDS - t0)) s) -> $OUT_DIR/$name.log")
    FAILED+=("$name")
  fi
  return 0
}

find_tool() {  # find_tool NAME: PATH, then $CUDA_HOME/bin, then /usr/local/cuda*/bin
  command -v "$1" 2>/dev/null && return 0
  for dir in "${CUDA_HOME:-/nonexistent}/bin" /usr/local/cuda/bin /usr/local/cuda-*/bin; do
    [ -x "$dir/$1" ] && { echo "$dir/$1"; return 0; }
  done
  return 1
}

NVCC=$(find_tool nvcc) || NVCC=""
SANITIZER=$(find_tool compute-sanitizer) || SANITIZER=""
if [ -n "$NVCC" ] && [ -z "${CUDA_HOME:-}" ]; then
  export CUDA_HOME=$(dirname "$(dirname "$NVCC")")
fi

step env 60 bash -c "nvidia-smi; echo nvcc=$NVCC; ${NVCC:-true} --version; echo compute-sanitizer=$SANITIZER; \
  $PY -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())'"

# 1. Build the extension (CPU + CUDA). --no-deps: the GPU machine has no network.
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  if [ -z "$NVCC" ]; then
    SUMMARY+=("FAIL build: nvcc not found (PATH, CUDA_HOME, /usr/local/cuda); the CUDA extension cannot be built")
    FAILED+=("build")
  else
    step build 420 env ADVMOE_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH_DOT" MAX_JOBS="${MAX_JOBS:-16}" \
      "$PY" -m pip install --no-build-isolation --no-deps -e .
    if [[ " ${FAILED[*]-} " == *" build "* ]]; then  # pip itself may be the problem: build in place instead
      step build_inplace 420 env ADVMOE_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH_DOT" MAX_JOBS="${MAX_JOBS:-16}" \
        "$PY" setup.py build_ext --inplace
    fi
  fi
fi
step import 60 "$PY" -c "import moe_kernels as m; print(m.available_backends()); \
  assert 'cuda' in m.available_backends(), m.unavailable_reason('cuda')"

# 2. The torch-free kernel test, plain and under compute-sanitizer.
STANDALONE="$OUT_DIR/standalone_test"
if [ -n "$NVCC" ]; then
  step standalone_build 300 "$NVCC" -std=c++17 -O2 -lineinfo -arch=sm_"$ARCH" -o "$STANDALONE" \
    csrc/cuda/standalone_test.cu csrc/cuda/sparse_moe_conv2d_kernel.cu
  step standalone_run 120 "$STANDALONE"
  if [ -n "$SANITIZER" ]; then
    tools="memcheck racecheck"
    [ "${SANITIZE_ALL:-0}" = 1 ] && tools="$tools synccheck initcheck"
    for tool in $tools; do
      extra=()
      [ "$tool" = memcheck ] && extra=(--leak-check full)
      step "sanitize_$tool" 240 "$SANITIZER" --tool "$tool" --error-exitcode 1 ${extra[@]+"${extra[@]}"} \
        "$STANDALONE" --quick
    done
  else
    SUMMARY+=("FAIL sanitizer: compute-sanitizer not found next to nvcc or on PATH")
    FAILED+=("sanitizer")
  fi
fi

# 3. GPU tests of the backend (the nvcc compile checks of tests/test_cuda_compile.py already run in CI).
step pytest_cuda 360 "$PY" -m pytest -q tests/test_cuda_backend.py

# 4. memcheck over torch-level calls of the extension (cuDNN included, so only a few cases).
if [ -n "$SANITIZER" ] && [ "${SANITIZE_TORCH:-1}" = 1 ]; then
  step sanitize_torch_memcheck 300 "$SANITIZER" --tool memcheck --error-exitcode 1 \
    "$PY" -m pytest -q -x tests/test_cuda_backend.py \
    -k "(matches_reference and fp32 and (basic or empty_expert or k2_of_4 or batch0)) or bad_index or duplicate"
fi

# 5. Timing against cuDNN's slim conv (the ideal) and the masked conv.
if [ "${TIMING:-1}" = 1 ]; then
  step timing 300 "$PY" scripts/cuda_op_timing.py --batch 256 --out "$OUT_DIR/timing.json"
fi

set +x
{
  echo "== CUDA backend GPU check: $((${#SUMMARY[@]} - ${#FAILED[@]})) passed, ${#FAILED[@]} failed =="
  printf '%s\n' "${SUMMARY[@]}"
} | tee "$OUT_DIR/summary.txt"
exit "${#FAILED[@]}"
