#!/usr/bin/env bash
# WebSocket echo latency through the example on TWO Redis shards with ONE worker: the case where
# a worker that waits on one shard at a time (asgi_redis's rotation) sits out its wait while a
# message waits on the other shard. (With one sender and one receiver the round-robin of sends
# and the rotation of receives tend to stay in step; SERVERS interface servers, 2 by default,
# as behind a load balancer, break the step.) Runs SERVERS `chat runserver --noworker` + `chat runworker` over
# `--layer redis://A,redis://B` and scripts/bench/shard_latency.py (CLIENTS sockets, each sending,
# awaiting its echo, pausing 0-PAUSE_MS ms: sparse traffic, where the miss shows), for each binary
# given, in the same sitting.
#
#   scripts/bench-shards.sh                                   (the release build of this tree)
#   CHAT=path/to/chat BEFORE_CHAT=path/to/older/chat scripts/bench-shards.sh   (before/after + ratio)
#
# CLIENTS (4), PAUSE_MS (300) and DURATION (20 s) set the load; WS_PATH (/echo/) the socket path
# ("{}" becomes the client's number: WS_PATH=/room{}/ for PeerChat, whose rooms of one echo). Every echo is counted; a lost one fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
CLIENTS=${CLIENTS:-4}
SERVERS=${SERVERS:-2}
PAUSE_MS=${PAUSE_MS:-300}
DURATION=${DURATION:-20}
. scripts/bench/common.sh
PY="$ROOT/.venv-interop/bin/python"
"$PY" -c 'import websockets' 2>/dev/null || { log "run scripts/test.sh once first (it builds .venv-interop)"; exit 1; }
if [ -z "${CHAT:-}" ]; then
  log "release build of the example"
  swift build -c release --package-path Examples --product chat >/dev/null
  CHAT="$(swift build -c release --package-path Examples --show-bin-path)/chat"
fi

RUN_DIR=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for shard in a b; do [ -d "$RUN_DIR/$shard" ] && stop_redis "$RUN_DIR/$shard"; done
  rm -rf "$RUN_DIR"
}
trap cleanup EXIT
urls=()
for shard in a b; do
  mkdir -p "$RUN_DIR/$shard"
  start_redis "$RUN_DIR/$shard"
  urls+=("$REDIS")
done
LAYER="${urls[0]},${urls[1]}"
log "two shards: $LAYER; $SERVERS servers, 1 worker, $CLIENTS clients, pauses of 0-$PAUSE_MS ms, for $DURATION s"

wait_log() { # wait_log FILE TEXT
  for _ in $(seq 1 200); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done
  cat "$1" >&2
  log "FAIL: $1 did not print '$2'"
  exit 1
}
measure() { # measure NAME BINARY -> prints the client's JSON
  local name=$1 binary=$2 port i targets="" started=()
  export CHAT_DATABASE="$RUN_DIR/$name.sqlite3"
  for i in $(seq 1 "$SERVERS"); do
    port=$(free_port)
    "$binary" runserver --noworker --port "$port" --layer "$LAYER" > "$RUN_DIR/$name-server$i.log" 2>&1 &
    started+=($!)
    targets="$targets${targets:+,}127.0.0.1:$port"
  done
  "$binary" runworker --layer "$LAYER" > "$RUN_DIR/$name-worker.log" 2>&1 &
  started+=($!)
  pids+=("${started[@]}")
  for i in $(seq 1 "$SERVERS"); do wait_log "$RUN_DIR/$name-server$i.log" "interface server listening"; done
  wait_log "$RUN_DIR/$name-worker.log" "worker ready"
  "$PY" scripts/bench/shard_latency.py "$targets" "$CLIENTS" "$DURATION" "$PAUSE_MS" "${WS_PATH:-/echo/}" | tee "$RUN_DIR/$name.json"
  kill "${started[@]}" 2>/dev/null || true
  wait "${started[@]}" 2>/dev/null || true
}
if [ -n "${BEFORE_CHAT:-}" ]; then
  log "before: $BEFORE_CHAT"
  measure before "$BEFORE_CHAT" >/dev/null
fi
log "after: $CHAT"
measure after "$CHAT" >/dev/null
SERVERS=$SERVERS "$PY" - "$RUN_DIR" <<'PY'
import json, os, sys
d = sys.argv[1]
rows = {name: json.load(open(os.path.join(d, name + ".json"))) for name in ("before", "after")
        if os.path.exists(os.path.join(d, name + ".json"))}
print("| 2 shards, %s servers, 1 worker, echo | " % os.environ.get("SERVERS", "2") + " | ".join(rows) + (" | after/before |" if len(rows) == 2 else " |"))
print("|---|" + "---:|" * (len(rows) + (1 if len(rows) == 2 else 0)))
for key, label in (("received", "echoes (all counted)"), ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"), ("max_ms", "max ms")):
    values = [rows[name][key] for name in rows]
    cells = ["%.1f" % v if isinstance(v, float) else str(v) for v in values]
    ratio = " | %.2f" % (values[1] / values[0]) if len(values) == 2 and values[0] else (" | " if len(values) == 2 else "")
    print("| %s | %s%s |" % (label, " | ".join(cells), ratio))
PY
