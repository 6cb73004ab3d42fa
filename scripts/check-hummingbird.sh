#!/usr/bin/env bash
# The README's Hummingbird example, built and run: `scripts/check-hummingbird.sh`.
# Builds Examples/Announce (a Hummingbird app, its own package: Hummingbird takes 3-4 minutes
# to build on 2 cores, so the CI suite does not), checks that the README's snippet is that
# app's code word for word, then starts a Redis, the chat example (`runserver` on that Redis)
# and the Hummingbird app, opens a socket on the chat's lobby, POSTs 100 announcements to the
# Hummingbird app and counts them on the socket: every one, once, in order.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bench/common.sh
PY=${PYTHON:-.venv-interop/bin/python}
DIR=$(mktemp -d)
cleanup() {
  for name in announce chat; do [ -f "$DIR/$name.pid" ] && kill "$(cat "$DIR/$name.pid")" 2>/dev/null; done
  stop_redis "$DIR"
  rm -rf "$DIR"
}
trap cleanup EXIT

python3 scripts/check-docs.py

log "building the chat example and Examples/Announce (Hummingbird)"
swift build --package-path Examples --product chat >/dev/null
swift build --package-path Examples/Announce >/dev/null
CHAT="$(swift build --package-path Examples --show-bin-path)/chat"
ANNOUNCE="$(swift build --package-path Examples/Announce --show-bin-path)/Announce"

start_redis "$DIR"
CHAT_PORT=$(free_port)
ANNOUNCE_PORT=$(free_port)
CHAT_DATABASE="$DIR/chat.sqlite3" "$CHAT" runserver --port "$CHAT_PORT" --layer "$REDIS" > "$DIR/chat.log" 2>&1 &
echo $! > "$DIR/chat.pid"
CHANNEL_LAYER="$REDIS" PORT="$ANNOUNCE_PORT" "$ANNOUNCE" > "$DIR/announce.log" 2>&1 &
echo $! > "$DIR/announce.pid"
for port in "$CHAT_PORT" "$ANNOUNCE_PORT"; do
  for _ in $(seq 1 300); do
    python3 -c "import socket,sys; socket.create_connection(('127.0.0.1', $port), 1)" 2>/dev/null && break
    sleep 0.1
  done
done

"$PY" - "$CHAT_PORT" "$ANNOUNCE_PORT" <<'PYTHON' || { cat "$DIR/chat.log" "$DIR/announce.log" >&2; exit 1; }
import asyncio, http.client, json, sys, time
import websockets

chat, announce = int(sys.argv[1]), int(sys.argv[2])

async def main():
    async with websockets.connect("ws://127.0.0.1:%d/chat/lobby/" % chat, open_timeout=30) as ws:
        # Joined once the room's first frame (its presence list) arrived.
        await asyncio.wait_for(ws.recv(), 30)
        sent = []
        for i in range(100):
            text = "announcement %d %d" % (i, time.time_ns())
            conn = http.client.HTTPConnection("127.0.0.1", announce, timeout=10)
            await asyncio.to_thread(conn.request, "POST", "/announce", text)
            status = (await asyncio.to_thread(conn.getresponse)).status
            conn.close()
            assert status == 202, "POST /announce answered %d" % status
            sent.append(text)
        got = []
        deadline = time.time() + 30
        while len(got) < len(sent) and time.time() < deadline:
            frame = await asyncio.wait_for(ws.recv(), max(0.1, deadline - time.time()))
            if frame.startswith("announcement "):
                got.append(frame)
        assert got == sent, "the lobby socket got %d of %d announcements (or out of order)" % (len(got), len(sent))
        print("==> 100 announcements POSTed to Hummingbird reached the chat's lobby socket, each once, in order")

asyncio.run(main())
PYTHON
