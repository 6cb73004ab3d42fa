#!/usr/bin/env bash
# Interface server + worker benchmark: our `runserver --noworker` + `runworker` against Daphne
# 1.4.2 + a channels 1.1.8 `runworker` (asgi_redis 1.4.3), on one local Redis, in the same run,
# serving the same application (../shared/peers/channels1 and its Swift twin Examples/Sources/PeerChat).
#
#   scripts/bench-server.sh            (about 4 minutes; DURATION=10 seconds per load step)
#
# Measures: HTTP requests/s and p50/p99 with wrk (50 connections) through 1 worker, then through
# 2 and 4 Swift workers; WebSocket echo RTT with 1 client, echo throughput with 50 and 100
# clients, each with two clients: ../shared/peers/ws_bench.py (Python, the peers' figures) and
# `ChannelsBench ws` (the same protocol in Swift on one event-loop thread: the Python client
# alone needs about 140 us of CPU per echo, so on 2 cores it caps what it can measure); worker
# dispatch rate of a do-nothing consumer from a pre-filled channel; and the RSS/CPU of 10,000
# idle WebSockets on our server.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PEERS="${PEERS_DIR:-$ROOT/../shared/peers}"
export PEERS_STATE="$ROOT/.bench-state"
export CHANNELS1_DB="$PEERS_STATE/channels1.sqlite3"
DURATION=${DURATION:-10}
WORKER_N=${WORKER_N:-20000}

. scripts/bench/common.sh   # log, free_port, start_redis, stop_redis

command -v wrk >/dev/null || { log "installing wrk"; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
# CHANNELS_BIN_DIR=dir measures the PeerChat and ChannelsBench binaries in dir instead (a
# build of an earlier commit, for a before/after comparison in one sitting).
if [ -n "${CHANNELS_BIN_DIR:-}" ]; then
  BIN="$CHANNELS_BIN_DIR"
  BENCH_CLIENT="$BENCH_CLIENT"
  log "measuring the binaries in $BIN"
else
  log "release build"
  swift build -c release --package-path Examples --product PeerChat >/dev/null
  swift build -c release --package-path Benchmarks --product ChannelsBench >/dev/null
  BIN="$(swift build -c release --package-path Examples --show-bin-path)"
  # The client is a product of the Benchmarks package: it lives in that package's build.
  BENCH_CLIENT="$(swift build -c release --package-path Benchmarks --show-bin-path)/ChannelsBench"
fi
APP="$BIN/PeerChat"
[ -x "$BENCH_CLIENT" ] || { log "no ChannelsBench at $BENCH_CLIENT"; exit 2; }
if [ ! -x "$PEERS_STATE/venv1/bin/daphne" ]; then
  log "building the Python Channels 1.x stack ($PEERS/setup_channels1.sh -> $PEERS_STATE/venv1)"
  "$PEERS/setup_channels1.sh" >/dev/null
fi
PY1="$PEERS_STATE/venv1/bin/python"
CLIENT_PY="$ROOT/.venv-interop/bin/python"   # websockets, for ws_bench.py and the idle-socket client
"$CLIENT_PY" -c 'import websockets' 2>/dev/null || { log "run scripts/test.sh once first (it builds .venv-interop)"; exit 1; }

RUN_DIR=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  "$PEERS/run_channels1.sh" stop >/dev/null 2>&1 || true
  stop_redis "$RUN_DIR"
  rm -rf "$RUN_DIR"
}
trap cleanup EXIT
start_redis "$RUN_DIR"
OUT="$RUN_DIR/results.jsonl"
: > "$OUT"
record() { echo "{\"stack\": \"$1\", \"what\": \"$2\", \"value\": $3}" >> "$OUT"; }

wait_http() { for _ in $(seq 1 150); do curl -s -o /dev/null "http://127.0.0.1:$1/hello" && return 0; sleep 0.2; done; return 1; }

wrk_run() { # wrk_run STACK LABEL PORT
  wrk -t2 -c50 -d"${DURATION}s" --latency "http://127.0.0.1:$3/hello/bench" > "$RUN_DIR/wrk.txt" 2>&1 || true
  python3 - "$RUN_DIR/wrk.txt" "$1" "$2" >> "$OUT" <<'PY'
import json, re, sys
text, stack, label = open(sys.argv[1]).read(), sys.argv[2], sys.argv[3]
def ms(tag):
    m = re.search(r"^\s*%s%%\s+([\d.]+)(us|ms|s)" % tag, text, re.M)
    if not m: return None
    return float(m.group(1)) * {"us": 0.001, "ms": 1, "s": 1000}[m.group(2)]
rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
for what, value in ((label + " req/s", float(rps.group(1)) if rps else 0), (label + " p50 ms", ms("50")),
                    (label + " p99 ms", ms("99")), (label + " non-2xx", int(non2xx.group(1)) if non2xx else 0)):
    print(json.dumps({"stack": stack, "what": what, "value": value}))
PY
}

ws_run() { # ws_run STACK PORT LATENCY_N
  rm -f "$RUN_DIR"/lat*.json "$RUN_DIR"/tp*.json
  "$CLIENT_PY" "$PEERS/ws_bench.py" --url "ws://127.0.0.1:$2" latency --n "$3" --json "$RUN_DIR/lat.json" >/dev/null 2>&1 || true
  "$CLIENT_PY" "$PEERS/ws_bench.py" --url "ws://127.0.0.1:$2" throughput --clients 50 --duration "$DURATION" --json "$RUN_DIR/tp50.json" >/dev/null 2>&1 || true
  "$CLIENT_PY" "$PEERS/ws_bench.py" --url "ws://127.0.0.1:$2" throughput --clients 100 --duration "$DURATION" --json "$RUN_DIR/tp100.json" >/dev/null 2>&1 || true
  "$BENCH_CLIENT" ws "ws://127.0.0.1:$2" latency "$3" > "$RUN_DIR/lat-sw.json" 2>/dev/null || true
  "$BENCH_CLIENT" ws "ws://127.0.0.1:$2" throughput 50 "$DURATION" > "$RUN_DIR/tp50-sw.json" 2>/dev/null || true
  "$BENCH_CLIENT" ws "ws://127.0.0.1:$2" throughput 100 "$DURATION" > "$RUN_DIR/tp100-sw.json" 2>/dev/null || true
  python3 - "$RUN_DIR" "$1" >> "$OUT" <<'PY'
import json, sys
run, stack = sys.argv[1], sys.argv[2]
def load(name):
    try: return json.load(open(run + "/" + name))
    except Exception: return {}
def find(obj, *keys):
    for k in keys:
        if isinstance(obj, dict) and k in obj: obj = obj[k]
        else: return None
    return obj
def dig(d, key):
    # ws_bench.py nests results per mode; find the first dict holding `key`.
    stack_ = [d]
    while stack_:
        x = stack_.pop()
        if isinstance(x, dict):
            if key in x: return x[key]
            stack_.extend(x.values())
    return None
rows = []
for client, suffix in (("py client", ""), ("swift client", "-sw")):
    lat, tp50, tp100 = load("lat%s.json" % suffix), load("tp50%s.json" % suffix), load("tp100%s.json" % suffix)
    rows += [("ws echo 1 client p50 ms (%s)" % client, dig(lat, "median_ms")),
             ("ws echo 1 client p99 ms (%s)" % client, dig(lat, "p99_ms")),
             ("ws echo 50 clients msgs/s (%s)" % client, dig(tp50, "msgs_per_s")),
             ("ws echo 50 clients p50 ms (%s)" % client, dig(tp50, "median_ms")),
             ("ws echo 50 clients p99 ms (%s)" % client, dig(tp50, "p99_ms")),
             ("ws echo 100 clients msgs/s (%s)" % client, dig(tp100, "msgs_per_s")),
             ("ws echo 100 clients p99 ms (%s)" % client, dig(tp100, "p99_ms"))]
for what, value in rows:
    print(json.dumps({"stack": stack, "what": what, "value": value}))
PY
}

drain_rate() { # drain_rate PREFIX -> msgs/s from the first message taken to an empty channel
  python3 - "$REDIS_PORT" "$1bench.noop" "$WORKER_N" <<'PY'
import socket, sys, time
port, key, n = int(sys.argv[1]), sys.argv[2].encode(), int(sys.argv[3])
s = socket.create_connection(("127.0.0.1", port))
def llen():
    s.sendall(b"*2\r\n$4\r\nLLEN\r\n$%d\r\n%s\r\n" % (len(key), key))
    return int(s.recv(64).split(b"\r\n")[0][1:])
deadline = time.time() + 300
while llen() >= n and time.time() < deadline: time.sleep(0.001)
start, first = time.time(), llen()
while llen() > 0 and time.time() < deadline: time.sleep(0.002)
print("%.0f" % (first / (time.time() - start)))
PY
}

# --- Swift ---------------------------------------------------------------------------------
PORT=$(free_port)
LAYER="$REDIS?prefix=sw:&capacity=1000"
log "swift: runserver --noworker + 1 runworker on :$PORT"
"$APP" runserver --noworker --layer "$LAYER" --port "$PORT" --access-log /dev/null > "$RUN_DIR/sw-server.log" 2>&1 & server_pid=$!; pids+=($server_pid)
"$APP" runworker --layer "$LAYER" > "$RUN_DIR/sw-w1.log" 2>&1 & pids+=($!); worker_pids=($!)
wait_http "$PORT"
wrk_run swift "HTTP 1 worker" "$PORT"
ws_run swift "$PORT" 2000
for n in 2 4; do
  while [ ${#worker_pids[@]} -lt "$n" ]; do
    "$APP" runworker --layer "$LAYER" > "$RUN_DIR/sw-w${#worker_pids[@]}.log" 2>&1 & pids+=($!); worker_pids+=($!)
  done
  sleep 1
  log "swift: HTTP through $n workers"
  wrk_run swift "HTTP $n workers" "$PORT"
done
for pid in "${worker_pids[@]}"; do kill "$pid"; done

log "swift: 10,000 idle WebSockets"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
"$APP" runworker --layer "$LAYER" > "$RUN_DIR/sw-idle-w.log" 2>&1 & idle_worker=$!; pids+=($idle_worker)
"$CLIENT_PY" - "$PORT" "$server_pid" >> "$OUT" <<'PY' || true
import asyncio, json, os, resource, sys, time
import websockets
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
port, pid = int(sys.argv[1]), int(sys.argv[2])
def rss_mb():
    for line in open("/proc/%d/status" % pid):
        if line.startswith("VmRSS:"): return int(line.split()[1]) / 1024.0
def cpu_ticks():
    f = open("/proc/%d/stat" % pid).read().split(")")[1].split()
    return int(f[11]) + int(f[12])
async def main():
    before = rss_mb()
    sockets = []
    sem = asyncio.Semaphore(200)
    async def one(i):
        async with sem:
            ws = await websockets.connect("ws://127.0.0.1:%d/idle%d/" % (port, i % 100), ping_interval=None,
                                          open_timeout=60, compression=None)
            sockets.append(ws)
    await asyncio.gather(*(one(i) for i in range(10000)), return_exceptions=True)
    await asyncio.sleep(2)
    c0, t0 = cpu_ticks(), time.time()
    await asyncio.sleep(10)
    cpu = 100.0 * (cpu_ticks() - c0) / os.sysconf("SC_CLK_TCK") / (time.time() - t0)
    for what, value in (("idle sockets open", len(sockets)), ("idle RSS MB (10k sockets)", round(rss_mb(), 1)),
                        ("RSS MB before", round(before, 1)), ("idle CPU % (10k sockets)", round(cpu, 2))):
        print(json.dumps({"stack": "swift", "what": what, "value": value}))
    await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
asyncio.run(main())
PY
kill "$idle_worker" 2>/dev/null || true

log "swift: worker dispatch rate (do-nothing consumer, $WORKER_N queued messages)"
"$BENCH_CLIENT" fill "$REDIS" "swnoop:" bench.noop "$WORKER_N"
"$APP" runworker --layer "$REDIS?prefix=swnoop:" --only-channels bench.noop > "$RUN_DIR/sw-noop.log" 2>&1 & noop_pid=$!; pids+=($noop_pid)
record swift "worker dispatch msgs/s" "$(drain_rate swnoop:)"
kill "$noop_pid" "$server_pid" 2>/dev/null || true
sleep 1

# --- Python: Daphne 1.4.2 + channels 1.1.8 runworker -----------------------------------------
PORT=$(free_port)
log "python: daphne 1.4.2 (--force-sync) + 1 runworker on :$PORT"
"$PEERS/run_channels1.sh" start "$PORT" "$REDIS_PORT" >/dev/null
wait_http "$PORT"
wrk_run python "HTTP 1 worker" "$PORT"
ws_run python "$PORT" 200
"$PEERS/run_channels1.sh" stop >/dev/null

log "python: worker dispatch rate (do-nothing consumer, $WORKER_N queued messages)"
"$BENCH_CLIENT" fill "$REDIS" "pynoop:" bench.noop "$WORKER_N"
( cd "$ROOT/scripts/bench/noop_worker" && PEERS_DIR="$PEERS" REDIS_PORT="$REDIS_PORT" LAYER_PREFIX="pynoop:" \
    "$PY1" manage.py runworker --only-channels bench.noop > "$RUN_DIR/py-noop.log" 2>&1 ) & noop_pid=$!; pids+=($noop_pid)
record python "worker dispatch msgs/s" "$(drain_rate pynoop:)"
pkill -f "noop_worker.*runworker" 2>/dev/null || true
kill "$noop_pid" 2>/dev/null || true

# --- Report ------------------------------------------------------------------------------------
python3 - "$OUT" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
table = {}
order = []
for r in rows:
    if r["what"] not in table: order.append(r["what"])
    table.setdefault(r["what"], {})[r["stack"]] = r["value"]
def fmt(v):
    if v is None: return "-"
    if isinstance(v, float): return "%.2f" % v if v < 100 else "{:,.0f}".format(v)
    return "{:,}".format(v)
print("%-32s %14s %14s %9s" % ("measure", "swift", "python", "ratio"))
for what in order:
    s, p = table[what].get("swift"), table[what].get("python")
    ratio = ""
    if isinstance(s, (int, float)) and isinstance(p, (int, float)) and s and p:
        ratio = "%.1fx" % ((s / p) if ("/s" in what) else (p / s))
    print("%-32s %14s %14s %9s" % (what, fmt(s), fmt(p), ratio))
print("(ratio: how many times better swift is; for latencies python/swift)")
PY
