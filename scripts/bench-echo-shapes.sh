#!/usr/bin/env bash
# The two ways of carrying a connection's bytes, measured side by side in one run (issue 27):
# Benchmarks' EchoShapes serves a WebSocket echo with tuned pipeline handlers (how `runserver`
# works) and with NIOAsyncChannel children in a discarding task group (swift-nio's and
# Hummingbird's structured style; also with NIO's loops as Swift's global executor), on one
# event-loop thread pinned to CPU 0; `ChannelsBench ws`
# on CPU 1 measures each: echo throughput with 50 clients, and round-trip latency with one.
# Alternates the two PAIRS times (default 3) and prints each run and the ratios.
#
#   scripts/bench-echo-shapes.sh            DURATION=10 PAIRS=3 LATENCY_N=5000
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bench/common.sh
DURATION=${DURATION:-10}
PAIRS=${PAIRS:-3}
LATENCY_N=${LATENCY_N:-5000}
log "release build of EchoShapes and ChannelsBench"
swift build -c release --package-path Benchmarks --product EchoShapes >/dev/null
swift build -c release --package-path Benchmarks --product ChannelsBench >/dev/null
BIN="$(swift build -c release --package-path Benchmarks --show-bin-path)"
SERVER_CPU=() CLIENT_CPU=()
if [ "$(nproc)" -ge 2 ]; then SERVER_CPU=(taskset -c 0) CLIENT_CPU=(taskset -c 1); fi
DIR=$(mktemp -d)
PID=""
cleanup() { [ -n "$PID" ] && kill "$PID" 2>/dev/null; rm -rf "$DIR"; }
trap cleanup EXIT

measure() { # SHAPE -> appends "shape msgs/s p50 p99 lat_p50 lat_p99" to $DIR/results
  local shape=$1 port
  port=$(free_port)
  "${SERVER_CPU[@]}" "$BIN/EchoShapes" "$shape" "$port" > "$DIR/$shape.log" 2>&1 &
  PID=$!
  for _ in $(seq 1 100); do grep -q "echo on" "$DIR/$shape.log" 2>/dev/null && break; sleep 0.05; done
  "${CLIENT_CPU[@]}" "$BIN/ChannelsBench" ws "ws://127.0.0.1:$port" throughput 50 "$DURATION" > "$DIR/tp.json"
  "${CLIENT_CPU[@]}" "$BIN/ChannelsBench" ws "ws://127.0.0.1:$port" latency "$LATENCY_N" > "$DIR/lat.json"
  kill "$PID"; wait "$PID" 2>/dev/null || true; PID=""
  python3 - "$shape" "$DIR/tp.json" "$DIR/lat.json" >> "$DIR/results" <<'PY'
import json, sys
tp = json.load(open(sys.argv[2]))["throughput"]
lat = json.load(open(sys.argv[3]))["latency"]["rtt"]
print(sys.argv[1], tp["msgs_per_s"], tp["rtt_under_load"]["median_ms"], tp["rtt_under_load"]["p99_ms"], lat["median_ms"], lat["p99_ms"])
PY
  tail -1 "$DIR/results" >&2
}

for _ in $(seq 1 "$PAIRS"); do
  measure handlers
  measure async
  measure async-on-loops
done
python3 - "$DIR/results" <<'PY'
import statistics, sys
rows = [line.split() for line in open(sys.argv[1])]
by = {}
for shape, *values in rows:
    by.setdefault(shape, []).append([float(v) for v in values])
print("| shape (1 event-loop thread) | echo msgs/s (50 clients) | RTT p50 / p99 under load | RTT p50 / p99, 1 client |")
print("|---|---:|---:|---:|")
med = {}
for shape in ("handlers", "async", "async-on-loops"):
    cols = list(zip(*by[shape]))
    med[shape] = [statistics.median(c) for c in cols]
    m = med[shape]
    print("| %s | %.0f | %.2f / %.2f ms | %.2f / %.2f ms |" % (shape, m[0], m[1], m[2], m[3], m[4]))
for shape in ("async", "async-on-loops"):
    print("medians of %d runs each; %s / handlers: throughput %.2fx, RTT p50 under load %.2fx, 1-client RTT p50 %.2fx" % (
        len(by["handlers"]), shape, med[shape][0] / med["handlers"][0], med[shape][1] / med["handlers"][1],
        med[shape][3] / med["handlers"][3]))
PY
