#!/usr/bin/env bash
# The suite, again and again, on a loaded machine: runs scripts/test.sh RUNS times in a row (10
# by default) while a busy loop keeps one core busy, and stops at the first failure. Prints each
# run's result and duration; keeps each run's output in $SOAK_DIR (a new temporary folder by
# default). Exits non-zero when a run failed.
#
#   scripts/soak.sh            (10 runs; about 6-8 minutes each once the build is done)
#   RUNS=3 scripts/soak.sh
set -uo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-10}
SOAK_DIR=${SOAK_DIR:-$(mktemp -d)}
mkdir -p "$SOAK_DIR"
log() { printf '==> %s\n' "$*"; }

# One core busy for the whole soak (a shell loop, no package needed); stopped by pid on exit.
( while :; do :; done ) &
busy=$!
trap 'kill "$busy" 2>/dev/null || true' EXIT
log "busy loop pid $busy keeps one core busy; output of each run in $SOAK_DIR"

for run in $(seq 1 "$RUNS"); do
  started=$(date +%s)
  if bash scripts/test.sh > "$SOAK_DIR/run-$run.log" 2>&1; then
    log "run $run of $RUNS: passed in $(( $(date +%s) - started )) s"
  else
    status=$?
    log "run $run of $RUNS: FAILED ($status) after $(( $(date +%s) - started )) s; the end of its output:"
    tail -40 "$SOAK_DIR/run-$run.log"
    exit 1
  fi
done
log "all $RUNS runs passed under load"
