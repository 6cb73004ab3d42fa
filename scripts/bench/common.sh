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
