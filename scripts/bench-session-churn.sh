#!/usr/bin/env bash
# Session churn benchmark (issue 26, bounded storage): 10,000 WebSockets, each joins a chat room
# (/chat/<room>/), posts one message, waits for it to come back and closes, on the in-memory layer
# (one `runserver --metrics-port`) and on Redis (`runserver --noworker` + `runworker`, a
# redis-server of this script's own on a free port). Afterwards it prints the sockets, the
# messages sent and received, and the sessions left: `channels_sessions_stored` from /metrics
# (the in-memory store) and the `<prefix>session:*` keys in Redis, each with its peak during the
# churn, and channels_dropped_total by reason. Exits non-zero when more than BOUND sessions are
# left on a layer (or the figure is missing); messages that did not come back are a NOTE.
#
#   scripts/bench-session-churn.sh [CHAT_BINARY]     (default: $CHAT)
#
# It builds nothing: give it a built chat binary (e.g. Examples/.build/debug/chat, or a release
# build for figures worth comparing). Settings (environment): SOCKETS=10000 CONCURRENCY=100
# WORKERS=1 (runworkers on Redis) BOUND=10 SETTLE=30 (seconds to wait for the sessions to go)
# LAYERS=memory,redis PYTHON=.venv-interop/bin/python (needs websockets; scripts/test.sh makes it).
# The driver is Tests/e2e/session_churn.py (also used by Tests/e2e/test_secrets.py, 1,000 sockets).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

CHAT_BIN=${1:-${CHAT:-}}
if [ -z "$CHAT_BIN" ]; then
  echo "usage: $0 CHAT_BINARY   (or CHAT=path $0); this script builds nothing" >&2
  exit 2
fi
if [ ! -x "$CHAT_BIN" ]; then
  echo "$CHAT_BIN is not an executable: build it first (swift build --package-path Examples --product chat)" >&2
  exit 2
fi
case "$CHAT_BIN" in /*) ;; *) CHAT_BIN="$ROOT/$CHAT_BIN" ;; esac
SOCKETS=${SOCKETS:-10000}
CONCURRENCY=${CONCURRENCY:-100}
WORKERS=${WORKERS:-1}
BOUND=${BOUND:-10}
SETTLE=${SETTLE:-30}
LAYERS=${LAYERS:-memory,redis}
PYTHON=${PYTHON:-$ROOT/.venv-interop/bin/python}
if ! "$PYTHON" -c 'import websockets' >/dev/null 2>&1; then
  echo "$PYTHON cannot import websockets: set PYTHON= (scripts/test.sh builds .venv-interop)" >&2
  exit 2
fi

log() { printf '==> %s\n' "$*" >&2; }
free_port() { "$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

RUN_DIR=$(mktemp -d -t bench-session-churn.XXXXXX)
REDIS_PID=""
status=0
cleanup() {
  if [ -n "$REDIS_PID" ]; then
    kill "$REDIS_PID" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$REDIS_PID" 2>/dev/null || break; sleep 0.1; done
  fi
  if [ "$status" -eq 0 ]; then rm -rf "$RUN_DIR"; else log "logs kept in $RUN_DIR"; fi
}
trap cleanup EXIT

REDIS_ARGS=()
if [[ ",$LAYERS," == *",redis,"* ]]; then
  REDIS_PORT=$(free_port)
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --daemonize yes \
    --pidfile "$RUN_DIR/redis.pid" --logfile "$RUN_DIR/redis.log" --dir "$RUN_DIR"
  for _ in $(seq 1 100); do
    [ -s "$RUN_DIR/redis.pid" ] && redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break
    sleep 0.1
  done
  REDIS_PID=$(cat "$RUN_DIR/redis.pid")
  redis-cli -p "$REDIS_PORT" ping >/dev/null || { echo "redis-server did not start on $REDIS_PORT" >&2; status=1; exit 1; }
  log "redis-server on 127.0.0.1:$REDIS_PORT (pid $REDIS_PID)"
  REDIS_ARGS=(--redis-port "$REDIS_PORT")
fi

log "$SOCKETS sockets per layer ($LAYERS), $CONCURRENCY at a time, with $CHAT_BIN"
"$PYTHON" "$ROOT/Tests/e2e/session_churn.py" --chat "$CHAT_BIN" --sockets "$SOCKETS" --concurrency "$CONCURRENCY" \
  --layers "$LAYERS" --workers "$WORKERS" --bound "$BOUND" --settle "$SETTLE" --logdir "$RUN_DIR/logs" \
  "${REDIS_ARGS[@]}" || status=$?
exit "$status"
