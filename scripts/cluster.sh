#!/usr/bin/env bash
# A local deployment: a Redis on a free port, one `chat runserver --noworker`, N `chat runworker`s
# and one `chat rundelay`. Chat messages and accounts go to $CHAT_DATABASE (default ./chat.sqlite3).
#   scripts/cluster.sh [--workers N] [--port PORT]      (Ctrl-C stops everything it started)
set -euo pipefail
cd "$(dirname "$0")/.."
WORKERS=2
PORT=8000
while [ $# -gt 0 ]; do
  case "$1" in
    --workers) WORKERS=$2; shift 2 ;;
    --port) PORT=$2; shift 2 ;;
    *) echo "usage: $0 [--workers N] [--port PORT]" >&2; exit 2 ;;
  esac
done
swift build -c release --package-path Examples --product chat >/dev/null
CHAT="$(swift build -c release --package-path Examples --show-bin-path)/chat"
RUN_DIR=$(mktemp -d)
REDIS_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --daemonize yes \
  --pidfile "$RUN_DIR/redis.pid" --logfile "$RUN_DIR/redis.log" --dir "$RUN_DIR"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  kill "$(cat "$RUN_DIR/redis.pid")" 2>/dev/null || true
  rm -rf "$RUN_DIR"
}
trap cleanup EXIT INT TERM
for _ in $(seq 1 100); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
LAYER="redis://127.0.0.1:$REDIS_PORT/0"
"$CHAT" runserver --noworker --layer "$LAYER" --port "$PORT" & pids+=($!)
for i in $(seq 1 "$WORKERS"); do "$CHAT" runworker --layer "$LAYER" & pids+=($!); done
"$CHAT" rundelay --layer "$LAYER" & pids+=($!)
echo "cluster: http://127.0.0.1:$PORT/  (redis $LAYER, $WORKERS workers) — Ctrl-C to stop"
wait
