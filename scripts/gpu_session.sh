#!/usr/bin/env bash
# Every GPU check of the project in ONE call on a lent GPU machine (torch with CUDA, nvcc and
# compute-sanitizer installed; no network), inside a fixed time budget:
#   build the extensions (CPU + CUDA) | torch-free CUDA kernel test, plain and under compute-sanitizer
#   memcheck/racecheck | GPU tests (pytest -m cuda, the whole suite) | memcheck over torch-level CUDA and Triton
#   calls | Triton tuning -> OUT_DIR/tuned/<gpu>.json (used by the later steps) | op benchmark v2 (bf16,
#   fp32/TF32; B = 256 and 32) | Triton vs slim cuDNN device time (bench_slim) | model benchmark (ResNet-18) |
#   claims.json.
# Usage, from the repository root:  BUDGET_S=540 bash scripts/gpu_session.sh OUT_DIR
# Commit OUT_DIR/tuned/<gpu>.json as moe_kernels/_triton/tuned/<gpu>.json afterwards.
# DRY_RUN=1 prints every step's command instead of running it (checkable on a CPU machine); STEPS="pattern ..."
# runs only the steps whose names match (e.g. a second call: STEPS="triton_tune bench_*"; see scripts/gpu_steps.sh).
# Steps never stop the script; each logs to OUT_DIR/logs/<step>.log; results go to OUT_DIR/results/;
# OUT_DIR/summary.txt lists PASS/FAIL/SKIP per step. Steps are skipped when the budget runs out (in order).
set -u -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT_DIR=${1:-${OUT:-/tmp/gpu_session}}
LOG_DIR="$OUT_DIR/logs"
mkdir -p "$LOG_DIR" "$OUT_DIR/results" "$OUT_DIR/tuned"
PY=${PYTHON:-python3}
T_END=$((SECONDS + ${BUDGET_S:-540}))
DRY_RUN=${DRY_RUN:-0}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET
SUMMARY="$OUT_DIR/summary.txt"
: >"$SUMMARY"
# shellcheck source=scripts/gpu_steps.sh
source scripts/gpu_steps.sh

install_wheels
NVCC=$(command -v nvcc || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null)
export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$NVCC")")}
# setup.py picks a g++ of the version torch was built with (on the lent H200 image the g++ wrapper first on
# PATH produced extensions that segfaulted when a TORCH_CHECK formatted its message) or stops with the fix.
nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader >"$OUT_DIR/gpu.txt" 2>&1
{ git rev-parse HEAD; nvidia-smi -L; $PY -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.get_device_name())"; echo "nvcc=$NVCC sanitizer=$SAN"; } 2>&1 | tee "$LOG_DIR/env.log"

# 1. Build in the background while the torch-free kernel test and its sanitizer runs go on.
BUILD_PID=
if ! selected build; then echo "SKIP build (not in STEPS)" | tee -a "$SUMMARY"
elif [ "$DRY_RUN" = 1 ]; then echo "DRY build: ADVMOE_CUDA=1 $PY setup.py build_ext --inplace" | tee -a "$SUMMARY"
else
( ADVMOE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 timeout 300 $PY setup.py build_ext --inplace \
    >"$LOG_DIR/build.log" 2>&1; echo "build rc=$?" >>"$LOG_DIR/build.log" ) &
BUILD_PID=$!
fi
step standalone_build 120 "$NVCC" -std=c++17 -O2 -lineinfo -arch=sm_90 -I csrc/cuda -o /tmp/standalone_test \
  tests/cuda/standalone_test.cu csrc/cuda/sparse_moe_conv2d_kernel.cu
step standalone_run 60 /tmp/standalone_test
step sanitize_memcheck 90 "$SAN" --tool memcheck --leak-check full --error-exitcode 1 /tmp/standalone_test --quick
step sanitize_racecheck 90 "$SAN" --tool racecheck --error-exitcode 1 /tmp/standalone_test --quick
if [ -n "$BUILD_PID" ]; then
  wait "$BUILD_PID"
  tail -n 5 "$LOG_DIR/build.log"
  grep -q "build rc=0" "$LOG_DIR/build.log" && echo "PASS build" | tee -a "$SUMMARY" || echo "FAIL build" | tee -a "$SUMMARY"
fi
step backends 30 $PY -c "import moe_kernels as m; print(m.available_backends()); print(m.unavailable_reason('cuda'))"

# 2. The whole cuda-marked suite, nothing deselected; counts from the JUnit XML.
step pytest_cuda_gpu 180 $PY -m pytest -q -p no:cacheprovider -m cuda tests --junitxml="$OUT_DIR/results/junit_cuda.xml"
# 3. memcheck over torch-level calls (few cases: the sanitizer slows everything down).
step sanitize_torch_cuda 60 "$SAN" --tool memcheck --error-exitcode 1 $PY -m pytest -q -x -p no:cacheprovider \
  tests/kernels/test_cuda_backend.py -k "matches_reference and fp32 and (basic or empty_expert or k2_of_4)"
step sanitize_torch_triton 60 "$SAN" --tool memcheck --error-exitcode 1 $PY -m pytest -q -x -p no:cacheprovider \
  -m cuda tests/kernels/test_triton_backend.py -k "fp32 and not tf32 and not sync" --maxfail=1

# 4. Tune the Triton kernels once (compile-pruned candidates, then timed); later steps use the new table.
step triton_tune 300 $PY -m moe_kernels._triton.tune --out "$OUT_DIR/tuned" --budget-s 240
export ADVMOE_TRITON_TUNED_DIR="$OUT_DIR/tuned"

# 5. Benchmark v2: CUDA graphs, eager latency, profiler counts; B = 256 and 32; bf16 and fp32 (TF32).
for dt in bf16 fp32; do
  step "bench_op_$dt" 110 $PY benchmarks/bench_op.py --device cuda --dtype "$dt" --batch 256 32 \
    --reps 20 --warmup 5 --quiet --out-dir "$OUT_DIR/results/op_$dt"
done
# Triton forward, forward+backward and fused BN+ReLU against the slim cuDNN conv (CUDA-graph device time).
step bench_triton_slim 150 $PY -m moe_kernels._triton.bench_slim --out "$OUT_DIR/results" --batch 256 --dtypes bf16,fp32
step bench_models_bf16 60 $PY -m advmoe bench --device cuda --dtype bf16 --models resnet18_cifar \
  --batch 1 64 256 --repeats 10 --warmup 3 --backends cuda triton --out "$OUT_DIR/results/models_bf16"

# 6. claims.json from the JUnit counts, the sanitizer logs and the benchmark JSONs (always runs, also in DRY_RUN).
timeout 60 $PY - "$OUT_DIR" >"$LOG_DIR/claims.log" 2>&1 <<'PYEOF'
import glob, json, os, re, sys
import xml.etree.ElementTree as ET
sys.path.insert(0, "benchmarks")
from bench_op import op_claims, versions, write_claims
out = sys.argv[1]
claims = []
junit = os.path.join(out, "results", "junit_cuda.xml")
if os.path.exists(junit):
    suites = ET.parse(junit).getroot()
    suites = [suites] if suites.tag == "testsuite" else list(suites)
    total = sum(int(s.get("tests", 0)) for s in suites)
    failed = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
    skipped = sum(int(s.get("skipped", 0)) for s in suites)
    claims += [{"id": "tests.cuda.passed", "value": total - failed - skipped, "target": None, "source": junit},
               {"id": "tests.cuda.failed", "value": failed, "target": 0, "source": junit},
               {"id": "tests.cuda.skipped", "value": skipped, "target": 0, "source": junit}]
for tool in ("memcheck", "racecheck", "torch_cuda", "torch_triton"):
    log = os.path.join(out, "logs", f"sanitize_{tool}.log")
    if os.path.exists(log):
        found = re.findall(r"ERROR SUMMARY: (\d+) error", open(log).read())
        name = tool if tool in ("memcheck", "racecheck") else f"memcheck.{tool}"
        claims.append({"id": f"sanitizer.{name}.errors", "value": sum(map(int, found)) if found else None,
                       "target": 0, "source": log})
docs = []
for path in sorted(glob.glob(os.path.join(out, "results", "op_*", "op_bench*.json"))):
    doc = json.load(open(path)); doc["source"] = path; docs.append(doc)
claims += op_claims(docs)
syncs = [c["value"] for c in claims if c["id"].startswith("op.host_syncs_per_call.")]
if syncs:
    claims.append({"id": "op.host_syncs_per_call", "value": max(syncs), "target": 0, "source": "bench_op profiler"})
device = docs[0]["device_slug"] if docs else "unknown"
print(write_claims(os.path.join(out, "results"), claims, device=device, commit=versions()["commit"]))
PYEOF
echo "claims rc=$? -> $OUT_DIR/results/claims.json" | tee -a "$SUMMARY"; tail -n 3 "$LOG_DIR/claims.log"
echo "=== summary ==="; cat "$SUMMARY"
