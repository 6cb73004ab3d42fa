#!/usr/bin/env bash
# The test command: installs what is missing, starts a throwaway Redis on a free loopback
# port, runs every test (Swift, interop with Python asgi_redis, end to end) and stops what it
# started. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

# The whole run has a bound (TEST_TIMEOUT seconds, 40 minutes by default): whatever hangs, the
# command fails instead of hanging CI. `timeout` signals its whole process group; the trap below
# still stops the Redis this script started.
if [ -z "${CHANNELS_TEST_BOUNDED:-}" ]; then
  export CHANNELS_TEST_BOUNDED=1
  exec timeout --kill-after=30 "${TEST_TIMEOUT:-2400}" "$0" "$@"
fi
if [ -n "${E2E_ONLY:-}" ]; then
  echo "scripts/test.sh runs every test: unset E2E_ONLY (=$E2E_ONLY) to run it; use it with the e2e scripts directly" >&2
  exit 2
fi

log() { printf '==> [%s] %s\n' "$(date +%T)" "$*"; }

# --- 1. System packages -------------------------------------------------------------------
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v redis-sentinel >/dev/null 2>&1 || missing+=(redis-sentinel)   # the Sentinel failover test
command -v openssl >/dev/null 2>&1 || missing+=(openssl)                 # certificates for the TLS tests
command -v ip >/dev/null 2>&1 || missing+=(iproute2)                      # scripts/cluster-netns.sh
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
if ! pkg-config --exists hiredis 2>/dev/null; then missing+=(libhiredis-dev); fi
if ! pkg-config --exists sqlite3 2>/dev/null; then missing+=(libsqlite3-dev); fi
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v faketime >/dev/null 2>&1 || missing+=(faketime)               # a worker with its clock off (ordering e2e)
# For the browser test of the example's page: headless Chromium driven by Selenium.
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# --- 2. Python venv with the real asgi_redis 1.4.3 for the interop tests ------------------------
VENV="$ROOT/.venv-interop"
if ! "$VENV/bin/python" -c 'import asgi_redis, msgpack, redis, websockets, selenium, cryptography, h2' >/dev/null 2>&1; then
  log "building $VENV (asgi_redis 1.4.3, msgpack-python 0.5.6, redis 2.10.6, asgiref 1.1.2, cryptography, h2)"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check \
    'asgi_redis==1.4.3' 'msgpack-python==0.5.6' 'redis==2.10.6' 'asgiref==1.1.2' \
    'websockets==12.0' 'selenium==4.27.1' 'cryptography==50.0.2' 'h2==4.1.0'
fi
export INTEROP_PYTHON="$VENV/bin/python"

# --- 3. A throwaway Redis ---------------------------------------------------------------------
RUN_DIR=$(mktemp -d)
REDIS_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cleanup() {
  if [ -f "$RUN_DIR/run-sh.pid" ]; then kill "$(cat "$RUN_DIR/run-sh.pid")" 2>/dev/null || true; fi
  if [ -f "$RUN_DIR/redis.pid" ]; then kill "$(cat "$RUN_DIR/redis.pid")" 2>/dev/null || true; fi
  rm -rf "$RUN_DIR"
}
trap cleanup EXIT
trap 'echo "scripts/test.sh: stopped by a signal (the TEST_TIMEOUT bound?)" >&2; exit 124' TERM INT
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
  --daemonize yes --pidfile "$RUN_DIR/redis.pid" --logfile "$RUN_DIR/redis.log" --dir "$RUN_DIR"
for _ in $(seq 1 100); do
  redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break
  sleep 0.1
done
export REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0"
log "redis-server on $REDIS_URL (pid $(cat "$RUN_DIR/redis.pid"))"

# --- 4. Tests ---------------------------------------------------------------------------------
log "swift format lint (.swift-format)"
swift format lint --strict -r Sources Tests Package.swift Examples Benchmarks/Package.swift Benchmarks/Sources Benchmarks/Benchmarks
log "documentation: every public declaration has a /// comment"
python3 scripts/check-docs.py
log "the Redis trait: without it the commands link no hiredis, and compile"
scripts/check-traits.sh
log "building the libraries and tests, then the examples (a package of their own, in Examples/.build)"
swift build --build-tests
log "documentation: DocC for every library, warnings as errors (broken symbol links fail)"
scripts/check-docc.sh
swift build --package-path Examples
CHAT="$(swift build --package-path Examples --show-bin-path)/chat"
log "swift test"
dump_before=$(stat -c %Y dump.rdb 2>/dev/null || echo none)
swift test --skip-build 2>&1 | tee "$RUN_DIR/swift-test.log"
status=${PIPESTATUS[0]}
if [ "$status" -ne 0 ]; then
  log "swift test failed ($status)"
  exit "$status"
fi
if grep -q "Test run with 0 tests" "$RUN_DIR/swift-test.log"; then
  log "swift test ran no test"
  exit 1
fi
# The tests' redis-servers (replicas included) work in directories of their own: a Redis file
# written into the checkout means one of them ran here.
if [ "$(stat -c %Y dump.rdb 2>/dev/null || echo none)" != "$dump_before" ]; then
  log "a test's redis-server wrote dump.rdb into the checkout (give it a --dir of its own)"
  exit 1
fi
log "end to end: real runserver / runworker processes, real HTTP and WebSocket clients"
"$INTEROP_PYTHON" Tests/e2e/test_e2e.py "$CHAT" "$REDIS_URL"
log "security, as an attacker: session takeover from logs/stats/Redis, cross-site sockets, Host, CSRF, login limits, cookies"
"$INTEROP_PYTHON" Tests/e2e/test_security.py "$CHAT" "$REDIS_URL"
log "secrets never printed (URLs, env and files), two tenants on one Redis, the session-churn bound"
"$INTEROP_PYTHON" Tests/e2e/test_secrets.py "$CHAT" "$REDIS_URL"
log "the front door under attack: slow-loris, idle floods, held upgrades, unread downloads, large uploads, bursts, SSE, TLS + HTTP/2, rapid reset"
"$INTEROP_PYTHON" Tests/e2e/test_front_door.py "$CHAT" "$REDIS_URL"
log "delivery under load: 1,000-member rooms, busy rooms, bursts, Redis and worker SIGKILLs, slow clients"
"$INTEROP_PYTHON" Tests/e2e/test_delivery.py "$CHAT" "$REDIS_URL"
log "presence and recovery: 100 sockets on 2 servers (one SIGKILLed), 200 missed messages recovered through a third server, gaps, a lost history"
"$INTEROP_PYTHON" Tests/e2e/test_realtime.py "$CHAT" "$REDIS_URL"
log "production Redis: every process over TLS with encryption (and asgi_redis), a Sentinel failover under 50 sockets"
"$INTEROP_PYTHON" Tests/e2e/test_production_redis.py "$CHAT" "$REDIS_URL"
log "across machines: scripts/cluster-netns.sh (7 hosts in network namespaces: 2 Redis shards, 2 servers, 2 workers, client; a partition by nft)"
bash scripts/cluster-netns.sh "$CHAT" "$INTEROP_PYTHON"
log "browser: two headless Chromium sessions chat through the example's page"
"$INTEROP_PYTHON" Tests/browser/test_browser.py "$CHAT" "$ROOT/test-artifacts"
log "browser: the live operations page (runserver --admin) in headless Chromium, and stats --server"
"$INTEROP_PYTHON" Tests/browser/test_admin_page.py "$CHAT" "$ROOT/test-artifacts"
log "the README's first command: scripts/run.sh serves the example on the in-memory default"
RUN_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
CHAT_DATABASE="$RUN_DIR/run-sh.sqlite3" bash scripts/run.sh --port "$RUN_PORT" > "$RUN_DIR/run-sh.log" 2>&1 &
echo $! > "$RUN_DIR/run-sh.pid"
answer=""
for _ in $(seq 1 300); do
  answer=$(curl -sf "http://127.0.0.1:$RUN_PORT/hello/world" 2>/dev/null || true)
  [ -n "$answer" ] && break
  sleep 0.2
done
kill -TERM "$(cat "$RUN_DIR/run-sh.pid")" 2>/dev/null || true
wait "$(cat "$RUN_DIR/run-sh.pid")" 2>/dev/null || true
rm -f "$RUN_DIR/run-sh.pid"
if [ "$answer" != "Hello world! You asked for /hello/world" ]; then
  log "scripts/run.sh did not serve the example (answer: '$answer'); its output:"
  cat "$RUN_DIR/run-sh.log"
  exit 1
fi
log "docker-compose config"
docker-compose -f docker-compose.yml config -q
log "all tests passed"
