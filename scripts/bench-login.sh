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
CHAT_DATABASE="$DIR/chat.sqlite3" CHAT_LOGIN_ATTEMPTS_PER_ADDRESS=1000000 CHAT_LOGIN_ATTEMPTS_PER_NAME=1000000 \
  "$CHAT" runserver --port "$PORT" > "$DIR/server.log" 2>&1 &
echo $! > "$DIR/server.pid"
for _ in $(seq 1 200); do curl -sf "http://127.0.0.1:$PORT/hello/x" >/dev/null 2>&1 && break; sleep 0.1; done
log "chat runserver on $PORT ($CHAT); ${LOGINS:-50} logins, ${ECHOES:-400} echoes per phase"
"$PY" scripts/bench/login_load.py "$PORT" "${LOGINS:-50}" "${ECHOES:-400}"
