#!/usr/bin/env bash
# WebSocket echo p99 idle and under 50 concurrent logins (PBKDF2 at 870,000 rounds on the hashing
# pool): `scripts/bench-login.sh [CHAT_BINARY]` (default: the release build of the example).
# The login rate limits are raised for the run; every echo is checked.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bench/common.sh
CHAT=${1:-${CHAT:-Examples/.build/release/chat}}
PY=${PYTHON:-.venv-interop/bin/python}
DIR=$(mktemp -d)
PORT=$(free_port)
cleanup() { [ -f "$DIR/server.pid" ] && kill "$(cat "$DIR/server.pid")" 2>/dev/null; rm -rf "$DIR"; }
trap cleanup EXIT
# PIN=1: the server on CPU 0 and the load generator on CPU 1, as if on another machine (the
# Python clients otherwise take the server's CPU, and their scheduling shows up as echo latency).
SERVER_CPU=() LOAD_CPU=()
if [ "${PIN:-0}" = 1 ] && [ "$(nproc)" -ge 2 ]; then SERVER_CPU=(taskset -c 0) LOAD_CPU=(taskset -c 1); fi
CHAT_DATABASE="$DIR/chat.sqlite3" CHAT_LOGIN_ATTEMPTS_PER_ADDRESS=1000000 CHAT_LOGIN_ATTEMPTS_PER_NAME=1000000 \
  "${SERVER_CPU[@]}" ${WRAP:-} "$CHAT" runserver --port "$PORT" > "$DIR/server.log" 2>&1 &
echo $! > "$DIR/server.pid"
for _ in $(seq 1 200); do curl -sf "http://127.0.0.1:$PORT/hello/x" >/dev/null 2>&1 && break; sleep 0.1; done
log "chat runserver on $PORT ($CHAT); ${LOGINS:-50} logins, ${ECHOES:-400} echoes per phase"
"${LOAD_CPU[@]}" "$PY" scripts/bench/login_load.py "$PORT" "${LOGINS:-50}" "${ECHOES:-400}"
