#!/usr/bin/env bash
# The big-room fan-out beside nginx + nchan and Centrifuge, at several room sizes, in one run:
# ../shared/peers2/compare.sh (the same Go client, one private Redis emptied between systems,
# 2 front processes per system; ours: 2 `runserver --noworker` + 2 `runworker`) once per size,
# then one table with the ratios and the time per delivery at saturation (the growth curve).
#
#   scripts/bench-peers2.sh                    SIZES="1000 5000 10000" (about 6 minutes)
#   APP=chat scripts/bench-peers2.sh           the full chat example instead of PeerChat
#   BEFORE_BIN=/dir scripts/bench-peers2.sh    also /dir/PeerChat (a release build of an earlier
#                                              commit), run right before ours at each size
#   SYSTEMS="swift nchan" SIZES=1000 ...       fewer systems or sizes
#   SAT_DELIVERIES=400000 LAT_MESSAGES=30      the saturation burst's size in deliveries (400
#                                              messages to 1,000 members; 20 to 400 messages)
#                                              and the latency run's messages (0.3 s apart)
#
# The first run sets the kit up (apt packages and two Go programs; see ../shared/peers2/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
KIT="${PEERS2_DIR:-$ROOT/../shared/peers2}"
SIZES=${SIZES:-1000 5000 10000}
SYSTEMS=${SYSTEMS:-swift nchan centrifuge}
APP=${APP:-PeerChat}
SAT_DELIVERIES=${SAT_DELIVERIES:-400000}
LAT_MESSAGES=${LAT_MESSAGES:-30}
log() { printf '==> %s\n' "$*" >&2; }
[ -x "$KIT/compare.sh" ] || { log "no peers2 kit at $KIT (set PEERS2_DIR)"; exit 2; }

log "release build of $APP"
swift build -c release --package-path Examples --product "$APP" >/dev/null
BIN="$(swift build -c release --package-path Examples --show-bin-path)/$APP"
if [ -n "${BEFORE_BIN:-}" ]; then
  [ -x "$BEFORE_BIN/$APP" ] || { log "BEFORE_BIN must hold a release $APP"; exit 2; }
fi
# The room's file descriptors: 10,000 members need 10,000 in the client and 5,000 per server.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

RESULTS=$(mktemp)
trap 'rm -f "$RESULTS"' EXIT
run() { # LABEL BINARY SYSTEMS MEMBERS
  local label=$1 binary=$2 systems=$3 members=$4 sat out raw
  # Saturation bursts shrink as rooms grow, so every size takes about the same time: SAT_DELIVERIES
  # deliveries (20 to 400 messages). The kit's 50 messages to 1,000 members last a tenth of a
  # second here, and one pause of the client or a server halves that figure.
  sat=$((SAT_DELIVERIES / members)); [ "$sat" -lt 20 ] && sat=20; [ "$sat" -gt 400 ] && sat=400
  log "$label: $systems, $members members, saturation $sat messages"
  out=$(MEMBERS=$members SAT_MESSAGES=$sat LAT_MESSAGES=$LAT_MESSAGES SYSTEMS="$systems" "$KIT/compare.sh" "$binary" 2>&1) || {
    printf '%s\n' "$out" | tail -20 >&2; log "compare.sh failed"; exit 1; }
  printf '%s\n' "$out" | sed -n '/^system/,/^$/p' >&2
  raw=$(printf '%s\n' "$out" | sed -n 's/^raw: //p' | tail -1)
  [ -f "$raw" ] || { log "compare.sh left no results"; exit 1; }
  python3 - "$raw" "$label" >> "$RESULTS" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    row = json.loads(line)
    if row.get("label") == "swift":
        row["label"] = sys.argv[2]
    print(json.dumps(row))
PY
}
for members in $SIZES; do
  if [ -n "${BEFORE_BIN:-}" ]; then run "before" "$BEFORE_BIN/$APP" swift "$members"; fi
  run "swift" "$BIN" "$SYSTEMS" "$members"
done

python3 - "$RESULTS" "$APP" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
app = sys.argv[2]
table = {}
for r in rows:
    table.setdefault((r["members"], r["label"]), {})[r["mode"]] = r
def fmt(value, spec="%.1f"):
    return "-" if value is None else spec % value
print()
print("The big-room fan-out (%s as swift), ../shared/peers2 kit, one run" % app)
print("%-8s %-11s %8s %9s %9s %10s %12s %11s" % (
    "members", "system", "deliv %", "p50 ms", "p99 ms", "sat deliv", "deliveries/s", "us/deliv"))
for (members, label), modes in sorted(table.items(), key=lambda kv: (kv[0][0], kv[0][1] != "swift", kv[0][1])):
    lat, sat = modes.get("latency", {}), modes.get("saturation", {})
    per_s = sat.get("deliveries_per_s")
    print("%-8d %-11s %8s %9s %9s %10s %12s %11s" % (
        members, label, fmt(100.0 * lat.get("delivered", 0) / max(1, lat.get("expected", 1))),
        fmt(lat.get("ms_to_all_p50")), fmt(lat.get("ms_to_all_p99")),
        fmt(100.0 * sat.get("delivered", 0) / max(1, sat.get("expected", 1))),
        fmt(per_s, "%.0f"), fmt(1e6 / per_s if per_s else None, "%.2f")))
print()
print("ratios (swift / peer): latency p50 (lower is better), deliveries/s (higher is better)")
for members in sorted({m for m, _ in table}):
    ours = table.get((members, "swift"), {})
    for peer in ("nchan", "centrifuge", "before"):
        theirs = table.get((members, peer))
        if not theirs or not ours:
            continue
        try:
            p50 = ours["latency"]["ms_to_all_p50"] / theirs["latency"]["ms_to_all_p50"]
            rate = ours["saturation"]["deliveries_per_s"] / theirs["saturation"]["deliveries_per_s"]
        except (KeyError, TypeError, ZeroDivisionError):
            print("%6d vs %-10s  (a figure is missing)" % (members, peer))
            continue
        print("%6d vs %-10s  p50 %.2fx   deliveries/s %.2fx" % (members, peer, p50, rate))
short = [r for r in rows if r.get("min_ratio", 1) < 1]
if short:
    print("\nNOT EVERY MEMBER GOT EVERY MESSAGE in: " + ", ".join("%s %s %d" % (r["label"], r["mode"], r["members"]) for r in short))
    sys.exit(1)
PY
