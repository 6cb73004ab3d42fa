#!/usr/bin/env bash
# The example across machines, for real: hosts made with `ip netns`, joined by a bridge that
# lives in a namespace of its own (the switch), each host with its own address and stack:
#
#   10.77.0.11  redis1   redis-server (shard 0 of the asgi_redis ring)
#   10.77.0.12  redis2   redis-server (shard 1)
#   10.77.0.20  server   chat runserver --noworker
#   10.77.0.21  server2  chat runserver --noworker --cut-off-timeout 3 (the partition's side)
#   10.77.0.31  worker1  chat runworker + chat rundelay
#   10.77.0.32  worker2  chat runworker
#   10.77.0.40  client   Tests/e2e/cluster_client.py (HTTP, echo, room chat, ordered burst)
#
# Then: the example works from the client host; keys land on both shards, `!` / `?` channels in
# the ring's places; SIGKILL of every process of worker1 leaves the service answering; redis2's
# link goes down and comes back and service recovers; a 10 s partition (nft DROP, both ways)
# between server2 and the Redis hosts while 50 sockets on each server follow one room: server2's
# sockets get 1012 and recover everything, server's lose nothing; with `tc netem` (when
# available), 1 ms of delay on every host's link and the echo latency reported.
#
#   scripts/cluster-netns.sh [CHAT_BINARY [PYTHON]]      (root: it makes namespaces)
#
# Exits 0 when every step passed; non-zero, loudly, when one failed or namespaces are not allowed.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
CHAT=${1:-}
PY=${2:-$ROOT/.venv-interop/bin/python}
if [ -z "$CHAT" ]; then
  swift build --package-path Examples --product chat >/dev/null
  CHAT="$(swift build --package-path Examples --show-bin-path)/chat"
fi
CHAT=$(readlink -f "$CHAT")
"$PY" -c 'import websockets' 2>/dev/null || { echo "FAIL: $PY has no websockets (run scripts/test.sh once)" >&2; exit 1; }

ID="cn$$"
SW="$ID-sw"
HOSTS=(redis1 redis2 server worker1 worker2 client server2)
declare -A ADDR=([redis1]=10.77.0.11 [redis2]=10.77.0.12 [server]=10.77.0.20 [server2]=10.77.0.21 [worker1]=10.77.0.31
  [worker2]=10.77.0.32 [client]=10.77.0.40)
RUN_DIR=$(mktemp -d)
export CHAT_DATABASE="$RUN_DIR/chat.sqlite3"   # the example's own data (one file, as one DB server)
log() { printf '[cluster-netns] %s\n' "$*"; }
fail() {
  printf '[cluster-netns] FAIL: %s\n' "$*" >&2
  for f in "$RUN_DIR"/*.log; do [ -f "$f" ] && { printf -- '--- last lines of %s\n' "$(basename "$f")" >&2; tail -n 15 "$f" >&2; }; done
  exit 1
}
ns() { echo "$ID-$1"; }
in_host() { local h=$1; shift; ip netns exec "$(ns "$h")" "$@"; }

cleanup() {
  for h in "${HOSTS[@]}"; do
    for pid in $(ip netns pids "$(ns "$h")" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
    ip netns del "$(ns "$h")" 2>/dev/null || true
  done
  ip netns del "$SW" 2>/dev/null || true
  rm -rf "$RUN_DIR"
}
trap cleanup EXIT

# --- the network --------------------------------------------------------------------------------
ip netns add "$SW" 2>/dev/null || fail "cannot make a network namespace (ip netns add): this test needs root and netns"
ip -n "$SW" link add br0 type bridge
ip -n "$SW" link set br0 up
ip -n "$SW" link set lo up
i=0
for h in "${HOSTS[@]}"; do
  i=$((i + 1))
  ip netns add "$(ns "$h")"
  ip link add "$ID-p$i" type veth peer name "$ID-h$i"
  ip link set "$ID-p$i" netns "$SW"
  ip link set "$ID-h$i" netns "$(ns "$h")"
  ip -n "$SW" link set "$ID-p$i" master br0 up
  ip -n "$(ns "$h")" link set "$ID-h$i" name eth0
  ip -n "$(ns "$h")" addr add "${ADDR[$h]}/24" dev eth0
  ip -n "$(ns "$h")" link set eth0 up
  ip -n "$(ns "$h")" link set lo up
done
PORT_OF_REDIS2="$ID-p2"   # the switch port of redis2's cable
log "${#HOSTS[@]} hosts on a bridge in its own namespace: ${ADDR[*]}"

# --- the services -------------------------------------------------------------------------------
for h in redis1 redis2; do
  in_host "$h" redis-server --bind "${ADDR[$h]}" --port 6379 --protected-mode no --save "" --appendonly no \
    --daemonize yes --pidfile "$RUN_DIR/$h.pid" --logfile "$RUN_DIR/$h.log" --dir "$RUN_DIR"
done
for h in redis1 redis2; do
  for _ in $(seq 1 100); do in_host "$h" redis-cli -h "${ADDR[$h]}" ping >/dev/null 2>&1 && break; sleep 0.1; done
done
in_host client redis-cli -h "${ADDR[redis1]}" ping >/dev/null || fail "the client host cannot reach redis1 across the bridge"
LAYER="redis://${ADDR[redis1]}:6379/0,redis://${ADDR[redis2]}:6379/0"
start() { # start HOST NAME ARGS...: a chat process on HOST, output in $RUN_DIR/NAME.log
  local h=$1 name=$2
  shift 2
  in_host "$h" "$CHAT" "$@" --layer "$LAYER" > "$RUN_DIR/$name.log" 2>&1 &
}
wait_log() { # wait_log NAME TEXT
  for _ in $(seq 1 300); do grep -q "$2" "$RUN_DIR/$1.log" 2>/dev/null && return 0; sleep 0.1; done
  cat "$RUN_DIR/$1.log" >&2
  fail "$1 did not print '$2'"
}
start server server runserver --noworker --bind 0.0.0.0 --port 8000 --allowed-hosts "${ADDR[server]}"
start server2 server2 runserver --noworker --bind 0.0.0.0 --port 8000 --allowed-hosts "${ADDR[server2]}" \
  --cut-off-timeout 3 --websocket-connect-timeout 30
start worker1 worker1 runworker
start worker1 delay1 rundelay
start worker2 worker2 runworker
wait_log server "interface server listening"
wait_log server2 "interface server listening"
wait_log worker1 "worker ready"
wait_log worker2 "worker ready"
wait_log delay1 "delay server ready"
TARGET="${ADDR[server]}:8000"
client() { in_host client "$PY" "$ROOT/Tests/e2e/cluster_client.py" "$TARGET" "$@"; }

# --- 1. the example from the client host --------------------------------------------------------
client check first || fail "the example does not work from the client host"
client latency 200

# --- 2. keys on both shards, in the ring's places -----------------------------------------------
"$PY" - "${ADDR[redis1]}" "${ADDR[redis2]}" "$ID" <<'EOF' || fail "keys are not where the asgi_redis ring puts them"
import binascii, subprocess, sys
hosts, ns_id = sys.argv[1:3], sys.argv[3]
def shard(name):
    return int((binascii.crc32(name.encode()) & 0xfff) / (4096 / 2.0))
placed = 0
counts = []
for index, (host, h) in enumerate(zip(hosts, ("redis1", "redis2"))):
    keys = subprocess.run(["ip", "netns", "exec", ns_id + "-" + h, "redis-cli", "-h", host, "--scan", "--pattern",
                           "asgi-meta:*:messages_count"], capture_output=True, text=True, check=True).stdout.split()
    counts.append(len(keys))
    for key in keys:
        channel = key[len("asgi-meta:"):-len(":messages_count")]
        if channel == "#global#":
            continue
        if "!" in channel or "?" in channel:
            assert shard(channel) == index, "%s is on shard %d, the ring says %d" % (channel, index, shard(channel))
            placed += 1
assert all(counts), "a shard holds no channel: %r" % counts
assert placed > 0, "no ! or ? channel was checked"
print("[cluster-netns] keys: %d and %d channels on the two shards; %d ! / ? channels all on their ring shard"
      % (counts[0], counts[1], placed))
EOF

# --- 3. a whole worker host dies ----------------------------------------------------------------
for pid in $(ip netns pids "$(ns worker1)"); do kill -9 "$pid"; done
log "SIGKILLed every process of worker1 (runworker and rundelay)"
client check after-worker-host-loss || fail "the service stopped answering without worker1"

# --- 4. a Redis shard host goes away and comes back ---------------------------------------------
ip -n "$SW" link set "$PORT_OF_REDIS2" down
log "redis2's link is down"
sleep 3
ip -n "$SW" link set "$PORT_OF_REDIS2" up
log "redis2's link is back"
client until-ok 60 || fail "service did not recover after redis2 came back"
grep -q "worker ready" "$RUN_DIR/worker2.log" && kill -0 "$(ip netns pids "$(ns worker2)" | head -1)" \
  || fail "worker2 died while redis2 was away"

# --- 5. a partition: server2 cannot reach the Redis hosts (packets dropped, no reset) ------------
command -v nft >/dev/null || { log "installing nftables"; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nftables >/dev/null; }
client partition "${ADDR[server2]}:8000" "$(ns server2)" "${ADDR[redis1]},${ADDR[redis2]}" 10 \
  || fail "the partition: server2's sockets were not told and recovered, or server's lost messages"
grep -q "cut off from the channel layer" "$RUN_DIR/server2.log" || fail "server2 did not log its cut-off"

# --- 6. 1 ms of delay on every link -------------------------------------------------------------
if in_host client tc qdisc add dev eth0 root netem delay 1ms 2>/dev/null; then
  for h in redis1 redis2 server worker2; do in_host "$h" tc qdisc add dev eth0 root netem delay 1ms; done
  log "netem: 1 ms on every host's link (client, server, worker, Redis: each hop pays it)"
  client check with-netem || fail "the example does not work with 1 ms links"
  client latency 200
else
  log "tc netem is not available here (no sch_netem): the delayed-link run is skipped"
fi
log "PASS: every step passed"
