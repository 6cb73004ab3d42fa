#!/usr/bin/env bash
# The front-door attacks at the sizes issue 27 names, against a release build of the example:
# 1,000 slow-loris heads, 5,000 idle connections over a cap of 2,000, 200 held upgrades
# streaming garbage, 20 downloads of 64 MiB nobody reads, 100 concurrent 16 MiB uploads,
# 10,000 frames from one socket among 100 chatting sockets, SSE past --http-timeout, TLS +
# HTTP/2 and an HTTP/2 rapid-reset flood. Each attack prints its bound, the server's RSS peak
# and the probe's (a GET and an echo every 100 ms) p50/p99 idle and under attack.
#
#   scripts/bench-front-door.sh            (about 5 minutes after the build)
# Needs what scripts/test.sh installs (redis-server, openssl, curl, .venv-interop with h2).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench/common.sh
[ -x .venv-interop/bin/python ] || { log "run scripts/test.sh once first (it builds .venv-interop)"; exit 2; }
log "release build of the example"
swift build -c release --package-path Examples --product chat >/dev/null
CHAT="$(swift build -c release --package-path Examples --show-bin-path)/chat"
RUN_DIR=$(mktemp -d)
trap 'stop_redis "$RUN_DIR"; rm -rf "$RUN_DIR"' EXIT
start_redis "$RUN_DIR"
FRONT_DOOR_SCALE=full E2E_TEST_TIMEOUT=600 .venv-interop/bin/python Tests/e2e/test_front_door.py "$CHAT" "$REDIS"
