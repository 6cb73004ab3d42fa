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
from cut_off import cut_off_and_recover

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


def nft(netns, *command):
    subprocess.run(["ip", "netns", "exec", netns, "nft", *command], check=True)


async def partition(cut_address, netns, redis_addresses, seconds):
    """50 sockets on the server at ADDRESS (B) and 50 on the one at cut_address (A) follow one
    room; a socket on B posts every 100 ms. A's host then drops every packet to and from the
    Redis hosts (nft, both ways: no reset, no link-down) for `seconds`. A's sockets must be closed
    with 1012 (A knows it was cut off), come back through A once healed with their last position
    and recover every message, complete; B's sockets must lose nothing. Every message counted."""
    addresses = "{ %s }" % ", ".join(redis_addresses)

    def cut():
        nft(netns, "add", "table", "inet", "partition")
        for chain, hook, match in (("out", "output", "daddr"), ("in", "input", "saddr")):
            nft(netns, "add", "chain", "inet", "partition", chain, "{ type filter hook %s priority 0 ; }" % hook)
            nft(netns, "add", "rule", "inet", "partition", chain, "ip", match, addresses, "drop")

    def heal():
        nft(netns, "delete", "table", "inet", "partition")

    started = time.time()
    sent = await cut_off_and_recover("ws://" + cut_address, "ws://" + ADDRESS, "partition%d" % time.time_ns(), 50,
                                     cut, heal, seconds, 15)
    print("partition: %.0f s of nft DROP between A and Redis (%.0f s in all); A's 50 sockets closed with 1012 and "
          "recovered every message once, in order; B's 50 lost nothing; %d messages, %d deliveries counted"
          % (seconds, time.time() - started, sent, sent * 101), flush=True)


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
