"""Fan-out benchmark client: one room of N members over the given servers, the same protocol
for every stack (the peers' chat: the path is the room, text is relayed verbatim to every
member, sender included).

  fanout_client.py LABEL PORT[,PORT...] [--members N] [--messages M] [--burst B]

Prints one JSON line: time from send to the last member (p50/p99 over M paced messages),
deliveries per second for a burst of B back-to-back messages, and what arrived out of what
was expected.
"""
import argparse
import asyncio
import json
import statistics
import time

import websockets


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("label")
    parser.add_argument("ports")
    parser.add_argument("--members", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=20)
    parser.add_argument("--burst", type=int, default=20)
    parser.add_argument("--json", action="store_true", help="frames are JSON publications: match on their text")
    opts = parser.parse_args()
    ports = [int(p) for p in opts.ports.split(",")]
    room = "fanout%d" % time.time_ns()
    arrivals = {}  # text -> list of arrival times
    sockets = []

    async def reader(ws):
        try:
            async for frame in ws:
                if opts.json:
                    # History on: {"offset":…,"epoch":…,"text":…}; the server's own frames are not messages.
                    event = json.loads(frame)
                    if "text" not in event:
                        continue
                    frame = event["text"]
                arrivals.setdefault(frame, []).append(time.perf_counter())
        except websockets.ConnectionClosed:
            pass

    # Joins 20 at a time: channels_redis's connection pool refuses more concurrent group_adds.
    for start in range(0, opts.members, 20):
        async def one(i):
            ws = await websockets.connect("ws://127.0.0.1:%d/%s/" % (ports[i % len(ports)], room),
                                          max_queue=None, ping_interval=None, open_timeout=60)
            return ws
        batch = await asyncio.gather(*(one(i) for i in range(start, min(opts.members, start + 20))))
        sockets += batch
    readers = [asyncio.ensure_future(reader(ws)) for ws in sockets]
    await asyncio.sleep(1.0)  # every join has reached the group
    sender = sockets[0]

    async def wait_for(texts, timeout=60):
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if all(len(arrivals.get(t, [])) >= opts.members for t in texts):
                return True
            await asyncio.sleep(0.005)
        return False

    to_all = []
    for i in range(opts.messages):
        text = "paced %d" % i
        sent = time.perf_counter()
        await sender.send(text)
        await wait_for([text])
        got = arrivals.get(text, [])
        if len(got) >= opts.members:
            to_all.append(max(got) - sent)
    burst = ["burst %d" % i for i in range(opts.burst)]
    started = time.perf_counter()
    for text in burst:
        await sender.send(text)
    await wait_for(burst)
    delivered_burst = sum(len(arrivals.get(t, [])) for t in burst)
    last = max((max(arrivals[t]) for t in burst if arrivals.get(t)), default=started)
    expected = opts.members * (opts.messages + opts.burst)
    delivered = sum(len(arrivals.get(t, [])) for t in ["paced %d" % i for i in range(opts.messages)]) + delivered_burst
    for ws in sockets:
        await ws.close()
    for r in readers:
        r.cancel()
    to_all.sort()
    print(json.dumps({
        "stack": opts.label, "members": opts.members, "servers": len(ports),
        "delivered": delivered, "expected": expected,
        "to_all_p50_ms": round(statistics.median(to_all) * 1000, 1) if to_all else None,
        "to_all_p99_ms": round(to_all[min(len(to_all) - 1, int(len(to_all) * 0.99))] * 1000, 1) if to_all else None,
        "burst_deliveries_per_s": round(delivered_burst / max(1e-9, last - started)),
    }), flush=True)


asyncio.run(main())
