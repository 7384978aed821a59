#!/usr/bin/env bash
# All GPU checks in one call: runs each section scripts/gpu_check_<part>.sh in turn (the CUDA section
# first, since it builds the extensions; later sections get SKIP_BUILD=1), never stopping at a failure,
# then prints every section's summary. Run from the repository root on the GPU machine:
#
#   bash scripts/gpu_check.sh [OUT_DIR]        (default: $OUT or /tmp/gpu_check)
#
# Each section writes OUT_DIR/<part>/*.log and OUT_DIR/<part>/summary.txt. Exit status: number of failed sections.
set -u -o pipefail
set -x
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
OUT_DIR=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$OUT_DIR"
sections=(scripts/gpu_check_cuda.sh)
for s in scripts/gpu_check_*.sh; do
  [ "$s" != scripts/gpu_check_cuda.sh ] && sections+=("$s")
done
failed=0
results=()
for s in "${sections[@]}"; do
  [ -f "$s" ] || continue
  bash "$s" "$OUT_DIR"
  rc=$?
  results+=("$s: exit $rc")
  [ "$rc" -ne 0 ] && failed=$((failed + 1))
  export SKIP_BUILD=1
done
set +x
echo "================ GPU check summary ================"
printf '%s\n' "${results[@]}"
for f in "$OUT_DIR"/*/summary.txt; do
  [ -f "$f" ] && cat "$f"
done
exit "$failed"
