#!/usr/bin/env bash
# Channel layer benchmark: our Redis layer, Python asgi_redis 1.4.3 and raw Redis, against one
# local Redis in the same run. Prints msgs/s, latencies, Redis CPU % and the ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
N=${N:-20000}
PEERS="$ROOT/../shared/peers"

# CHANNELS_BIN_DIR=dir measures the ChannelsBench binary in dir instead (before/after comparisons).
if [ -n "${CHANNELS_BIN_DIR:-}" ]; then
  BENCH="$CHANNELS_BIN_DIR/ChannelsBench"
else
  swift build -c release --package-path Benchmarks --product ChannelsBench >/dev/null
  BENCH="$(swift build -c release --package-path Benchmarks --show-bin-path)/ChannelsBench"
fi

# The Python reference: the peers' venv (msgpack C extension) if built, else ours.
PY="${PEERS_PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x "$ROOT/.bench-state/venv1/bin/python" ]; then PY="$ROOT/.bench-state/venv1/bin/python";
  elif [ -x "$PEERS/.state/venv1/bin/python" ]; then PY="$PEERS/.state/venv1/bin/python"; else
    PY="$ROOT/.venv-interop/bin/python"
    if ! "$PY" -c 'import asgi_redis' >/dev/null 2>&1; then
      python3 -m venv "$ROOT/.venv-interop"
      "$ROOT/.venv-interop/bin/pip" install -q 'asgi_redis==1.4.3' 'msgpack-python==0.5.6' 'redis==2.10.6' 'asgiref==1.1.2' 'websockets==12.0'
    fi
  fi
fi

RUN_DIR=$(mktemp -d)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
redis-server --port "$PORT" --bind 127.0.0.1 --save "" --appendonly no --daemonize yes \
  --pidfile "$RUN_DIR/redis.pid" --logfile "$RUN_DIR/redis.log" --dir "$RUN_DIR"
trap 'kill "$(cat "$RUN_DIR/redis.pid")" 2>/dev/null || true; sleep 0.3; rm -rf "$RUN_DIR" 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do redis-cli -p "$PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
REDIS_PID=$(cat "$RUN_DIR/redis.pid")

cpu_ticks() { awk '{print $14 + $15}' "/proc/$REDIS_PID/stat"; }
measure() { # measure NAME COMMAND... -> runs it, prints Redis CPU % during the run
  local name=$1 t0 c0 t1 c1
  shift
  t0=$(date +%s.%N); c0=$(cpu_ticks)
  "$@" > "$RUN_DIR/$name.out" 2>&1 || true
  t1=$(date +%s.%N); c1=$(cpu_ticks)
  python3 -c "print('%.0f' % (100.0 * ($c1 - $c0) / $(getconf CLK_TCK) / ($t1 - $t0)))"
}

# asgi_redis with one sender process and one receiver process running together.
cat > "$RUN_DIR/together.py" <<'PY'
import subprocess, sys, time
from asgi_redis import RedisChannelLayer
port, n, role = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
layer = RedisChannelLayer(hosts=[("127.0.0.1", port)], prefix="pytog:", capacity=2 * n)
body = {"payload": b"a" * 100}
if role == "send":
    for _ in range(n):
        layer.send("bench.both", body)
    sys.exit(0)
start = time.perf_counter()
sender = subprocess.Popen([sys.executable, __file__, str(port), str(n), "send"])
got = 0
while got < n:
    channel, _ = layer.receive(["bench.both"], block=True)
    if channel:
        got += 1
sender.wait()
print('{"together_msgs_per_s": %.0f}' % (n / (time.perf_counter() - start)))
PY
if [ "${ONLY_TLS_ENC:-0}" != 1 ]; then
swift_cpu=$(measure swift "$BENCH" "redis://127.0.0.1:$PORT/0" "$N")
py_cpu=$(measure python "$PY" "$PEERS/layer_bench.py" --port "$PORT" -n "$N" --phases tp,pingpong,fanout --json "$RUN_DIR/python.json")
redis-benchmark -p "$PORT" -q -n 200000 -c 50 -t lpush,lpop > "$RUN_DIR/raw.out" 2>&1

"$PY" "$RUN_DIR/together.py" "$PORT" "$N" receive > "$RUN_DIR/python-together.out" 2>&1 || true

python3 - "$RUN_DIR" "$swift_cpu" "$py_cpu" <<'PY'
import json, re, sys
run, swift_cpu, py_cpu = sys.argv[1], sys.argv[2], sys.argv[3]
swift = json.loads(open(run + "/swift.out").read().strip().splitlines()[-1])
try:
    py = json.load(open(run + "/python.json"))
except Exception:
    py = {}
try:
    py.update(json.loads(open(run + "/python-together.out").read().strip().splitlines()[-1]))
except Exception:
    pass
raw = open(run + "/raw.out").read()
def get(obj, *keys):
    for k in keys:
        if isinstance(obj, dict) and k in obj:
            obj = obj[k]
        else:
            return None
    return obj
rows = [
    ("sequential send (msg/s)", swift.get("seq_send_per_s"), get(py, "throughput_block=True", "send_msgs_per_s"), True),
    ("sequential receive, blocking (msg/s)", swift.get("seq_receive_per_s"), get(py, "throughput_block=True", "receive_msgs_per_s"), True),
    ("1 sender + 1 receiver together (msg/s)", swift.get("together_msgs_per_s"), py.get("together_msgs_per_s"), True),
    ("together, 64 sends in flight + 8 receive loops", swift.get("concurrent_msgs_per_s"), py.get("together_msgs_per_s"), True),
    ("together, 64 sends in flight + 1 batch receiver", swift.get("batched_msgs_per_s"), py.get("together_msgs_per_s"), True),
    ("send->reply RTT p50 (ms)", swift.get("rtt_p50_ms"), (get(py, "pingpong", "median_us") or 0) / 1000 or None, False),
    ("send->reply RTT p99 (ms)", swift.get("rtt_p99_ms"), (get(py, "pingpong", "p99_us") or 0) / 1000 or None, False),
    ("sendGroup to 100 members p50 (ms)", swift.get("group100_p50_ms"), get(py, "fanout_normal", "group_send_call", "median_us") and get(py, "fanout_normal", "group_send_call", "median_us") / 1000, False),
]
print("== channel layer benchmark: one local Redis, same run ==")
print("%-48s %12s %12s %8s" % ("", "swift", "asgi_redis", "ratio"))
for name, s, p, higher in rows:
    ratio = ""
    if s and p:
        ratio = "%.1fx" % ((s / p) if higher else (p / s))
    fmt = lambda v: "-" if v is None else ("%.3f" % v if v < 100 else "{:,.0f}".format(v))
    print("%-48s %12s %12s %8s" % (name, fmt(s), fmt(p), ratio))
print("Redis CPU during the swift run: %s %%, during the python run: %s %%" % (swift_cpu, py_cpu))
for line in raw.splitlines():
    if "requests per second" in line:
        print("raw redis-benchmark (50 clients): " + line.strip())
PY
fi

# --- TLS vs plain, encryption on vs off (ONLY_TLS_ENC=1 runs just this part) ------------------
# A second Redis with a TLS port beside its plain one (certificates made here with openssl): our
# layer over each, same run; then asgi_redis's Fernet encryption on one Redis, ours and Python's
# with the same key.
N2=${N_TLS:-10000}
CERTS="$RUN_DIR/certs"
mkdir -p "$CERTS"
( cd "$CERTS"
  key="-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
  openssl req -x509 $key -keyout ca.key -out ca.crt -days 2 -subj /CN=bench-ca 2>/dev/null
  openssl req $key -keyout server.key -out server.csr -subj /CN=localhost 2>/dev/null
  printf 'subjectAltName=DNS:localhost\n' > server.ext
  openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.crt -days 2 \
    -extfile server.ext 2>/dev/null )
TLS_PLAIN_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
TLS_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
redis-server --port "$TLS_PLAIN_PORT" --tls-port "$TLS_PORT" --bind 127.0.0.1 --save "" --appendonly no --daemonize yes \
  --tls-cert-file "$CERTS/server.crt" --tls-key-file "$CERTS/server.key" --tls-ca-cert-file "$CERTS/ca.crt" \
  --tls-auth-clients no --pidfile "$RUN_DIR/redis-tls.pid" --logfile "$RUN_DIR/redis-tls.log" --dir "$RUN_DIR"
trap 'kill "$(cat "$RUN_DIR/redis.pid")" "$(cat "$RUN_DIR/redis-tls.pid")" 2>/dev/null || true; sleep 0.3; rm -rf "$RUN_DIR" 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do redis-cli -p "$TLS_PLAIN_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
"$BENCH" "redis://127.0.0.1:$TLS_PLAIN_PORT/0" "$N2" > "$RUN_DIR/plain2.out" 2>&1
"$BENCH" "rediss://localhost:$TLS_PORT/0?ssl_ca_certs=$CERTS/ca.crt" "$N2" > "$RUN_DIR/tls.out" 2>&1
KEY="bench key"
"$BENCH" "redis://127.0.0.1:$PORT/0?symmetric_encryption_keys=bench%20key" "$N2" > "$RUN_DIR/enc.out" 2>&1
"$PY" -c 'import cryptography' 2>/dev/null || "$PY" -m pip install -q --disable-pip-version-check cryptography >/dev/null 2>&1 || true
if "$PY" -c 'import cryptography' 2>/dev/null; then
  sed -e 's/prefix="pytog:", capacity=2 \* n)/prefix="pyenc:", capacity=2 * n, symmetric_encryption_keys=["bench key"])/' \
    "$RUN_DIR/together.py" > "$RUN_DIR/together-enc.py"
  "$PY" "$RUN_DIR/together-enc.py" "$PORT" "$N2" receive > "$RUN_DIR/python-enc.out" 2>&1 || true
  "$PY" "$RUN_DIR/together.py" "$PORT" "$N2" receive > "$RUN_DIR/python-plain2.out" 2>&1 || true
else
  echo '{"note": "cryptography is not in the Python venv"}' > "$RUN_DIR/python-enc.out"
fi
python3 - "$RUN_DIR" <<'PY'
import json, sys
run = sys.argv[1]
def load(name):
    try:
        return json.loads(open(run + "/" + name).read().strip().splitlines()[-1])
    except Exception:
        return {}
plain, tls, enc = load("plain2.out"), load("tls.out"), load("enc.out")
py_enc, py_plain = load("python-enc.out"), load("python-plain2.out")
fmt = lambda v: "-" if not v else "{:,.0f}".format(v)
print("== TLS vs plain (our layer, one Redis with both ports, same run) ==")
print("%-48s %12s %12s %8s" % ("", "plain", "TLS", "TLS cost"))
for name, key in [("sequential send (msg/s)", "seq_send_per_s"), ("1 sender + 1 receiver (msg/s)", "together_msgs_per_s"),
                  ("64 sends in flight + 8 receive loops (msg/s)", "concurrent_msgs_per_s"),
                  ("64 sends in flight + 1 batch receiver (msg/s)", "batched_msgs_per_s")]:
    p, t = plain.get(key), tls.get(key)
    cost = "%.0f %%" % (100 * (1 - t / p)) if p and t else ""
    print("%-48s %12s %12s %8s" % (name, fmt(p), fmt(t), cost))
print("== encryption (asgi_redis's Fernet) on vs off, and asgi_redis with the same key ==")
print("%-48s %12s %12s %8s" % ("", "swift", "asgi_redis", "ratio"))
for name, s, p in [
    ("1 sender + 1 receiver, encrypted (msg/s)", enc.get("together_msgs_per_s"), py_enc.get("together_msgs_per_s")),
    ("64 in flight + 8 receive loops, encrypted", enc.get("concurrent_msgs_per_s"), py_enc.get("together_msgs_per_s")),
    ("64 in flight + 1 batch receiver, encrypted", enc.get("batched_msgs_per_s"), py_enc.get("together_msgs_per_s")),
    ("1 sender + 1 receiver, not encrypted (msg/s)", plain.get("together_msgs_per_s"), py_plain.get("together_msgs_per_s")),
]:
    ratio = "%.1fx" % (s / p) if s and p else ""
    print("%-48s %12s %12s %8s" % (name, fmt(s), fmt(p), ratio))
if plain.get("concurrent_msgs_per_s") and enc.get("concurrent_msgs_per_s"):
    print("encryption cost at 64 in flight: %.0f %%" % (100 * (1 - enc["concurrent_msgs_per_s"] / plain["concurrent_msgs_per_s"])))
PY
