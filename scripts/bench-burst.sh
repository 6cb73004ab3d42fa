#!/usr/bin/env bash
# Where a saturation burst's CPU goes: one room of MEMBERS members (the peers2 kit's Go fan-out
# client), 2 `runserver --noworker` + WORKERS `runworker` on a private Redis, MESSAGES messages
# sent back to back; prints, per run, the CPU (user+system, in clock ticks of 10 ms) that the
# servers, the workers, Redis and the client spent during the burst (the joins excluded), the
# burst's deliveries/s, and the Redis commands it made (`INFO commandstats`, reset at its start).
#
#   scripts/bench-burst.sh                      the chat example, 300 messages, 1,000 members
#   APP=PeerChat scripts/bench-burst.sh         the relay-only twin
#   BINARY=/dir/chat scripts/bench-burst.sh     an earlier release build instead
#   MESSAGES=50 MEMBERS=5000 WORKERS=1 RUNS=3 ...
#   RATE=500 ...                                 at 500 messages/s instead of back to back
#   GAP=0.05 ...                                 one at a time, 50 ms apart (latency mode)
#   PERF=/tmp/server.data ...                    `perf record -g` the first server during the burst
#   PERF_WORKER=/tmp/worker.data ...             the same for the first worker
#   PERF_CALLGRAPH="--call-graph dwarf,16384"    the worker's stacks unwound with DWARF (whole Swift stacks)
#
# With `perf` installed it also counts the servers' sends (`send`/`sendto` of one frame, `sendmsg`
# of several, `write`/`writev`) per delivery: how many frames each system call carried.
#
# The first run sets the peers2 kit up (../shared/peers2/setup.sh: apt packages, two Go programs).
set -uo pipefail
cd "$(dirname "$0")/.."
KIT="${PEERS2_DIR:-$PWD/../shared/peers2}"
APP=${APP:-chat}; MESSAGES=${MESSAGES:-300}; MEMBERS=${MEMBERS:-1000}; WORKERS=${WORKERS:-2}; RUNS=${RUNS:-1}
source "$KIT/lib.sh"
{ [ -x "$BIN/fanout" ] || "$KIT/setup.sh"; } >/dev/null 2>&1 || { echo "peers2 kit setup failed ($KIT/setup.sh)"; exit 1; }
FANOUT="$BIN/fanout"
if [ -z "${BINARY:-}" ]; then
  swift build -c release --package-path Examples --product "$APP" >/dev/null || exit 1
  BINARY="$(swift build -c release --package-path Examples --show-bin-path)/$APP"
fi
BINARY=$(realpath "$BINARY") || exit 1   # the processes start in a scratch directory
case "$(basename "$BINARY")" in PeerChat) ROOM_PATH='/{room}/' ;; *) ROOM_PATH='/chat/{room}/' ;; esac
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
RUN=$(mktemp -d); PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done; sleep 0.3; for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null; done; rm -rf "$RUN"; }
trap cleanup EXIT
R=$(free_port)
redis-server --port "$R" --bind 127.0.0.1 --save '' --appendonly no --daemonize no >"$RUN/redis.log" 2>&1 & REDIS=$!; PIDS+=("$REDIS")
for _ in $(seq 50); do redis-cli -p "$R" ping >/dev/null 2>&1 && break; sleep 0.1; done
SERVERS=(); WORKER_PIDS=(); PORTS=()
for _ in 1 2; do
  p=$(free_port); PORTS+=("$p")
  (cd "$RUN" && exec "$BINARY" runserver --noworker --bind 127.0.0.1 --port "$p" --layer "redis://127.0.0.1:$R") >"$RUN/server-$p.log" 2>&1 &
  SERVERS+=($!); PIDS+=($!)
done
for i in $(seq "$WORKERS"); do
  (cd "$RUN" && exec "$BINARY" runworker --layer "redis://127.0.0.1:$R") >"$RUN/worker-$i.log" 2>&1 &
  WORKER_PIDS+=($!); PIDS+=($!)
done
for p in "${PORTS[@]}"; do for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$p/" && break; sleep 0.1; done; done
sleep 1
ticks() { local t=0 f; for p in "$@"; do f=$(cut -d' ' -f14,15 "/proc/$p/stat" 2>/dev/null) || continue; set -- $f; t=$((t + $1 + $2)); done; echo "$t"; }
# The kernel's part (system time) alone.
sticks() { local t=0 f; for p in "$@"; do f=$(cut -d' ' -f15 "/proc/$p/stat" 2>/dev/null) || continue; t=$((t + f)); done; echo "$t"; }
if [ -n "${GAP:-}" ]; then PACE=(--gap "$GAP"); HOW="one at a time, ${GAP} s apart"
elif [ -n "${RATE:-}" ]; then PACE=(--burst --rate "$RATE"); HOW="at $RATE/s"
else PACE=(--burst); HOW="back to back"; fi
echo "$(basename "$BINARY") ($BINARY): $MEMBERS members, $MESSAGES messages $HOW, 2 servers, $WORKERS workers"
for run in $(seq "$RUNS"); do
  "$FANOUT" --proto chat --urls "http://127.0.0.1:${PORTS[0]},http://127.0.0.1:${PORTS[1]}" --path "$ROOM_PATH" \
    --members "$MEMBERS" --messages "$MESSAGES" "${PACE[@]}" >"$RUN/out" 2>"$RUN/err" &
  CLIENT=$!
  # The burst starts once every member joined and the room settled.
  while ! grep -q settled "$RUN/err" 2>/dev/null && kill -0 "$CLIENT" 2>/dev/null; do sleep 0.02; done
  k0=$(sticks "${SERVERS[@]}"); s0=$(ticks "${SERVERS[@]}"); w0=$(ticks "${WORKER_PIDS[@]}"); r0=$(ticks "$REDIS"); c0=$(ticks "$CLIENT"); c1=$c0
  redis-cli -p "$R" config resetstat >/dev/null
  SENDS_PID=
  if command -v perf >/dev/null; then
    perf stat -x, -e 'syscalls:sys_enter_sendto,syscalls:sys_enter_sendmsg,syscalls:sys_enter_write,syscalls:sys_enter_writev' \
      -p "$(IFS=,; echo "${SERVERS[*]}")" -o "$RUN/sends" >/dev/null 2>&1 &
    SENDS_PID=$!
  fi
  PERF_PID=; [ -n "${PERF:-}" ] && { perf record -F ${PERF_HZ:-2000} -g -p "${SERVERS[0]}" -o "$PERF" >/dev/null 2>&1 & PERF_PID=$!; }
  PERF_WORKER_PID=; [ -n "${PERF_WORKER:-}" ] && {
    perf record -F ${PERF_HZ:-4000} ${PERF_CALLGRAPH:--g} -p "${WORKER_PIDS[0]}" -o "$PERF_WORKER" >/dev/null 2>&1 &
    PERF_WORKER_PID=$!
  }
  while kill -0 "$CLIENT" 2>/dev/null; do c=$(ticks "$CLIENT") && [ -n "$c" ] && c1=$c; sleep 0.05; done
  [ -n "$PERF_PID" ] && { kill -INT "$PERF_PID"; wait "$PERF_PID"; }
  [ -n "$PERF_WORKER_PID" ] && { kill -INT "$PERF_WORKER_PID"; wait "$PERF_WORKER_PID"; }
  k1=$(sticks "${SERVERS[@]}"); s1=$(ticks "${SERVERS[@]}"); w1=$(ticks "${WORKER_PIDS[@]}"); r1=$(ticks "$REDIS")
  result=$(tail -1 "$RUN/out" | python3 -c 'import json,sys
d = json.loads(sys.stdin.read() or "{}")
print("%s deliveries/s, p50 %s ms to the last member, least share of a message delivered %s" % (d.get("deliveries_per_s"), d.get("ms_to_all_p50"), d.get("min_ratio")))' 2>/dev/null)
  echo "run $run: $result"
  echo "  CPU ticks during the burst: servers $((s1 - s0)) (in the kernel $((k1 - k0))), workers $((w1 - w0)), redis $((r1 - r0)), client $((c1 - c0))"
  if [ -n "$SENDS_PID" ]; then
    kill -INT "$SENDS_PID" 2>/dev/null; wait "$SENDS_PID" 2>/dev/null
    awk -F, -v d=$((MESSAGES * MEMBERS)) '/syscalls/ {split($3, e, ":"); n[e[2]] = $1; t += $1}
      END {if (d > 0 && t > 0) printf "  servers'"'"' sends: %.3f per delivery (sendto %d, sendmsg %d, write %d, writev %d)\n", t / d, n["sys_enter_sendto"], n["sys_enter_sendmsg"], n["sys_enter_write"], n["sys_enter_writev"]}' "$RUN/sends"
  fi
  echo "  Redis commands: $(redis-cli -p "$R" info commandstats | grep '^cmdstat' | sed 's/^cmdstat_\([a-z|]*\):calls=\([0-9]*\).*/\2 \1/' | sort -rn | head -8 | awk '{printf "%s %s, ", $2, $1}' | sed 's/, $//')"
done
