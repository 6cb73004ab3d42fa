#!/usr/bin/env bash
# Many rooms at once, beside nginx + nchan and Centrifuge: ROOMS rooms of MEMBERS members each
# (default 100 x 100 = 10,000 sockets over 2 front processes per system, one private Redis),
# every room busy at RATE messages/s for DURATION seconds (default 100/s: each of its 100
# members posting once a second, on average). One load client (the peers2 kit's `fanout`,
# Go) per room, all started together; a room's sender is one of its members.
#
# Prints one table: per system, the deliveries counted against those expected (every member
# must get every message of its room), the sum of the rooms' deliveries/s, and the median and
# worst of the rooms' per-delivery p50/p99 latency.
#
#   scripts/bench-rooms.sh                           100 x 100 at 100 msg/s per room, 5 s
#   RATE=10 scripts/bench-rooms.sh                   each member posting once every 10 s
#   ROOMS=10 MEMBERS=1000 scripts/bench-rooms.sh     other shapes
#   APP=chat SYSTEMS="swift nchan" ...               the full example; fewer systems
#   KEEP=1 ...                                       keep the processes' and clients' logs
#   BINARY=/dir/PeerChat ...                         an earlier release build instead (APP names its kind)
#
# Needs the peers2 kit set up (../shared/peers2/setup.sh: nginx + nchan, Centrifuge, Go).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
. scripts/bench/common.sh   # log, peers2_kit, app_binary
ROOMS=${ROOMS:-100}
MEMBERS=${MEMBERS:-100}
RATE=${RATE:-100}
DURATION=${DURATION:-5}
SYSTEMS=${SYSTEMS:-swift nchan centrifuge}
APP=${APP:-PeerChat}
WORKERS=${WORKERS:-2}
peers2_kit
MESSAGES=$(python3 -c "print(max(1, int($RATE * $DURATION)))")

app_binary "$APP"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

RUN=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 0.5
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  for p in ${NCHAN_PORTS:-}; do "$KIT/nchan.sh" stop "$p" >/dev/null 2>&1 || true; done
  for p in ${CF_PORTS:-}; do "$KIT/centrifuge.sh" stop "$p" >/dev/null 2>&1 || true; done
  if [ -n "${KEEP:-}" ]; then log "logs kept in $RUN"; else rm -rf "$RUN"; fi
}
trap cleanup EXIT

R=$(free_port)
redis-server --port "$R" --bind 127.0.0.1 --save '' --appendonly no --daemonize no --dir "$RUN" >"$RUN/redis.log" 2>&1 &
REDIS_PID=$!
PIDS+=("$REDIS_PID")
for _ in $(seq 50); do redis-cli -p "$R" ping >/dev/null 2>&1 && break; sleep 0.1; done
LAYER="redis://127.0.0.1:$R"
log "$ROOMS rooms x $MEMBERS members, $RATE msg/s per room for ${DURATION}s ($MESSAGES messages a room); $(nproc) cores"

cpu_ticks() { # PGREP-PATTERN: CPU clock ticks (user + system) used so far by the matching processes
  local total=0 t
  for pid in $(pgrep -f "$1" || true); do
    t=$(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || echo 0)
    total=$((total + t))
  done
  echo "$total"
}

write_calls() { # PGREP-PATTERN: write-type system calls (write, writev, send...) made so far by the matching processes
  local total=0 t
  for pid in $(pgrep -f "$1" || true); do
    t=$(awk '/^syscw:/ {print $2}' "/proc/$pid/io" 2>/dev/null || echo 0)
    total=$((total + ${t:-0}))
  done
  echo "$total"
}

rooms() { # SYSTEM PROTO URLS [PATH]: one fanout per room, all at once; their JSON lines to $RUN/SYSTEM.jsonl
  local sys=$1 proto=$2 urls=$3 path=${4:-} fp=() front_before back_before
  front_before=$(cpu_ticks "$FRONT_PATTERN"); back_before=$(cpu_ticks "$BACK_PATTERN")
  local writes_before; writes_before=$(write_calls "$FRONT_PATTERN")
  for i in $(seq "$ROOMS"); do
    "$BIN/fanout" --proto "$proto" --urls "$urls" ${path:+--path "$path"} --room "r${i}x$$" --members "$MEMBERS" \
      --messages "$MESSAGES" --rate "$RATE" --concurrency 20 --join-timeout 60 --settle 30 --timeout 60 \
      --label "$sys" 2>"$RUN/$sys-room$i.err" | tail -1 >"$RUN/$sys-room$i.json" &
    fp+=($!)
  done
  for p in "${fp[@]}"; do wait "$p" || true; done
  # The whole run's CPU (joins included) of the front processes and, for swift, the workers.
  echo "$(( $(cpu_ticks "$FRONT_PATTERN") - front_before )) $(( $(cpu_ticks "$BACK_PATTERN") - back_before )) $(getconf CLK_TCK) $(( $(write_calls "$FRONT_PATTERN") - writes_before ))" >"$RUN/$sys.cpu"
  for i in $(seq "$ROOMS"); do
    if [ -s "$RUN/$sys-room$i.json" ]; then cat "$RUN/$sys-room$i.json"
    else echo "{\"label\":\"$sys\",\"error\":\"room $i: $(tail -1 "$RUN/$sys-room$i.err" | tr -d '"\\')\"}"; fi
  done >"$RUN/$sys.jsonl"
}

NCHAN_PORTS="" CF_PORTS=""
for sys in $SYSTEMS; do
  redis-cli -p "$R" flushall >/dev/null
  p1=$(free_port) p2=$(free_port)
  urls="http://127.0.0.1:$p1,http://127.0.0.1:$p2"
  log "$sys"
  case "$sys" in
    swift)
      FRONT_PATTERN="$APP_BIN runserver" BACK_PATTERN="$APP_BIN runworker"
      sp=()
      for p in $p1 $p2; do
        (cd "$RUN" && CHAT_DATABASE="$RUN/chat.sqlite3" exec "$APP_BIN" runserver --noworker --bind 127.0.0.1 --port "$p" --layer "$LAYER") >"$RUN/swift-server-$p.log" 2>&1 &
        sp+=($!)
      done
      for i in $(seq "$WORKERS"); do
        (cd "$RUN" && CHAT_DATABASE="$RUN/chat.sqlite3" exec "$APP_BIN" runworker --layer "$LAYER") >"$RUN/swift-worker$i.log" 2>&1 &
        sp+=($!)
      done
      PIDS+=("${sp[@]}")
      for p in $p1 $p2; do wait_http "http://127.0.0.1:$p/hello/x" 30 || { log "swift did not answer"; exit 1; }; done
      rooms swift chat "$urls" "$ROOM_PATH"
      for p in "${sp[@]}"; do kill "$p" 2>/dev/null || true; done
      for p in "${sp[@]}"; do wait "$p" 2>/dev/null || true; done
      ;;
    nchan)
      FRONT_PATTERN="nginx" BACK_PATTERN="^$"
      NCHAN_PORTS="$p1 $p2"
      for p in $p1 $p2; do "$KIT/nchan.sh" start "$p" "$R" >"$RUN/nchan-start-$p.log" 2>&1 || cat "$RUN/nchan-start-$p.log" >&2; done
      rooms nchan nchan "$urls"
      for p in $p1 $p2; do "$KIT/nchan.sh" stop "$p" >/dev/null 2>&1 || true; done
      NCHAN_PORTS=""
      ;;
    centrifuge)
      FRONT_PATTERN="centrifuge-peer" BACK_PATTERN="^$"
      CF_PORTS="$p1 $p2"
      for p in $p1 $p2; do CENTRIFUGE_LOG=error "$KIT/centrifuge.sh" start "$p" "$R" >"$RUN/cf-start-$p.log" 2>&1 || cat "$RUN/cf-start-$p.log" >&2; done
      rooms centrifuge centrifuge "$urls"
      for p in $p1 $p2; do "$KIT/centrifuge.sh" stop "$p" >/dev/null 2>&1 || true; done
      CF_PORTS=""
      ;;
    *) log "unknown system $sys (swift nchan centrifuge)"; exit 2 ;;
  esac
done

python3 - "$RUN" "$APP" "$ROOMS" "$MEMBERS" "$RATE" "$DURATION" $SYSTEMS <<'PY'
import json, statistics, sys
run, app, rooms, members, rate, duration, systems = sys.argv[1], sys.argv[2], *map(float, sys.argv[3:7]), sys.argv[7:]
print()
print("%d rooms x %d members, %g msg/s per room for %gs (swift = %s), one run" % (rooms, members, rate, duration, app))
print("%-11s %7s %14s %7s %13s %19s %19s %16s %13s" % (
    "system", "rooms", "delivered", "%", "deliveries/s", "p50 ms med / worst", "p99 ms med / worst", "CPU us/delivery",
    "writes/deliv"))
short = []
for system in systems:
    rows = [json.loads(line) for line in open("%s/%s.jsonl" % (run, system))]
    good = [r for r in rows if "error" not in r]
    delivered = sum(r.get("delivered", 0) for r in good)
    expected = int(rooms * members * rate * duration) if not good else sum(r.get("expected", 0) for r in good)
    expected += sum(int(members * rate * duration) for r in rows if "error" in r)
    per_s = sum(r.get("deliveries_per_s") or 0 for r in good)
    p50 = [r["delivery_ms_p50"] for r in good if r.get("delivery_ms_p50") is not None]
    p99 = [r["delivery_ms_p99"] for r in good if r.get("delivery_ms_p99") is not None]
    f = lambda xs, g: "%.1f" % g(xs) if xs else "-"
    front, back, tck, writes = map(int, open("%s/%s.cpu" % (run, system)).read().split())
    cpu = "%.2f" % (1e6 * front / tck / max(1, delivered))
    if back:
        cpu += " +%.2f" % (1e6 * back / tck / max(1, delivered))
    print("%-11s %7s %14s %7s %13.0f %19s %19s %16s %13.2f" % (
        system, "%d/%d" % (len(good), len(rows)), "%d/%d" % (delivered, expected),
        "%.2f" % (100.0 * delivered / max(1, expected)), per_s,
        "%s / %s" % (f(p50, statistics.median), f(p50, max)), "%s / %s" % (f(p99, statistics.median), f(p99, max)), cpu,
        writes / max(1, delivered)))
    for r in rows:
        if "error" in r:
            print("    %s" % r["error"][:160])
    if delivered < expected:
        short.append(system)
print()
print("deliveries/s: the sum of the rooms' own rates (each room's deliveries over its own span).")
print("CPU us/delivery: the front processes' CPU over the whole run (joins included) per delivery;")
print("for swift, + the workers' (they relay every message: websocket.receive -> group send).")
print("writes/deliv: the front processes' write-type system calls (/proc/PID/io syscw, Redis included) per delivery.")
if short:
    print("NOT EVERY MEMBER GOT EVERY MESSAGE in: " + ", ".join(short))
PY
