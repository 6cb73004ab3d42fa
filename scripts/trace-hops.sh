#!/usr/bin/env bash
# Where one group message's time goes before its first byte leaves a server: the peers2 kit's Go
# client sends MESSAGES messages one at a time (GAP s apart) to a room of MEMBERS members over 2
# `runserver --noworker` + 2 `runworker` (../shared/peers2/compare.sh, SYSTEMS=swift), while
# `perf` records the scheduler and the read/write/send system calls of every process. For each
# message it finds the hops in the trace and prints their medians:
#
#   client -> server read     the client's write of the frame to the server's read of it
#   server read -> push       the server's work until its write to Redis (websocket.receive)
#   push -> worker read       the push script and the worker's wake-up
#   worker read -> group      the worker: take, consumer, channel session, until the group send
#   group -> server read      the group-send script and the servers' take of their bundle
#   server read -> 1st send   decode, hand-over and the first member's send(2)
#   to last send              the client's write to the servers' last send of that message
#
#   scripts/trace-hops.sh                              PeerChat (built in release mode first)
#   BINARY=/dir/PeerChat scripts/trace-hops.sh         an earlier build
#   MESSAGES=60 GAP=0.1 MEMBERS=1000 SECS=8 ...
#
# Needs root and `perf` with the syscalls tracepoints (Debian: apt-get install linux-perf); the
# tracing itself adds a few µs per system call, so compare builds in the same setup, not with
# figures taken without it.
set -uo pipefail
cd "$(dirname "$0")/.."
KIT="${PEERS2_DIR:-$PWD/../shared/peers2}"
MESSAGES=${MESSAGES:-40}; GAP=${GAP:-0.2}; MEMBERS=${MEMBERS:-1000}
SECS=${SECS:-$(python3 -c "print(min(12, max(4, int($MESSAGES * $GAP))))")}
command -v perf >/dev/null || { echo "perf is missing (Debian: apt-get install linux-perf)"; exit 2; }
if [ -z "${BINARY:-}" ]; then
  swift build -c release --package-path Examples --product PeerChat >/dev/null || exit 1
  BINARY="$(swift build -c release --package-path Examples --show-bin-path)/PeerChat"
fi
BINARY=$(realpath "$BINARY") || exit 1
NAME=$(basename "$BINARY")
OUT=$(mktemp -d /tmp/trace-hops.XXXXXX)
echo "trace and logs: $OUT"
SYSTEMS=swift MEMBERS=$MEMBERS LAT_MESSAGES=$MESSAGES GAP=$GAP SAT_MESSAGES=1 "$KIT/compare.sh" "$BINARY" >"$OUT/compare.log" 2>&1 &
COMPARE=$!
for _ in $(seq 600); do pgrep -x fanout >/dev/null && break; sleep 0.1; done
pgrep -x fanout >/dev/null || { echo "the client never started; see $OUT/compare.log"; kill "$COMPARE" 2>/dev/null; exit 1; }
sleep 1   # the members join
pgrep -f "$NAME runserver" | paste -sd, >"$OUT/servers"
pgrep -f "$NAME runworker" | paste -sd, >"$OUT/workers"
# perf's own system calls are left out of the trace.
bash -c 'exec perf record -a -o "$0" -e sched:sched_switch \
  -e syscalls:sys_enter_read --filter "common_pid != $$" -e syscalls:sys_enter_write --filter "common_pid != $$" \
  -e syscalls:sys_enter_writev --filter "common_pid != $$" -e syscalls:sys_enter_sendto --filter "common_pid != $$" \
  -- sleep "$1"' "$OUT/perf.data" "$SECS" >"$OUT/perf.log" 2>&1 || { echo "perf record failed: $(tail -2 "$OUT/perf.log")"; kill "$COMPARE"; exit 1; }
wait "$COMPARE"
perf script -i "$OUT/perf.data" -F comm,pid,tid,cpu,time,event,trace >"$OUT/trace.txt" 2>/dev/null
grep '^swift ' "$OUT/compare.log"
python3 - "$OUT" "$MEMBERS" <<'PYEOF'
import re, statistics, sys
out = sys.argv[1]
servers = set(open(out + '/servers').read().split(',')) - {''}
workers = set(open(out + '/workers').read().split(',')) - {''}
servers = {s.strip() for s in servers}; workers = {w.strip() for w in workers}
line_rx = re.compile(r'^\s*(.+?)\s+(\d+)/(\d+)\s+\[(\d+)\]\s+([\d.]+):\s+(\S+)\s*(.*)$')
events = []
for line in open(out + '/trace.txt'):
    m = line_rx.match(line)
    if not m:
        continue
    comm, pid, _, _, t, event, rest = m.groups()
    count = re.search(r'count: (0x[0-9a-f]+)', rest)
    events.append((float(t), comm, pid, event.replace('syscalls:sys_enter_', '').rstrip(':'), int(count.group(1), 16) if count else 0))
# The client's frames: small writes by the Go client (a masked text frame of a few bytes).
sends = [e[0] for e in events if e[1] == 'fanout' and e[3] == 'write' and 14 <= e[4] <= 40]
names = ['client -> server read', 'server read -> push', 'push -> worker read', 'worker read -> group',
         'group -> server read', 'server read -> 1st send', 'to 1st send', 'to last send']
rows = []
for sent in sends:
    window = [e for e in events if sent <= e[0] < sent + 0.05]
    def first(predicate, after):
        return next((e for e in window if e[0] >= after and predicate(e)), None)
    a = first(lambda e: e[2] in servers and e[3] == 'read', sent)
    b = a and first(lambda e: e[2] == a[2] and e[3] in ('write', 'writev') and e[4] > 8, a[0])
    c = b and first(lambda e: e[2] in workers and e[3] == 'read', b[0])
    d = c and first(lambda e: e[2] in workers and e[3] in ('write', 'writev') and e[4] > 400, c[0])
    f = d and first(lambda e: e[2] in servers and e[3] == 'read' and e[4] >= 4096, d[0])
    g = f and first(lambda e: e[2] in servers and e[3] == 'sendto', f[0])
    deliveries = [e[0] for e in window if e[2] in servers and e[3] == 'sendto']
    if not g or len(deliveries) < int(0.9 * int(sys.argv[2] if len(sys.argv) > 2 else 1000)):
        continue
    rows.append([a[0] - sent, b[0] - a[0], c[0] - b[0], d[0] - c[0], f[0] - d[0], g[0] - f[0], g[0] - sent, max(deliveries) - sent])
print('%d messages traced whole (of %d sent in the trace)' % (len(rows), len(sends)))
for i, name in enumerate(names):
    values = sorted(r[i] * 1000 for r in rows)
    if values:
        print('  %-24s median %6.3f ms   (min %.3f, max %.3f)' % (name, statistics.median(values), values[0], values[-1]))
PYEOF
