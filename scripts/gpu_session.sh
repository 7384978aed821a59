#!/usr/bin/env bash
# Every GPU check of the project in ONE call on a lent GPU machine (torch with CUDA, nvcc and
# compute-sanitizer installed; no network), inside a fixed time budget:
#   build the extensions (CPU + CUDA) | torch-free CUDA kernel test, plain and under compute-sanitizer
#   memcheck/racecheck | GPU tests (pytest -m cuda) | memcheck over torch-level CUDA and Triton calls |
#   op benchmark at B=256 (bf16, fp32, fp16) | model benchmark (ResNet-18) on the compiled backends.
# Usage, from the repository root:  BUDGET_S=480 bash scripts/gpu_session.sh OUT_DIR
# Steps never stop the script; each logs to OUT_DIR/logs/<step>.log; results go to OUT_DIR/results/;
# OUT_DIR/summary.txt lists PASS/FAIL/SKIP per step. Steps are skipped when the budget runs out.
set -u -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT_DIR=${1:-${OUT:-/tmp/gpu_session}}
mkdir -p "$OUT_DIR/logs" "$OUT_DIR/results"
PY=${PYTHON:-python3}
T_END=$((SECONDS + ${BUDGET_S:-480}))
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
SUMMARY="$OUT_DIR/summary.txt"
: >"$SUMMARY"

step() {  # step NAME LIMIT_S CMD...: run with min(LIMIT, time left - 15 s), log, record, never fail
  local name=$1 limit=$2 left rc t0=$SECONDS
  shift 2
  left=$((T_END - SECONDS - 15))
  ((left < limit)) && limit=$left
  if ((limit < 20)); then echo "SKIP $name (budget spent)" | tee -a "$SUMMARY"; return 0; fi
  timeout --kill-after=5 "$limit" "$@" >"$OUT_DIR/logs/$name.log" 2>&1
  rc=$?
  tail -n 6 "$OUT_DIR/logs/$name.log"
  if ((rc == 0)); then echo "PASS $name ($((SECONDS - t0)) s)" | tee -a "$SUMMARY"
  else echo "FAIL $name rc=$rc ($((SECONDS - t0)) s; limit $limit s)" | tee -a "$SUMMARY"; fi
  return 0
}

# Packages the GPU image lacks (fvcore for FLOPs), carried as wheels in .whl/.
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
NVCC=$(command -v nvcc || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null)
export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$NVCC")")}
# Build with the system compiler when there is one: on the lent H200 image the g++ first on PATH
# (/opt/gcc, a wrapper) produced extensions that segfault as soon as a TORCH_CHECK formats its message
# (std::ostream inside the extension); /usr/bin/g++ (13.3, the compiler torch was built with) does not.
if [ -x /usr/bin/g++ ] && [ -z "${CXX:-}" ]; then export CC=/usr/bin/gcc CXX=/usr/bin/g++; fi
{ nvidia-smi -L; $PY -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.get_device_name())"; echo "nvcc=$NVCC sanitizer=$SAN"; } 2>&1 | tee "$OUT_DIR/logs/env.log"

# 1. Build in the background while the Triton tests and the standalone kernel test run.
( ADVMOE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 timeout 300 $PY setup.py build_ext --inplace \
    >"$OUT_DIR/logs/build.log" 2>&1; echo "build rc=$?" >>"$OUT_DIR/logs/build.log" ) &
BUILD_PID=$!
step standalone_build 120 "$NVCC" -std=c++17 -O2 -lineinfo -arch=sm_90 -o /tmp/standalone_test \
  csrc/cuda/standalone_test.cu csrc/cuda/sparse_moe_conv2d_kernel.cu
step standalone_run 60 /tmp/standalone_test
step sanitize_memcheck 90 "$SAN" --tool memcheck --leak-check full --error-exitcode 1 /tmp/standalone_test --quick
step sanitize_racecheck 90 "$SAN" --tool racecheck --error-exitcode 1 /tmp/standalone_test --quick
step pytest_triton_gpu 150 $PY -m pytest -q -p no:cacheprovider -m cuda tests/test_triton_backend.py tests/test_attacks.py
wait "$BUILD_PID"
tail -n 5 "$OUT_DIR/logs/build.log"
grep -q "build rc=0" "$OUT_DIR/logs/build.log" && echo "PASS build" | tee -a "$SUMMARY" || echo "FAIL build" | tee -a "$SUMMARY"
step backends 30 $PY -c "import moe_kernels as m; print(m.available_backends()); print(m.unavailable_reason('cuda'))"

# 2. GPU tests of the CUDA backend and every other cuda-marked test.
step pytest_cuda_gpu 150 $PY -m pytest -q -p no:cacheprovider --continue-on-collection-errors -m cuda tests
# 3. memcheck over torch-level calls (few cases: the sanitizer slows everything down).
step sanitize_torch_cuda 60 "$SAN" --tool memcheck --error-exitcode 1 $PY -m pytest -q -x -p no:cacheprovider \
  tests/test_cuda_backend.py -k "matches_reference and fp32 and (basic or empty_expert or k2_of_4)"
step sanitize_torch_triton 60 "$SAN" --tool memcheck --error-exitcode 1 $PY -m pytest -q -x -p no:cacheprovider \
  -m cuda tests/test_triton_backend.py -k "fp32 and not tf32 and not sync" --maxfail=1

# 4. Benchmarks.
for dt in bf16 fp32 fp16; do
  step "bench_op_$dt" 70 $PY benchmarks/bench_op.py --device cuda --dtype "$dt" --batch 256 \
    --reps 20 --warmup 5 --out-dir "$OUT_DIR/results/op_$dt"
done
step bench_models_bf16 80 $PY -m advmoe bench --device cuda --dtype bf16 --models resnet18_cifar \
  --batch 1 64 256 --repeats 10 --warmup 3 --backends cuda triton --out "$OUT_DIR/results/models_bf16"
echo "=== summary ==="; cat "$SUMMARY"
