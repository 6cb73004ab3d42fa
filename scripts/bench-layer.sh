#!/usr/bin/env bash
# Channel layer benchmark: our Redis layer, Python asgi_redis 1.4.3 and raw Redis, against one
# local Redis in the same run. Prints msgs/s, latencies, Redis CPU % and the ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
N=${N:-20000}
PEERS="$ROOT/../shared/peers"

swift build -c release --product ChannelsBench >/dev/null
BENCH="$(swift build -c release --show-bin-path)/ChannelsBench"

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
trap 'kill "$(cat "$RUN_DIR/redis.pid")" 2>/dev/null || true; rm -rf "$RUN_DIR"' EXIT
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

swift_cpu=$(measure swift "$BENCH" "redis://127.0.0.1:$PORT/0" "$N")
py_cpu=$(measure python "$PY" "$PEERS/layer_bench.py" --port "$PORT" -n "$N" --phases tp,pingpong,fanout --json "$RUN_DIR/python.json")
redis-benchmark -p "$PORT" -q -n 200000 -c 50 -t lpush,lpop > "$RUN_DIR/raw.out" 2>&1

python3 - "$RUN_DIR" "$swift_cpu" "$py_cpu" <<'PY'
import json, re, sys
run, swift_cpu, py_cpu = sys.argv[1], sys.argv[2], sys.argv[3]
swift = json.loads(open(run + "/swift.out").read().strip().splitlines()[-1])
try:
    py = json.load(open(run + "/python.json"))
except Exception:
    py = {}
raw = open(run + "/raw.out").read()
def find(obj, *keys):
    for k in keys:
        if isinstance(obj, dict) and k in obj:
            obj = obj[k]
        else:
            return None
    return obj
print("== channel layer benchmark (one local Redis, same run) ==")
print("swift  sequential send      %8.0f msg/s" % swift["seq_send_per_s"])
print("swift  sequential receive   %8.0f msg/s" % swift["seq_receive_per_s"])
print("swift  send+receive together%8.0f msg/s" % swift["together_msgs_per_s"])
print("swift  send->reply RTT      p50 %.3f ms  p99 %.3f ms" % (swift["rtt_p50_ms"], swift["rtt_p99_ms"]))
print("swift  sendGroup(100)       p50 %.3f ms  p99 %.3f ms" % (swift["group100_p50_ms"], swift["group100_p99_ms"]))
print("swift  Redis CPU during run  %s %%" % swift_cpu)
print("python asgi_redis raw results: %s" % json.dumps(py)[:1500])
print("python Redis CPU during run  %s %%" % py_cpu)
for line in raw.splitlines():
    if "requests per second" in line:
        print("raw redis-benchmark (50 clients): " + line.strip())
PY
