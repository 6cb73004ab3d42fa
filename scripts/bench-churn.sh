#!/usr/bin/env bash
# What a WebSocket client's visit costs (its join and its leave), beside nginx + nchan and
# Centrifuge: MEMBERS clients (the peers2 kit's Go `fanout`) join one room on one front process
# per system, one message goes round, and they leave; then the same again, measured (the first
# round warms the processes up). Prints, per system, the CPU (user + system) of the front
# process, of the workers (ours) and of Redis per visit, the join time, and the total per visit
# against nchan's.
#
# Connection churn is what a deploy's reconnect storm, or `scripts/bench-rooms.sh`'s rooms that
# start and finish while others send, cost: every join of ours is a `websocket.connect` through
# a worker (accept, channel session, group add), every leave a `websocket.disconnect`.
#
#   scripts/bench-churn.sh                         1,000 visits per system, 3 rounds each
#   MEMBERS=3000 ROUNDS=5 scripts/bench-churn.sh
#   SYSTEMS="swift nchan" APP=chat ...             the full example (path /chat/{room}/)
#   BINARY=/dir/PeerChat ...                       an earlier release build instead
#   (it also prints the Redis commands per visit, a Lua script's own calls included)
#   MESSAGES=150 ...                               also the CPU per delivery: each round runs
#                                                  a second visit with 150 messages, 50 ms apart
#                                                  (GAP), and the difference from the one-message
#                                                  visit, per delivery, is printed in a second table
#                                                  (the fan-out's cost with the joins taken out)
#
# Needs the peers2 kit (../shared/peers2/setup.sh: nginx + nchan, Centrifuge, Go).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
. scripts/bench/common.sh   # log, peers2_kit, app_binary
MEMBERS=${MEMBERS:-1000}
ROUNDS=${ROUNDS:-3}
SYSTEMS=${SYSTEMS:-swift nchan centrifuge}
APP=${APP:-PeerChat}
WORKERS=${WORKERS:-1}
MESSAGES=${MESSAGES:-1}
GAP=${GAP:-0.05}
peers2_kit
app_binary "$APP"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

RUN=$(mktemp -d)
PIDS=()
NCHAN_PORT="" CF_PORT=""
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 0.3
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  [ -n "$NCHAN_PORT" ] && "$KIT/nchan.sh" stop "$NCHAN_PORT" >/dev/null 2>&1 || true
  [ -n "$CF_PORT" ] && "$KIT/centrifuge.sh" stop "$CF_PORT" >/dev/null 2>&1 || true
  rm -rf "$RUN"
}
trap cleanup EXIT

R=$(free_port)
redis-server --port "$R" --bind 127.0.0.1 --save '' --appendonly no --daemonize no --dir "$RUN" >"$RUN/redis.log" 2>&1 &
REDIS_PID=$!
PIDS+=("$REDIS_PID")
for _ in $(seq 50); do redis-cli -p "$R" ping >/dev/null 2>&1 && break; sleep 0.1; done

ticks() { # PIDS...: CPU clock ticks (user + system) used so far
  local total=0 t p
  for p in "$@"; do t=$(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0); total=$((total + t)); done
  echo "$total"
}

visit() { # SYSTEM PROTO URL PATH [MESSAGES] -> one fanout run; its join seconds on stdout
  local out="$RUN/$1-$RANDOM.json"
  "$BIN/fanout" --proto "$2" --urls "$3" ${4:+--path "$4"} --room "churn$RANDOM" --members "$MEMBERS" --messages "${5:-1}" \
    --gap "$GAP" --concurrency 50 --join-timeout 30 --settle 10 --timeout 10 --label "$1" 2>"$out.err" | tail -1 >"$out"
  python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(r.get("join_s", "nan"), r.get("delivered", 0), r.get("expected", 0))' "$out"
}

measure() { # SYSTEM PROTO URL PATH "FRONT PIDS" "BACK PIDS": ROUNDS measured rounds after a warm one
  local sys=$1 proto=$2 url=$3 path=$4 front=$5 back=$6 f0 b0 r0 f1 b1 r1 line
  visit "$sys" "$proto" "$url" "$path" >/dev/null
  for round in $(seq "$ROUNDS"); do
    f0=$(ticks $front); b0=$(ticks $back); r0=$(ticks "$REDIS_PID")
    redis-cli -p "$R" config resetstat >/dev/null
    line=$(visit "$sys" "$proto" "$url" "$path")
    sleep 1  # the leaves' work (disconnects through the workers) finishes
    f1=$(ticks $front); b1=$(ticks $back); r1=$(ticks "$REDIS_PID")
    echo "$sys $round $((f1 - f0)) $((b1 - b0)) $((r1 - r0)) $line" >>"$RUN/results"
    # Redis commands per visit (those a script runs included), the most frequent first.
    redis-cli -p "$R" info commandstats | awk -F'[_:=,]' -v sys="$sys" -v n="$MEMBERS" \
      '/^cmdstat_/ && $2 != "config|resetstat" && $2 != "info" {t += $4; c[$2] = $4}
       END {printf "%s %.1f", sys, t / n; for (k in c) printf " %s=%.2f", k, c[k] / n; printf "\n"}' >>"$RUN/commands"
    [ "$MESSAGES" -gt 1 ] || continue
    f0=$(ticks $front); b0=$(ticks $back); r0=$(ticks "$REDIS_PID")
    line=$(visit "$sys" "$proto" "$url" "$path" "$MESSAGES")
    sleep 1
    f1=$(ticks $front); b1=$(ticks $back); r1=$(ticks "$REDIS_PID")
    echo "$sys $round $((f1 - f0)) $((b1 - b0)) $((r1 - r0)) $line" >>"$RUN/results-many"
  done
}

for sys in $SYSTEMS; do
  redis-cli -p "$R" flushall >/dev/null
  P=$(free_port)
  log "$sys: $ROUNDS rounds of $MEMBERS visits"
  case "$sys" in
    swift)
      (cd "$RUN" && CHAT_DATABASE="$RUN/chat.sqlite3" exec "$APP_BIN" runserver --noworker --bind 127.0.0.1 --port "$P" --layer "redis://127.0.0.1:$R") >"$RUN/server.log" 2>&1 &
      SERVER=$!
      WPIDS=()
      for i in $(seq "$WORKERS"); do
        (cd "$RUN" && CHAT_DATABASE="$RUN/chat.sqlite3" exec "$APP_BIN" runworker --layer "redis://127.0.0.1:$R") >"$RUN/worker$i.log" 2>&1 &
        WPIDS+=($!)
      done
      PIDS+=("$SERVER" "${WPIDS[@]}")
      wait_http "http://127.0.0.1:$P/hello/x" 30 || { log "swift did not answer"; exit 1; }
      measure swift chat "http://127.0.0.1:$P" "$ROOM_PATH" "$SERVER" "${WPIDS[*]}"
      kill "$SERVER" "${WPIDS[@]}" 2>/dev/null || true
      ;;
    nchan)
      NCHAN_PORT=$P
      "$KIT/nchan.sh" start "$P" "$R" >"$RUN/nchan.log" 2>&1 || { cat "$RUN/nchan.log" >&2; exit 1; }
      # nginx's master and its worker processes (which do the work).
      MASTER=$(cat "$STATE/nchan-$P/master.pid" 2>/dev/null || true)
      NGINX_PIDS="$MASTER $( [ -n "$MASTER" ] && pgrep -d ' ' -P "$MASTER" || true)"
      [ -n "${NGINX_PIDS// /}" ] || { log "no nginx process found for port $P"; exit 1; }
      measure nchan nchan "http://127.0.0.1:$P" "" "$NGINX_PIDS" ""
      "$KIT/nchan.sh" stop "$P" >/dev/null 2>&1 || true
      NCHAN_PORT=""
      ;;
    centrifuge)
      CF_PORT=$P
      CENTRIFUGE_LOG=error "$KIT/centrifuge.sh" start "$P" "$R" >"$RUN/cf.log" 2>&1 || { cat "$RUN/cf.log" >&2; exit 1; }
      measure centrifuge centrifuge "http://127.0.0.1:$P" "" "$(pgrep -d ' ' -f "centrifuge-peer --port $P")" ""
      "$KIT/centrifuge.sh" stop "$P" >/dev/null 2>&1 || true
      CF_PORT=""
      ;;
    *) log "unknown system $sys (swift nchan centrifuge)"; exit 2 ;;
  esac
done

python3 - "$RUN/results" "$MEMBERS" "$(getconf CLK_TCK)" "$APP" "$MESSAGES" "$GAP" <<'PY'
import os, statistics, sys
path, members, tck, app, messages, gap = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5]), sys.argv[6]
rows = {}
for line in open(path):
    sys_, rnd, f, b, r, join_s, delivered, expected = line.split()
    rows.setdefault(sys_, []).append((int(f), int(b), int(r), float(join_s), int(delivered), int(expected)))
us = lambda t: 1e6 * t / tck / members
print()
rounds = len(next(iter(rows.values())))
print("%d visits (join, one message, leave) per round, %s; swift = %s" % (
    members, "medians of %d rounds" % rounds if rounds > 1 else "one round", app))
print("%-11s %14s %14s %14s %14s %12s %10s" % ("system", "front us", "workers us", "redis us", "total us", "join s", "vs nchan"))
med = {}
for s, rs in rows.items():
    f, b, r = (statistics.median(us(x[i]) for x in rs) for i in range(3))
    t = statistics.median(us(x[0] + x[1] + x[2]) for x in rs)
    med[s] = (f, b, r, t, statistics.median(x[3] for x in rs))
short = [s for s, rs in rows.items() if any(x[4] < x[5] for x in rs)]
for s, (f, b, r, t, j) in med.items():
    ratio = "%.2fx" % (t / med["nchan"][3]) if "nchan" in med and med["nchan"][3] > 0 else "-"
    print("%-11s %14.0f %14.0f %14.0f %14.0f %12.2f %10s" % (s, f, b, r, t, j, ratio))
print()
print("us: CPU microseconds per visit (user + system, from /proc; a clock tick is %d us)." % (1e6 / tck))
print("front: the process the clients connect to; workers: ours, which run every connect and disconnect.")
if short:
    print("NOT EVERY MEMBER GOT THE MESSAGE in: " + ", ".join(short))
commands = {}
if os.path.exists(path.replace("results", "commands")):
    for line in open(path.replace("results", "commands")):
        parts = line.split()
        commands[parts[0]] = parts[1:]  # the last round's
if commands:
    print()
    print("Redis commands per visit (the last round; those a Lua script runs included), the most frequent:")
    for s, parts in commands.items():
        top = sorted((p.split("=") for p in parts[1:]), key=lambda kv: -float(kv[1]))[:8]
        print("%-11s %6s  %s" % (s, parts[0], ", ".join("%s %s" % (k, v) for k, v in top)))
if messages > 1 and os.path.exists(path + "-many"):
    # The same visit with `messages` messages: what the extra ones cost, per delivery.
    many = {}
    for line in open(path + "-many"):
        sys_, rnd, f, b, r, join_s, delivered, expected = line.split()
        many.setdefault(sys_, []).append((int(f), int(b), int(r), int(delivered), int(expected)))
    per = lambda t: 1e6 * t / tck / ((messages - 1) * members)
    print()
    print("the same visits with %d messages %s s apart: CPU per delivery of the %d extra ones (us)" % (messages, gap, messages - 1))
    print("%-11s %14s %14s %14s %14s %10s" % ("system", "front us", "workers us", "redis us", "total us", "vs nchan"))
    dmed = {}
    for s, rs in many.items():
        base = rows[s]
        d = [tuple(per(m[i] - o[i]) for i in range(3)) for m, o in zip(rs, base)]
        dmed[s] = tuple(statistics.median(x[i] for x in d) for i in range(3)) + (statistics.median(sum(x) for x in d),)
    for s, (f, b, r, t) in dmed.items():
        ratio = "%.2fx" % (t / dmed["nchan"][3]) if "nchan" in dmed and dmed["nchan"][3] > 0 else "-"
        print("%-11s %14.2f %14.2f %14.2f %14.2f %10s" % (s, f, b, r, t, ratio))
    lost = [s for s, rs in many.items() if any(x[3] < x[4] for x in rs)]
    if lost:
        print("NOT EVERY MEMBER GOT EVERY MESSAGE in: " + ", ".join(lost))
PY
