"""Opens N WebSockets to a server (rooms of 100: /r<i % 100>/), waits, then closes them all at
once in random order; prints one JSON line: the server process's CPU (from /proc) per open and
per close, and the wall times. Used by scripts/bench-closes.sh.

    open_close.py PORT N SERVER_PID
"""
import asyncio
import json
import os
import random
import resource
import sys

import websockets

port, count, pid = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
TICK = os.sysconf("SC_CLK_TCK")


def cpu():
    fields = open("/proc/%d/stat" % pid).read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


async def settle():
    """Until the server's CPU stops moving (under a tick per half second), bounded."""
    last = cpu()
    for _ in range(120):
        await asyncio.sleep(0.5)
        now = cpu()
        if now - last <= 1.0 / TICK:
            return
        last = now


async def main():
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(200)

    async def open_one(i):
        async with gate:
            return await websockets.connect("ws://127.0.0.1:%d/r%d/" % (port, i % 100), ping_interval=None, open_timeout=60)

    c0, t0 = cpu(), loop.time()
    sockets = await asyncio.gather(*(open_one(i) for i in range(count)))
    await settle()
    c1, t1 = cpu(), loop.time()
    random.shuffle(sockets)
    await asyncio.gather(*(s.close() for s in sockets))
    await settle()
    c2, t2 = cpu(), loop.time()
    print(json.dumps({"sockets": count, "open_us": 1e6 * (c1 - c0) / count, "close_us": 1e6 * (c2 - c1) / count,
                      "open_s": round(t1 - t0, 2), "close_s": round(t2 - t1, 2)}))


asyncio.run(main())
