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
