"""The client host of scripts/cluster-netns.sh: drives the example across the network.

    cluster_client.py HOST:PORT check ROOM_PREFIX     HTTP, echo, room chat, an ordered burst
    cluster_client.py HOST:PORT latency N             N echo round trips; prints p50/p99 in ms
    cluster_client.py HOST:PORT until-ok SECONDS      repeats `check` until it passes (recovery)
    cluster_client.py HOST:PORT partition OTHER NETNS REDIS_ADDRS SECONDS
                                                  a partition between server OTHER (in NETNS) and
                                                  the Redis hosts: nft DROP both ways for SECONDS
                                                  while 50 sockets on each server follow one room

Counts every message sent and received; exits non-zero with the reason on any shortfall.
"""
import asyncio
import http.client
import json
import subprocess
import sys
import time

import websockets

ADDRESS = sys.argv[1]
HOST, PORT = ADDRESS.rsplit(":", 1)


def get(path):
    conn = http.client.HTTPConnection(HOST, int(PORT), timeout=10)
    conn.request("GET", path)
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, body


async def join(room):
    ws = await websockets.connect("ws://%s/chat/%s/" % (ADDRESS, room), open_timeout=10)
    history = json.loads(await asyncio.wait_for(ws.recv(), 10))
    assert history["type"] == "history", history
    return ws


async def receive_texts(ws, count, timeout):
    texts = []
    deadline = time.time() + timeout
    while len(texts) < count and time.time() < deadline:
        try:
            frame = json.loads(await asyncio.wait_for(ws.recv(), max(0.1, deadline - time.time())))
        except asyncio.TimeoutError:
            break
        if frame.get("type") == "message":
            texts.append(frame["text"])
    return texts


async def check(prefix):
    for i in range(20):
        status, body = get("/hello/%s-%d" % (prefix, i))
        assert status == 200 and body.endswith(b"/hello/%s-%d" % (prefix.encode(), i)), (status, body)
    async with websockets.connect("ws://%s/echo/" % ADDRESS, open_timeout=10) as ws:
        for i in range(20):
            await ws.send("echo %d" % i)
            got = await asyncio.wait_for(ws.recv(), 10)
            assert got == "echo %d" % i, got
    # Two rooms (their groups land on the shards the ring gives), two members each.
    for room in ("%s-a" % prefix, "%s-b" % prefix):
        a, b = await join(room), await join(room)
        await a.send("hello %s" % room)
        for ws in (a, b):
            got = await receive_texts(ws, 1, 10)
            assert got == ["hello %s" % room], (room, got)
        await a.close()
        await b.close()
    # An ordered burst: 100 messages from one socket, every member gets all, in order.
    room = "%s-burst" % prefix
    members = [await join(room) for _ in range(3)]
    texts = ["burst %03d" % i for i in range(100)]
    for t in texts:
        await members[0].send(t)
    for m in members:
        got = await receive_texts(m, len(texts), 30)
        assert got == texts, "member got %d of %d, in order: %s" % (len(got), len(texts), got == texts[:len(got)])
    for m in members:
        await m.close()
    print("check %s: 20 HTTP, 20 echoes, 2 rooms x 2 members, burst of 100 to 3 members: all delivered in order"
          % prefix, flush=True)


async def latency(n):
    async with websockets.connect("ws://%s/echo/" % ADDRESS, open_timeout=10) as ws:
        times = []
        for i in range(n):
            start = time.perf_counter()
            await ws.send("rtt %d" % i)
            assert await asyncio.wait_for(ws.recv(), 10) == "rtt %d" % i
            times.append((time.perf_counter() - start) * 1000)
    times.sort()
    print("echo round trip over %d: p50 %.2f ms, p99 %.2f ms" % (n, times[n // 2], times[int(n * 0.99) - 1]), flush=True)


class Follower:
    """A room socket that keeps every frame (messages carry their offset and epoch)."""

    def __init__(self, ws):
        self.ws = ws
        self.frames = []
        self.task = asyncio.ensure_future(self.read())

    async def read(self):
        try:
            async for frame in self.ws:
                self.frames.append(json.loads(frame))
        except websockets.ConnectionClosed:
            pass

    def messages(self):
        return [f for f in self.frames if f.get("type") == "message"]

    def marker(self):
        return next((f for f in self.frames if f.get("type") in ("recovered", "position")), None)


async def follow(address, room, query=""):
    ws = await websockets.connect("ws://%s/chat/%s/%s" % (address, room, query), open_timeout=30,
                                  max_queue=None, ping_interval=None)
    return Follower(ws)


async def until(check, what, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("timed out after %.0f s waiting for %s" % (timeout, what))


def nft(netns, *command):
    subprocess.run(["ip", "netns", "exec", netns, "nft", *command], check=True)


async def partition(cut_address, netns, redis_addresses, seconds):
    """50 sockets on the server at ADDRESS (B) and 50 on the one at cut_address (A) follow one
    room; a socket on B posts every 100 ms. A's host then drops every packet to and from the
    Redis hosts (nft, both ways: no reset, no link-down) for `seconds`. A's sockets must be closed
    with 1012 (A knows it was cut off), come back through A once healed with their last position
    and recover every message, complete; B's sockets must lose nothing. Every message counted."""
    room = "partition%d" % time.time_ns()
    on_a = [await follow(cut_address, room) for _ in range(50)]
    on_b = [await follow(ADDRESS, room) for _ in range(50)]
    poster = await follow(ADDRESS, room)
    for f in on_a + on_b + [poster]:
        await until(lambda: f.marker() is not None, "every socket's position", 30)
    sent = []

    async def posting(duration):
        deadline = time.time() + duration
        while time.time() < deadline:
            text = "tick %d" % len(sent)
            await poster.ws.send(json.dumps({"text": text}))
            sent.append(text)
            await asyncio.sleep(0.1)

    await posting(1)
    addresses = "{ %s }" % ", ".join(redis_addresses)
    nft(netns, "add", "table", "inet", "partition")
    try:
        for chain, hook, match in (("out", "output", "daddr"), ("in", "input", "saddr")):
            nft(netns, "add", "chain", "inet", "partition", chain, "{ type filter hook %s priority 0 ; }" % hook)
            nft(netns, "add", "rule", "inet", "partition", chain, "ip", match, addresses, "drop")
        cut_at = time.time()
        await posting(seconds)
    finally:
        nft(netns, "delete", "table", "inet", "partition")
    healed_at = time.time()
    # A closes its sockets once cut off for its --cut-off-timeout; the close completes when the
    # client's answer is read or at the server's 5 s fallback.
    await until(lambda: all(f.ws.close_code is not None for f in on_a), "A's sockets to be closed", 15)
    codes = [f.ws.close_code for f in on_a]
    assert codes == [1012] * 50, "A's sockets after a %.0f s partition: %s" % (seconds, codes)
    back = []
    for f in on_a:
        last = f.messages()[-1]
        back.append(await follow(cut_address, room, "?offset=%d&epoch=%s" % (last["offset"], last["epoch"])))
    await posting(2)
    await until(lambda: all(len(f.messages()) >= len(sent) for f in on_b + [poster]), "B's sockets to get all", 30)
    for f in on_b + [poster]:
        assert [m["text"] for m in f.messages()] == sent, "a socket on B lost messages"
    for old, new in zip(on_a, back):
        await until(lambda: new.marker() is not None, "the recovered marker", 30)
        assert new.marker()["type"] == "recovered" and new.marker()["complete"] is True, new.marker()
        await until(lambda: len(old.messages()) + len(new.messages()) >= len(sent), "A's socket to catch up", 30)
        texts = [m["text"] for m in old.messages()] + [m["text"] for m in new.messages()]
        assert texts == sent, "a socket on A got %d of %d (or out of order)" % (len(texts), len(sent))
    print("partition: %.0f s of nft DROP between A and Redis; A's 50 sockets closed with 1012 and recovered every "
          "message once, in order; B's 50 lost nothing; %d messages, %d deliveries counted (healed %.1f s ago)"
          % (healed_at - cut_at, len(sent), len(sent) * 101, time.time() - healed_at), flush=True)
    for f in back + on_b + [poster]:
        await f.ws.close()


def main():
    command = sys.argv[2]
    if command == "check":
        asyncio.run(check(sys.argv[3]))
    elif command == "latency":
        asyncio.run(latency(int(sys.argv[3])))
    elif command == "until-ok":
        deadline = time.time() + float(sys.argv[3])
        attempt = 0
        while True:
            attempt += 1
            try:
                asyncio.run(check("recovered%d" % attempt))
                print("recovered after %d attempt(s)" % attempt, flush=True)
                return
            except Exception as error:  # noqa: BLE001 - retried until the deadline
                if time.time() > deadline:
                    raise
                print("not yet (%s: %s)" % (type(error).__name__, error), flush=True)
                time.sleep(1)
    elif command == "partition":
        asyncio.run(partition(sys.argv[3], sys.argv[4], sys.argv[5].split(","), float(sys.argv[6])))
    else:
        sys.exit("unknown command " + command)


if __name__ == "__main__":
    main()
