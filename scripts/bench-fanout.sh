#!/usr/bin/env bash
# Fan-out benchmark: one room of 1,000 members on our stack (two `runserver --noworker`, two
# `runworker`, the peers' chat app in Swift: Examples/Sources/PeerChat) and on Channels 4.3 (Daphne 4 +
# channels_redis 4.3, ../shared/peers/run_channels4.sh), each on a Redis of its own, in the same
# run, with the same client (scripts/bench/fanout_client.py).
#
#   scripts/bench-fanout.sh            (about 2 minutes; MEMBERS=1000 MESSAGES=20 BURST=20)
#
# Prints, per stack: deliveries (must be 100 %), time from send to the last member p50/p99,
# deliveries/s for a back-to-back burst, and Redis commands per group send (from INFO
# commandstats, for 1,000 members and for 10: ours must not grow with the member count); then
# the ratios; then our stack again with history on (PEERCHAT_HISTORY=1), and its cost.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PEERS="${PEERS_DIR:-$ROOT/../shared/peers}"
export PEERS_STATE="$ROOT/.bench-state"
MEMBERS=${MEMBERS:-1000}
MESSAGES=${MESSAGES:-20}
BURST=${BURST:-20}

log() { printf '==> %s\n' "$*" >&2; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

log "release build"
swift build -c release --package-path Examples --product PeerChat >/dev/null
APP="$(swift build -c release --package-path Examples --show-bin-path)/PeerChat"
if [ ! -x "$PEERS_STATE/venv4/bin/daphne" ]; then
  log "building the Python Channels 4 stack ($PEERS/setup_channels4.sh -> $PEERS_STATE/venv4)"
  mkdir -p "$PEERS_STATE"
  "$PEERS/setup_channels4.sh" >/dev/null
fi
CLIENT="$PEERS_STATE/venv4/bin/python $ROOT/scripts/bench/fanout_client.py"

RUN_DIR=$(mktemp -d)
pids=()
redis_pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  "$PEERS/run_channels4.sh" stop >/dev/null 2>&1 || true
  for pid in "${redis_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$RUN_DIR"
}
trap cleanup EXIT
start_redis() {
  local port=$1
  redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --daemonize yes \
    --pidfile "$RUN_DIR/redis-$port.pid" --logfile "$RUN_DIR/redis-$port.log" --dir "$RUN_DIR"
  for _ in $(seq 1 100); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done
  redis_pids+=("$(cat "$RUN_DIR/redis-$port.pid")")
}
calls() { redis-cli -p "$1" info commandstats | awk -F'[=,:]' '/^cmdstat_/ {n += $3} END {print n}'; }
wait_http() { for _ in $(seq 1 150); do curl -s -o /dev/null "http://127.0.0.1:$1/hello" && return 0; sleep 0.2; done; return 1; }

# Redis commands for one group send to a room of $2 members on the stack whose Redis is $1,
# through the server port $3 (a small client: two members, one message, averaged over 20).
per_send() {
  local redis_port=$1 members=$2 port=$3
  "$PEERS_STATE/venv4/bin/python" - "$port" "$members" "$redis_port" <<'PY'
import asyncio, subprocess, sys, time, websockets
port, members, redis_port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
def calls():
    out = subprocess.run(["redis-cli", "-p", redis_port, "info", "commandstats"], capture_output=True, text=True).stdout
    return sum(int(line.split("calls=")[1].split(",")[0]) for line in out.splitlines() if line.startswith("cmdstat_"))
async def main():
    room = "cost%d" % time.time_ns()
    socks = [await websockets.connect("ws://127.0.0.1:%d/%s/" % (port, room), max_queue=None, ping_interval=None) for _ in range(members)]
    await asyncio.sleep(1)
    got = [0]
    async def drain(ws):
        async for _ in ws: got[0] += 1
    tasks = [asyncio.ensure_future(drain(ws)) for ws in socks]
    await asyncio.sleep(1)
    before = calls()
    for i in range(20):
        await socks[0].send("x%d" % i)
        deadline = time.time() + 20
        while got[0] < members * (i + 1) and time.time() < deadline: await asyncio.sleep(0.002)
    await asyncio.sleep(1.2)  # idle readers' periodic calls settle into the figure too
    print("%.1f" % ((calls() - before) / 20))
    for ws in socks: await ws.close()
asyncio.run(main())
PY
}

OUT="$RUN_DIR/results.jsonl"
: > "$OUT"

log "swift-channels: 2 x runserver --noworker + 2 x runworker on one Redis"
R1=$(free_port); start_redis "$R1"
LAYER="redis://127.0.0.1:$R1/0"
P1=$(free_port); P2=$(free_port)
for port in "$P1" "$P2"; do
  "$APP" runserver --noworker --layer "$LAYER" --port "$port" > "$RUN_DIR/server-$port.log" 2>&1 &
  pids+=($!)
done
for _ in 1 2; do "$APP" runworker --layer "$LAYER" > "$RUN_DIR/worker-$RANDOM.log" 2>&1 & pids+=($!); done
wait_http "$P1"; wait_http "$P2"
$CLIENT swift-channels "$P1,$P2" --members "$MEMBERS" --messages "$MESSAGES" --burst "$BURST" | tee -a "$OUT"
SW_COST_BIG=$(per_send "$R1" "$MEMBERS" "$P1")
SW_COST_SMALL=$(per_send "$R1" 10 "$P1")
for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
pids=()

log "swift-channels with history on (PEERCHAT_HISTORY=1: every room message gets an offset, kept for recovery)"
RH=$(free_port); start_redis "$RH"
LAYER="redis://127.0.0.1:$RH/0"
PH1=$(free_port); PH2=$(free_port)
for port in "$PH1" "$PH2"; do
  PEERCHAT_HISTORY=1 "$APP" runserver --noworker --layer "$LAYER" --port "$port" > "$RUN_DIR/hserver-$port.log" 2>&1 &
  pids+=($!)
done
for _ in 1 2; do PEERCHAT_HISTORY=1 "$APP" runworker --layer "$LAYER" > "$RUN_DIR/hworker-$RANDOM.log" 2>&1 & pids+=($!); done
wait_http "$PH1"; wait_http "$PH2"
$CLIENT swift-channels-history "$PH1,$PH2" --members "$MEMBERS" --messages "$MESSAGES" --burst "$BURST" --json | tee -a "$OUT"
for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
pids=()

log "Channels 4.3: Daphne 4 + channels_redis 4.3 (../shared/peers/run_channels4.sh)"
R2=$(free_port); start_redis "$R2"
P4=$(free_port)
"$PEERS/run_channels4.sh" start "$P4" "$R2" >/dev/null
$CLIENT channels4 "$P4" --members "$MEMBERS" --messages "$MESSAGES" --burst "$BURST" | tee -a "$OUT"
C4_COST_BIG=$(per_send "$R2" "$MEMBERS" "$P4")
C4_COST_SMALL=$(per_send "$R2" 10 "$P4")
"$PEERS/run_channels4.sh" stop >/dev/null

python3 - "$OUT" "$SW_COST_BIG" "$SW_COST_SMALL" "$C4_COST_BIG" "$C4_COST_SMALL" "$MEMBERS" <<'PY'
import json, sys
rows = {r["stack"]: r for r in map(json.loads, open(sys.argv[1]))}
sw, c4 = rows["swift-channels"], rows["channels4"]
members = sys.argv[6]
print()
print("%-16s %12s %14s %14s %16s %18s %16s" % ("stack", "delivered", "to-all p50 ms", "to-all p99 ms",
      "burst deliv/s", "Redis cmds/send(%s)" % members, "cmds/send(10)"))
for r, big, small in ((sw, sys.argv[2], sys.argv[3]), (c4, sys.argv[4], sys.argv[5])):
    print("%-16s %11.1f%% %14s %14s %16s %18s %16s" % (r["stack"], 100.0 * r["delivered"] / r["expected"],
          r["to_all_p50_ms"], r["to_all_p99_ms"], r["burst_deliveries_per_s"], big, small))
if sw["to_all_p50_ms"] and c4["to_all_p50_ms"]:
    print("\nto-all p50: ours is %.2fx Channels 4's time (target: at most 0.33x)" % (sw["to_all_p50_ms"] / c4["to_all_p50_ms"]))
print("burst deliveries/s: %.2fx Channels 4" % (sw["burst_deliveries_per_s"] / max(1, c4["burst_deliveries_per_s"])))
hist = rows.get("swift-channels-history")
if hist:
    print("history on (offsets, recovery): delivered %.1f%%, to-all p50 %s ms (off: %s ms, %.2fx), burst %s deliveries/s (%.2fx off)" % (
        100.0 * hist["delivered"] / hist["expected"], hist["to_all_p50_ms"], sw["to_all_p50_ms"],
        hist["to_all_p50_ms"] / max(0.01, sw["to_all_p50_ms"]), hist["burst_deliveries_per_s"],
        hist["burst_deliveries_per_s"] / max(1, sw["burst_deliveries_per_s"])))
PY
