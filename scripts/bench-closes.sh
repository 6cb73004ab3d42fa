#!/usr/bin/env bash
# Join and leave storms on one server: N sockets (default 9,500) open to PeerChat
# (runserver --noworker + 1 runworker on a private Redis), then all close at once in random
# order; the server's CPU per open and per close (/proc), for this tree's release build and,
# with BEFORE_BIN, an earlier one, in alternating runs (RUNS each, default 2), with the ratio of
# the medians. Session 30 found two costs here that grew with the crowd (a task group's child list
# walked at every close, a full channel's line copied at every change).
#
#   scripts/bench-closes.sh                         this tree only
#   BEFORE_BIN=/dir/with/PeerChat scripts/bench-closes.sh
#   N=5000 RUNS=3 AFTER_BIN=/dir ...                another size; an already built "after"
#   SERVER_ARGS="" ...                              the server's default access lines (in its log) instead of
#                                                   --access-log /dev/null
#
# Needs the interop venv (scripts/test.sh makes it: websockets for the client).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-9500}
RUNS=${RUNS:-2}
. scripts/bench/common.sh
PY=$(interop_python)
[ -n "${AFTER_BIN:-}" ] || AFTER_BIN="$(release_bins_of_this_tree)"
bench_workspace
one() { # one LABEL DIR: a JSON line with the label
  local port layer s w
  port=$(free_port)
  layer="$REDIS?prefix=closes$RANDOM:"
  "$2/PeerChat" runserver --noworker --bind 127.0.0.1 --port "$port" --layer "$layer" ${SERVER_ARGS---access-log /dev/null} > "$RUN_DIR/s.log" 2>&1 & s=$!
  "$2/PeerChat" runworker --layer "$layer" > "$RUN_DIR/w.log" 2>&1 & w=$!
  pids+=($s $w)
  for _ in $(seq 1 100); do curl -s -o /dev/null "http://127.0.0.1:$port/hello" && break; sleep 0.1; done
  "$PY" scripts/bench/open_close.py "$port" "$N" "$s" | sed "s/^{/{\"label\": \"$1\", /"
  kill "$s" "$w" 2>/dev/null || true
  wait "$s" "$w" 2>/dev/null || true
}
for _ in $(seq 1 "$RUNS"); do
  [ -n "${BEFORE_BIN:-}" ] && one before "$BEFORE_BIN"
  one after "$AFTER_BIN"
done | tee "$RUN_DIR/results.jsonl"
python3 - "$RUN_DIR/results.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
med = {}
for label in ("before", "after"):
    mine = [r for r in rows if r["label"] == label]
    if not mine:
        continue
    med[label] = {k: statistics.median(r[k] for r in mine) for k in ("open_us", "close_us")}
    print("%-6s %d runs: server CPU per open %.0f us, per close %.0f us (medians)" % (label, len(mine), med[label]["open_us"], med[label]["close_us"]))
if len(med) == 2:
    print("after / before: open %.2fx, close %.2fx" % (med["after"]["open_us"] / med["before"]["open_us"], med["after"]["close_us"] / med["before"]["close_us"]))
PY
