#!/usr/bin/env bash
# Presence and recovery figures, each beside a raw-Redis reference measured in the same run:
#   - recovery: reading the 1,000 messages a socket missed (our history read, on Redis and in
#     memory) against redis-benchmark's XRANGE of the same 1,000 stream entries;
#   - presence: listing a group of 10,000 present connections against redis-benchmark's
#     HGETALL of the same 10,000-field hash;
#   - end to end: a socket that missed 1,000 messages reconnects (PeerChat with history, 1
#     runserver --noworker + 1 runworker): time from connect to its `recovered` marker, with
#     every missed message before it.
#
#   scripts/bench-realtime.sh        (about a minute)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench/common.sh
BIN="$(release_bins_of_this_tree)"
RUN_DIR=$(mktemp -d)
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; stop_redis "$RUN_DIR"; rm -rf "$RUN_DIR" "$BIN"; }
trap cleanup EXIT
start_redis "$RUN_DIR"
PORT=$REDIS_PORT
PY=python3; [ -x .venv-interop/bin/python ] && PY=.venv-interop/bin/python
PREFIX="rt$RANDOM:"
log "layer figures (ChannelsBench realtime)"
LAYER_JSON=$("$BIN/ChannelsBench" realtime "$REDIS" "$PREFIX")
raw_ms() { # redis-benchmark: ms per command, one client
  redis-benchmark -p "$PORT" -c 1 -n "$1" -q "${@:2}" | awk '/requests per second/ {for (i = 1; i <= NF; i++) if ($i ~ /^[0-9.]+$/) {print 1000 / $i; exit}}'
}
XRANGE_MS=$(raw_ms 200 XRANGE "${PREFIX}history:bench-rec" "2-0" "+")
HGETALL_MS=$(raw_ms 50 HGETALL "${PREFIX}presence:bench-presence")

log "end to end: a socket that missed 1,000 messages reconnects"
APP_PORT=$(free_port)
LAYER="$REDIS?prefix=e2e$RANDOM:"
PEERCHAT_HISTORY=1 "$BIN/PeerChat" runserver --noworker --layer "$LAYER" --port "$APP_PORT" --access-log /dev/null > "$RUN_DIR/s.log" 2>&1 & pids+=($!)
PEERCHAT_HISTORY=1 "$BIN/PeerChat" runworker --layer "$LAYER" > "$RUN_DIR/w.log" 2>&1 & pids+=($!)
for _ in $(seq 1 100); do curl -s -o /dev/null "http://127.0.0.1:$APP_PORT/hello" && break; sleep 0.1; done
E2E_JSON=$("$PY" - "$APP_PORT" <<'PY'
import asyncio, json, sys, time
try:
    import websockets
except ImportError:
    print(json.dumps({"skipped": "python3 has no websockets (pip install websockets)"})); sys.exit(0)
port = int(sys.argv[1])
async def main():
    url = "ws://127.0.0.1:%d/recover/" % port
    times = []
    for attempt in range(5):
        x = await websockets.connect(url, max_queue=None)
        y = await websockets.connect(url, max_queue=None)
        await y.send("first")
        last = None
        while last is None:
            event = json.loads(await asyncio.wait_for(x.recv(), 30))
            if event.get("text") == "first": last = event
        await x.close()
        # In steps of 50 (a flood faster than the server reads would have group sends skip the
        # poster's own full channel: at most once, as in Channels).
        seen = 0
        for step in range(0, 1000, 50):
            for i in range(step, step + 50): await y.send("missed %d %d" % (attempt, i))
            while seen < step + 50:
                event = json.loads(await asyncio.wait_for(y.recv(), 30))
                if event.get("text", "").startswith("missed %d " % attempt): seen += 1
        start = time.perf_counter()
        x2 = await websockets.connect(url + "?offset=%d&epoch=%s" % (last["offset"], last["epoch"]), max_queue=None)
        got = 0
        while True:
            event = json.loads(await asyncio.wait_for(x2.recv(), 30))
            if event.get("type") == "recovered":
                break
            if "text" in event: got += 1
        times.append((time.perf_counter() - start) * 1000)
        assert got == 1000 and event["complete"], (got, event)
        await x2.close(); await y.close()
    times.sort()
    print(json.dumps({"recover_1000_reconnect_ms_p50": round(times[len(times) // 2], 1)}))
try:
    asyncio.run(main())
except (asyncio.TimeoutError, AssertionError) as error:
    print(json.dumps({"failed": "%r" % (error,)}))
PY
)
python3 - "$LAYER_JSON" "$E2E_JSON" "$XRANGE_MS" "$HGETALL_MS" <<'PY'
import json, sys
layer, e2e = json.loads(sys.argv[1]), json.loads(sys.argv[2])
xrange_ms, hgetall_ms = float(sys.argv[3]), float(sys.argv[4])
print()
print("recovery of 1,000 missed messages (history read):  Redis %.2f ms, in memory %.2f ms; raw XRANGE of 1,000 entries %.2f ms (ours %.2fx)" % (
    layer["recovery_1000_ms_redis"], layer["recovery_1000_ms_memory"], xrange_ms, layer["recovery_1000_ms_redis"] / xrange_ms))
print("presence list of 10,000 connections:               Redis %.2f ms, in memory %.2f ms; raw HGETALL of 10,000 fields %.2f ms (ours %.2fx)" % (
    layer["presence_list_10000_ms_redis"], layer["presence_list_10000_ms_memory"], hgetall_ms, layer["presence_list_10000_ms_redis"] / hgetall_ms))
if "skipped" in e2e:
    print("end to end: SKIPPED:", e2e["skipped"])
elif "failed" in e2e:
    print("end to end: FAILED:", e2e["failed"])
else:
    print("end to end: reconnect to the recovered marker with 1,000 missed messages before it: p50 %.1f ms" % e2e["recover_1000_reconnect_ms_p50"])
PY
