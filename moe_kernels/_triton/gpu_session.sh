#!/usr/bin/env bash
# The Triton kernels' GPU work in ONE call on a lent GPU (UNMEASURED until a session runs it):
#   1. GPU tests of the Triton backend (pytest -m cuda)   2. tune once -> OUT/tuned/<gpu>.json
#   3. device time vs the slim cuDNN conv (CUDA graphs) with the new table -> OUT/results/
# Usage, from the repository root:  BUDGET_S=540 bash moe_kernels/_triton/gpu_session.sh OUT_DIR
# Commit OUT/tuned/<gpu>.json as moe_kernels/_triton/tuned/<gpu>.json afterwards. Steps never stop the
# script; each logs to OUT/logs/<step>.log; OUT/summary.txt lists PASS/FAIL/SKIP per step.
set -u -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT_DIR=${1:-${OUT:-/tmp/triton_session}}
mkdir -p "$OUT_DIR/logs" "$OUT_DIR/results" "$OUT_DIR/tuned"
PY=${PYTHON:-python3}
T_END=$((SECONDS + ${BUDGET_S:-540}))
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET
SUMMARY="$OUT_DIR/summary.txt"
: >"$SUMMARY"

step() {  # step NAME LIMIT_S CMD...: run with min(LIMIT, time left - 10 s), log, record, never fail
  local name=$1 limit=$2 left rc t0=$SECONDS
  shift 2
  left=$((T_END - SECONDS - 10))
  ((left < limit)) && limit=$left
  if ((limit < 20)); then echo "SKIP $name (budget spent)" | tee -a "$SUMMARY"; return 0; fi
  timeout --kill-after=5 "$limit" "$@" >"$OUT_DIR/logs/$name.log" 2>&1
  rc=$?
  tail -n 8 "$OUT_DIR/logs/$name.log"
  if ((rc == 0)); then echo "PASS $name ($((SECONDS - t0)) s)" | tee -a "$SUMMARY"
  else echo "FAIL $name rc=$rc ($((SECONDS - t0)) s; limit $limit s)" | tee -a "$SUMMARY"; fi
  return 0
}

nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader | tee "$OUT_DIR/gpu.txt"
step tests 150 $PY -m pytest -q -m cuda tests/test_triton_backend.py tests/test_triton_nhwc.py -x
step tune 300 $PY -m moe_kernels._triton.tune --out "$OUT_DIR/tuned" --budget-s 240
export ADVMOE_TRITON_TUNED_DIR="$OUT_DIR/tuned"
step bench 150 $PY -m moe_kernels._triton.bench_slim --out "$OUT_DIR/results" --batch 256 --dtypes bf16,fp32
cat "$SUMMARY"
