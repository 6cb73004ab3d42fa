#!/usr/bin/env bash
# A quick before/after of the two server figures that move with interface-server changes, in
# many short interleaved pairs (this machine's noise moves one 8 s figure by +-15 %; medians of
# short alternating runs settle faster than scripts/bench-compare.sh's long rounds):
#   HTTP: wrk -t2 -c50 for 5 s on /hello/  (req/s, server and worker CPU us per request)
#   echo: ChannelsBench ws throughput, 50 clients for 6 s  (msgs/s, CPU us per echo)
# each through PeerChat runserver --noworker + 1 runworker on one Redis.
#
#   BEFORE_BIN=dir-with-PeerChat-and-ChannelsBench [AFTER_BIN=dir] [PAIRS=5] scripts/bench-ab.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PAIRS=${PAIRS:-5}
. scripts/bench/common.sh
[ -n "${BEFORE_BIN:-}" ] && [ -x "$BEFORE_BIN/PeerChat" ] || { log "BEFORE_BIN must name a folder with a release PeerChat (and ChannelsBench)"; exit 2; }
ensure_wrk
[ -n "${AFTER_BIN:-}" ] || AFTER_BIN="$(release_bins_of_this_tree)"
CLIENT="$AFTER_BIN/ChannelsBench"
RUN_DIR=$(mktemp -d)
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; stop_redis "$RUN_DIR"; rm -rf "$RUN_DIR"; }
trap cleanup EXIT
start_redis "$RUN_DIR"
ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
one() { # one LABEL BIN KIND -> "LABEL KIND rate server_us worker_us"
  local port; port=$(free_port)
  local layer="$REDIS?prefix=ab$RANDOM:"
  "$2/PeerChat" runserver --noworker --layer "$layer" --port "$port" --access-log /dev/null > "$RUN_DIR/s.log" 2>&1 & local s=$!
  "$2/PeerChat" runworker --layer "$layer" > "$RUN_DIR/w.log" 2>&1 & local w=$!
  pids+=($s $w)
  for _ in $(seq 1 100); do curl -s -o /dev/null "http://127.0.0.1:$port/hello" && break; sleep 0.1; done
  local s0 w0 s1 w1 rate n
  s0=$(ticks $s); w0=$(ticks $w)
  if [ "$3" = http ]; then
    wrk -t2 -c50 -d5s "http://127.0.0.1:$port/hello/bench" > "$RUN_DIR/out" 2>&1 || true
    s1=$(ticks $s); w1=$(ticks $w)
    n=$(awk '/requests in/{print $1}' "$RUN_DIR/out"); rate=$(awk '/Requests\/sec/{print $2}' "$RUN_DIR/out")
  else
    "$CLIENT" ws "ws://127.0.0.1:$port" throughput 50 6 > "$RUN_DIR/out" 2>/dev/null || true
    s1=$(ticks $s); w1=$(ticks $w)
    n=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["throughput"]["echoed_messages"])' "$RUN_DIR/out")
    rate=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["throughput"]["msgs_per_s"])' "$RUN_DIR/out")
  fi
  kill $s $w 2>/dev/null; wait $s $w 2>/dev/null || true
  python3 -c "import sys; n=max(1,int(sys.argv[3])); print(sys.argv[1], sys.argv[2], sys.argv[4], '%.1f' % ((int(sys.argv[6])-int(sys.argv[5]))*1e4/n), '%.1f' % ((int(sys.argv[8])-int(sys.argv[7]))*1e4/n))" \
    "$1" "$3" "$n" "$rate" "$s0" "$s1" "$w0" "$w1"
}
for i in $(seq 1 "$PAIRS"); do
  for kind in http echo; do
    one before "$BEFORE_BIN" $kind >> "$RUN_DIR/results"
    one after "$AFTER_BIN" $kind >> "$RUN_DIR/results"
  done
  log "pair $i of $PAIRS done"
done
python3 - "$RUN_DIR/results" "$PAIRS" <<'PY'
import statistics, sys
rows = [line.split() for line in open(sys.argv[1])]
print("medians of %s interleaved pairs          before      after   after/before" % sys.argv[2])
for kind, unit in (("http", "req"), ("echo", "msg")):
    for col, name in ((2, "%s/s" % unit), (3, "server CPU us/%s" % unit), (4, "worker CPU us/%s" % unit)):
        b = statistics.median(float(r[col]) for r in rows if r[0] == "before" and r[1] == kind)
        a = statistics.median(float(r[col]) for r in rows if r[0] == "after" and r[1] == kind)
        print("%-6s %-24s %10.1f %10.1f %10.2f" % (kind, name, b, a, a / b))
PY
