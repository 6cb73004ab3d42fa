#!/usr/bin/env bash
# HTTP/2 over TLS with h2load (Debian nghttp2-client), one run, one machine:
#   swift   PeerChat runserver --tls-cert/--tls-key (in-process workers, in-memory layer)
#   daphne  Daphne 4 with TLS + HTTP/2 (twisted[tls,http2]) serving ../shared/peers/channels4
# both answering GET /hello/ from a consumer, each a single process. Prints req/s and the ratio.
#
#   scripts/bench-h2.sh                   (N=20000 requests, C=10 connections x M=10 streams)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PEERS="${PEERS_DIR:-$ROOT/../shared/peers}"
export PEERS_STATE="$ROOT/.bench-state"
N=${N:-20000}; C=${C:-10}; M=${M:-10}
. scripts/bench/common.sh
command -v h2load >/dev/null || { log "installing nghttp2-client (h2load)"; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nghttp2-client >/dev/null; }
if [ -n "${CHANNELS_BIN_DIR:-}" ]; then BIN="$CHANNELS_BIN_DIR"; else
  log "release build"
  swift build -c release --package-path Examples --product PeerChat >/dev/null
  BIN="$(swift build -c release --package-path Examples --show-bin-path)"
fi
if [ ! -x "$PEERS_STATE/venv4/bin/daphne" ]; then
  log "building the Python Channels 4 stack ($PEERS/setup_channels4.sh -> $PEERS_STATE/venv4)"
  mkdir -p "$PEERS_STATE"; "$PEERS/setup_channels4.sh" "$PEERS_STATE/venv4" >/dev/null
fi
"$PEERS_STATE/venv4/bin/python" -c 'import h2, OpenSSL, service_identity' 2>/dev/null || {
  log "adding TLS and HTTP/2 to Daphne's Twisted (twisted[tls,http2])"
  "$PEERS_STATE/venv4/bin/pip" install -q 'twisted[tls,http2]' >/dev/null; }
RUN_DIR=$(mktemp -d)
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; rm -rf "$RUN_DIR"; }
trap cleanup EXIT
openssl req -x509 -newkey rsa:2048 -nodes -keyout "$RUN_DIR/key.pem" -out "$RUN_DIR/cert.pem" -days 2 \
  -subj "/CN=localhost" -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" 2>/dev/null
wait_tls() { for _ in $(seq 1 150); do curl -sk -o /dev/null "https://127.0.0.1:$1/hello/" && return 0; sleep 0.2; done; return 1; }
run_h2load() { # LABEL PORT
  h2load -n "$N" -c "$C" -m "$M" "https://127.0.0.1:$2/hello/" > "$RUN_DIR/$1.txt" 2>&1 || true
  python3 - "$RUN_DIR/$1.txt" "$1" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
rps = re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", text)
ok = re.search(r"(\d+) succeeded, (\d+) failed", text)
proto = re.search(r"Application protocol: (\S+)", text)
lat = re.search(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)", text)
print("%s %s %s %s %s" % (sys.argv[2], rps.group(1) if rps else "0", ok.group(1) if ok else "0", ok.group(2) if ok else "?", proto.group(1) if proto else "?"))
PY
}
PORT=$(free_port)
"$BIN/PeerChat" runserver --port "$PORT" --tls-cert "$RUN_DIR/cert.pem" --tls-key "$RUN_DIR/key.pem" --access-log /dev/null \
  > "$RUN_DIR/swift.log" 2>&1 & pids+=($!)
wait_tls "$PORT"
run_h2load warmup "$PORT" >/dev/null
SW=$(run_h2load swift "$PORT")
DPORT=$(free_port)
( cd "$PEERS/channels4" && exec "$PEERS_STATE/venv4/bin/daphne" -e "ssl:$DPORT:interface=127.0.0.1:privateKey=$RUN_DIR/key.pem:certKey=$RUN_DIR/cert.pem" \
    chatproj4.asgi:application ) > "$RUN_DIR/daphne.log" 2>&1 & pids+=($!)
wait_tls "$DPORT"
run_h2load dwarmup "$DPORT" >/dev/null
DA=$(run_h2load daphne "$DPORT")
python3 - "$SW" "$DA" "$N" "$C" "$M" <<'PY'
import sys
sw, da = sys.argv[1].split(), sys.argv[2].split()
print("h2load -n %s -c %s -m %s https://127.0.0.1/hello/ (TLS, ALPN)" % tuple(sys.argv[3:6]))
print("%-8s %12s %10s %8s %8s" % ("stack", "req/s", "succeeded", "failed", "proto"))
for row in (sw, da):
    print("%-8s %12s %10s %8s %8s" % tuple(row))
if float(da[1]) > 0:
    print("swift / daphne 4: %.1fx" % (float(sw[1]) / float(da[1])))
PY
