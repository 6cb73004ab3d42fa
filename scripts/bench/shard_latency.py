"""WebSocket echo latency through the example on sharded Redis (scripts/bench-shards.sh).

    shard_latency.py HOST:PORT[,HOST:PORT...] CLIENTS SECONDS PAUSE_MS [PATH]

CLIENTS sockets on PATH (/echo/ by default; "{}" in it becomes the client's number, so
PeerChat's rooms of one echo too), spread over the servers given, each sending one message, waiting for its echo, then pausing a random
0-PAUSE_MS ms: sparse traffic, so the worker keeps going back to an idle wait, where a one-shard
wait can miss (busy traffic hides it: a message soon arrives on whichever shard it waits on). Prints
one JSON object: sent, received, p50/p99/max round trip in ms. Exits non-zero on a lost echo.
"""
import asyncio
import json
import random
import sys
import time

import websockets

ADDRESSES = sys.argv[1].split(",")
CLIENTS, SECONDS, PAUSE = int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]) / 1000
PATH = sys.argv[5] if len(sys.argv) > 5 else "/echo/"


async def client(index, deadline, times, counts):
    address = ADDRESSES[index % len(ADDRESSES)]
    async with websockets.connect("ws://%s%s" % (address, PATH.replace("{}", str(index))), open_timeout=10) as ws:
        n = 0
        while time.monotonic() < deadline:
            await asyncio.sleep(random.uniform(0, PAUSE))
            text = "c%d-%d" % (index, n)
            started = time.perf_counter()
            await ws.send(text)
            counts["sent"] += 1
            got = await asyncio.wait_for(ws.recv(), 15)
            assert got == text, (got, text)
            counts["received"] += 1
            times.append((time.perf_counter() - started) * 1000)
            n += 1


async def main():
    times, counts = [], {"sent": 0, "received": 0}
    deadline = time.monotonic() + SECONDS
    await asyncio.gather(*(client(i, deadline, times, counts) for i in range(CLIENTS)))
    times.sort()
    pick = lambda p: times[min(len(times) - 1, int(len(times) * p))]
    print(json.dumps({**counts, "p50_ms": pick(0.5), "p99_ms": pick(0.99), "max_ms": times[-1]}))
    if counts["sent"] != counts["received"]:
        sys.exit("lost echoes: %(sent)d sent, %(received)d received" % counts)


asyncio.run(main())
