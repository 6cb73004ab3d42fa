# Shared by the bench scripts (sourced, not run).
log() { printf '==> %s\n' "$*" >&2; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# start_redis DIR: a throwaway redis-server (no persistence) on a free loopback port, its pid,
# log and files in DIR; sets REDIS_PORT and REDIS. Stop it with stop_redis DIR.
start_redis() {
  REDIS_PORT=$(free_port)
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --daemonize yes \
    --pidfile "$1/redis.pid" --logfile "$1/redis.log" --dir "$1"
  for _ in $(seq 1 100); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
  REDIS="redis://127.0.0.1:$REDIS_PORT/0"
}
stop_redis() { kill "$(cat "$1/redis.pid" 2>/dev/null)" 2>/dev/null || true; }

# wrk, installed when missing.
ensure_wrk() {
  command -v wrk >/dev/null || { log "installing wrk"; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
}

# A release build of this tree's PeerChat and ChannelsBench, copied into a new folder; prints it.
release_bins_of_this_tree() {
  log "release build of this tree"
  swift build -c release --package-path Examples --product PeerChat >/dev/null
  swift build -c release --package-path Benchmarks --product ChannelsBench >/dev/null
  local dir
  dir="$(mktemp -d)"
  cp "$(swift build -c release --package-path Examples --show-bin-path)/PeerChat" "$dir/"
  cp "$(swift build -c release --package-path Benchmarks --show-bin-path)/ChannelsBench" "$dir/"
  echo "$dir"
}

# bench_workspace: RUN_DIR (a new temporary folder), `pids` (add what you start: killed at exit)
# and a throwaway Redis (start_redis), all stopped and removed when the script exits.
bench_workspace() {
  RUN_DIR=$(mktemp -d)
  pids=()
  trap 'for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; stop_redis "$RUN_DIR"; rm -rf "$RUN_DIR"' EXIT
  start_redis "$RUN_DIR"
}

# interop_python: the interop venv's python (it has `websockets`), or exits with a hint.
interop_python() {
  local py="$PWD/.venv-interop/bin/python"
  "$py" -c 'import websockets' 2>/dev/null || { log "no .venv-interop: run scripts/test.sh once (it builds it)"; exit 2; }
  echo "$py"
}

# peers2_kit: the ../shared/peers2 kit (nginx + nchan, Centrifuge, the Go fan-out client), or
# $PEERS2_DIR; sources its lib.sh (BIN, STATE, wait_http...) and sets it up when its programs
# are missing. Sets KIT. Run from the repository's root.
peers2_kit() {
  KIT="${PEERS2_DIR:-$PWD/../shared/peers2}"
  [ -x "$KIT/compare.sh" ] || { log "no peers2 kit at $KIT (set PEERS2_DIR)"; exit 2; }
  # shellcheck disable=SC1091
  source "$KIT/lib.sh"
  [ -x "$BIN/fanout" ] || bash "$KIT/setup.sh" >&2
}

# app_binary APP: sets APP_BIN to $BINARY (an earlier build, made absolute) or to a fresh
# release build of this tree's APP (PeerChat or chat), and ROOM_PATH to the app's room path.
app_binary() {
  if [ -n "${BINARY:-}" ]; then
    APP_BIN=$(realpath "$BINARY") || exit 1
  else
    log "release build of $1"
    swift build -c release --package-path Examples --product "$1" >/dev/null
    APP_BIN="$(swift build -c release --package-path Examples --show-bin-path)/$1"
  fi
  if [ "$1" = PeerChat ]; then ROOM_PATH="/{room}/"; else ROOM_PATH="/chat/{room}/"; fi
}
