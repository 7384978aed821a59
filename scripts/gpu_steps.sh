# Shared by the GPU session scripts (sourced, not run; scripts/gpu_session.sh, benchmarks/gpu_bench_models.sh):
# timed steps inside one total budget, each logged, none stopping the script.
# The sourcing script sets LOG_DIR (one <step>.log each), SUMMARY (PASS/FAIL/SKIP lines) and T_END (the value of
# $SECONDS at which the budget ends); optional: DRY_RUN=1 (print each step's command instead of running it),
# STEP_MARGIN_S (seconds kept free at the end, default 15), STEP_MIN_S (a step with less time left is skipped,
# default 20), STEP_TAIL (log lines shown after a step, default 6), STEPS (space-separated glob patterns of the
# step names to run, e.g. STEPS="build pytest_* bench_op_*"; default: every step).

selected() {  # selected NAME: true when a pattern of STEPS matches NAME
  local pattern
  local -a patterns
  read -ra patterns <<<"${STEPS:-*}"  # read does not expand globs
  for pattern in "${patterns[@]}"; do
    # shellcheck disable=SC2053
    [[ $1 == $pattern ]] && return 0
  done
  return 1
}

step() {  # step NAME LIMIT_S CMD...: run with min(LIMIT, time left - margin), log, record, never fail
  local name=$1 limit=$2 left rc t0=$SECONDS
  shift 2
  if ! selected "$name"; then echo "SKIP $name (not in STEPS)" | tee -a "$SUMMARY"; return 0; fi
  left=$((T_END - SECONDS - ${STEP_MARGIN_S:-15}))
  ((left < limit)) && limit=$left
  if ((limit < ${STEP_MIN_S:-20})); then echo "SKIP $name (budget spent)" | tee -a "$SUMMARY"; return 0; fi
  if [ "${DRY_RUN:-0}" = 1 ]; then echo "DRY $name (limit $limit s): $*" | tee -a "$SUMMARY"; return 0; fi
  timeout --kill-after=5 "$limit" "$@" >"$LOG_DIR/$name.log" 2>&1
  rc=$?
  tail -n "${STEP_TAIL:-6}" "$LOG_DIR/$name.log"
  if ((rc == 0)); then echo "PASS $name ($((SECONDS - t0)) s)" | tee -a "$SUMMARY"
  else echo "FAIL $name rc=$rc ($((SECONDS - t0)) s; limit $limit s)" | tee -a "$SUMMARY"; fi
  return 0
}

install_wheels() {  # packages the GPU image lacks (fvcore for FLOPs, tqdm), carried as wheels in .whl/
  local wheels
  wheels=$(set +f; ls .whl/*.whl 2>/dev/null)  # globbing on here even where the caller ran `set -f`
  if [ -n "$wheels" ]; then
    # shellcheck disable=SC2086
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $wheels \
      && export PYTHONPATH="$PYTHONPATH:/tmp/site"
  fi
}
