#!/usr/bin/env bash
# Before/after in one run, on one Redis: the server + worker figures of scripts/bench-server.sh
# (HTTP req/s with wrk, WebSocket echo throughput and latency with ChannelsBench ws) and the
# layer figures of scripts/bench-layer.sh (ChannelsBench), for
#   before         the binaries in BEFORE_BIN (a release build of an earlier commit)
#   after          this tree's release build
#   after+metrics  the same with --metrics-port on the server and the worker (issue: metrics
#                  must cost at most 5 %)
# interleaved ROUNDS times (this machine's noise moves a figure more between two consecutive runs
# than most changes do; medians of interleaved rounds are what to compare). Prints a table of
# medians and the ratios to `before` and to `after`.
#
# Besides the rates it records the server's and the worker's CPU time per HTTP request and per
# WebSocket echo (from /proc): on a noisy machine a cost shows there long before it shows in a rate.
#
#   BEFORE_BIN=/path/to/bin scripts/bench-compare.sh      (ROUNDS=3, DURATION=8: about 15 minutes)
#   SKIP_LAYER=1 ...                                        (the server figures only)
#   FANOUT=0 ...                                            (without the fan-out row: scripts/bench-peers2.sh
#                                                           before and after, ../shared/peers2 kit)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-8}
LAYER_N=${LAYER_N:-10000}
. scripts/bench/common.sh   # log, free_port, start_redis, stop_redis
[ -n "${BEFORE_BIN:-}" ] && [ -x "$BEFORE_BIN/PeerChat" ] && [ -x "$BEFORE_BIN/ChannelsBench" ] || {
  log "BEFORE_BIN must name a folder with PeerChat and ChannelsBench built (release) from the earlier commit"; exit 2; }
ensure_wrk
[ -n "${AFTER_BIN:-}" ] || AFTER_BIN="$(release_bins_of_this_tree)"
CLIENT="$AFTER_BIN/ChannelsBench"   # the same load generator for every stack

RUN_DIR=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  stop_redis "$RUN_DIR"
  rm -rf "$RUN_DIR"
}
trap cleanup EXIT
start_redis "$RUN_DIR"
OUT="$RUN_DIR/results.jsonl"
: > "$OUT"
record() { echo "{\"stack\": \"$1\", \"what\": \"$2\", \"value\": ${3:-null}}" >> "$OUT"; }
# CPU time (user + system, in clock ticks) the server and the worker have used so far. CPU per
# message moves far less with this machine's noise than messages per second do.
cpu_ticks() { local sum=0 pid; for pid in "$@"; do sum=$((sum + $(awk '{print $14 + $15}' "/proc/$pid/stat"))); done; echo "$sum"; }
per_message() { # per_message T0 T1 RATE: microseconds of CPU per message over DURATION seconds
  [ -n "${3:-}" ] || return 0
  python3 -c "import os, sys; t0, t1, rate = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]); \
print('%.1f' % ((t1 - t0) / os.sysconf('SC_CLK_TCK') / (rate * $DURATION) * 1e6) if rate else '')" "$1" "$2" "$3"; }

stack_run() { # stack_run NAME BIN METRICS(0/1)
  local name=$1 bin=$2 metrics=$3 port mflags=() wflags=()
  port=$(free_port)
  if [ "$metrics" = 1 ]; then mflags=(--metrics-port "$(free_port)"); wflags=(--metrics-port "$(free_port)"); fi
  redis-cli -p "$REDIS_PORT" flushall >/dev/null
  local layer="$REDIS?prefix=cmp:&capacity=1000"
  "$bin/PeerChat" runserver --noworker --layer "$layer" --port "$port" --access-log /dev/null "${mflags[@]}" \
    > "$RUN_DIR/$name-server.log" 2>&1 & local server=$!
  "$bin/PeerChat" runworker --layer "$layer" "${wflags[@]}" > "$RUN_DIR/$name-worker.log" 2>&1 & local worker=$!
  pids+=("$server" "$worker")
  for _ in $(seq 1 150); do curl -s -o /dev/null "http://127.0.0.1:$port/hello" && break; sleep 0.2; done
  local t0 t1 rate
  t0=$(cpu_ticks "$server" "$worker")
  wrk -t2 -c50 -d"${DURATION}s" "http://127.0.0.1:$port/hello/bench" > "$RUN_DIR/wrk.txt" 2>&1 || true
  t1=$(cpu_ticks "$server" "$worker")
  rate=$(sed -n 's/^Requests\/sec: *\([0-9.]*\).*/\1/p' "$RUN_DIR/wrk.txt")
  record "$name" "HTTP req/s" "$rate"
  record "$name" "HTTP cpu us/request" "$(per_message "$t0" "$t1" "$rate")"
  "$CLIENT" ws "ws://127.0.0.1:$port" latency 2000 > "$RUN_DIR/lat.json" 2>/dev/null || true
  t0=$(cpu_ticks "$server" "$worker")
  "$CLIENT" ws "ws://127.0.0.1:$port" throughput 50 "$DURATION" > "$RUN_DIR/tp.json" 2>/dev/null || true
  t1=$(cpu_ticks "$server" "$worker")
  rate=$(grep -o '"msgs_per_s": *[0-9.]*' "$RUN_DIR/tp.json" | head -1 | grep -o '[0-9.]*$' || true)
  record "$name" "ws echo cpu us/msg" "$(per_message "$t0" "$t1" "$rate")"
  python3 - "$RUN_DIR" "$name" >> "$OUT" <<'PY'
import json, sys
run, name = sys.argv[1], sys.argv[2]
def dig(path, key):
    try: d = json.load(open(run + "/" + path))
    except Exception: return None
    todo = [d]
    while todo:
        x = todo.pop()
        if isinstance(x, dict):
            if key in x: return x[key]
            todo.extend(x.values())
for what, value in (("ws echo 1 client p50 ms", dig("lat.json", "median_ms")),
                    ("ws echo 50 clients msgs/s", dig("tp.json", "msgs_per_s"))):
    print(json.dumps({"stack": name, "what": what, "value": value}))
PY
  kill "$server" "$worker" 2>/dev/null || true
  wait "$server" "$worker" 2>/dev/null || true
}

layer_run() { # layer_run NAME BIN
  redis-cli -p "$REDIS_PORT" flushall >/dev/null
  "$2/ChannelsBench" "$REDIS" "$LAYER_N" > "$RUN_DIR/layer.json" 2>/dev/null || true
  python3 - "$RUN_DIR/layer.json" "$1" >> "$OUT" <<'PY'
import json, sys
try: d = json.load(open(sys.argv[1]))
except Exception: d = {}
for key, value in sorted(d.items()):
    if isinstance(value, (int, float)):
        print(json.dumps({"stack": sys.argv[2], "what": "layer " + key, "value": value}))
PY
}

for round in $(seq 1 "$ROUNDS"); do
  log "round $round of $ROUNDS"
  # The order alternates between rounds, so neither build always runs first (warm caches, a
  # Redis that just grew) or last.
  if [ $((round % 2)) = 1 ]; then
    stack_run before "$BEFORE_BIN" 0
    stack_run after "$AFTER_BIN" 0
    stack_run after+metrics "$AFTER_BIN" 1
    [ -n "${SKIP_LAYER:-}" ] || layer_run before "$BEFORE_BIN"
    [ -n "${SKIP_LAYER:-}" ] || layer_run after "$AFTER_BIN"
  else
    stack_run after+metrics "$AFTER_BIN" 1
    stack_run after "$AFTER_BIN" 0
    stack_run before "$BEFORE_BIN" 0
    [ -n "${SKIP_LAYER:-}" ] || layer_run after "$AFTER_BIN"
    [ -n "${SKIP_LAYER:-}" ] || layer_run before "$BEFORE_BIN"
  fi
done

python3 - "$OUT" "$ROUNDS" <<'PY'
import collections, json, statistics, sys
rows = collections.defaultdict(lambda: collections.defaultdict(list))
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r["value"] is not None:
        rows[r["what"]][r["stack"]].append(r["value"])
stacks = ["before", "after", "after+metrics"]
print("%-44s %14s %14s %14s %9s %9s" % ("median of %s interleaved rounds" % sys.argv[2], *stacks, "after/bef", "metr/aft"))
for what in sorted(rows):
    med = {s: statistics.median(v) for s, v in rows[what].items()}
    cells = ["%14.2f" % med[s] if s in med else "%14s" % "-" for s in stacks]
    ratio = lambda a, b: ("%9.2f" % (med[a] / med[b])) if a in med and b in med and med[b] else "%9s" % "-"
    print("%-44s %s %s %s %s %s" % (what, *cells, ratio("after", "before"), ratio("after+metrics", "after")))
print("(higher is better for /s figures, lower for ms; ratios are a / b of the medians)")
PY

# The fan-out row: the big room of ../shared/peers2 (1,000 members over 2 servers and 2 workers,
# the Go client), before and after in one sitting, with nchan and Centrifuge beside them unless
# FANOUT_SYSTEMS says otherwise; FANOUT=0 skips it.
if [ "${FANOUT:-1}" = 1 ]; then
  log "fan-out: scripts/bench-peers2.sh, before and after, ${FANOUT_SIZES:-1000} members"
  SIZES="${FANOUT_SIZES:-1000}" SYSTEMS="${FANOUT_SYSTEMS:-swift nchan centrifuge}" BEFORE_BIN="$BEFORE_BIN" \
    scripts/bench-peers2.sh
fi
