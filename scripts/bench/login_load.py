"""WebSocket echo latency while logins hash passwords: idle, then with N clients logging in
concurrently and continuously. Prints the p50/p99 of each phase and the ratio.

Usage: login_load.py PORT [LOGINS] [ECHOES]
The server (the example, `chat runserver`) must be running on 127.0.0.1:PORT.
"""
import asyncio
import http.client
import json
import multiprocessing
import os
import statistics
import sys
import threading
import time

import websockets

PORT = int(sys.argv[1])
LOGINS = int(sys.argv[2]) if len(sys.argv) > 2 else 50
ECHOES = int(sys.argv[3]) if len(sys.argv) > 3 else 400


def post(path, form, token=None, cookie=None, with_headers=False):
    conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=60)
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    if token:
        headers["X-CSRFToken"] = token
        headers["Cookie"] = "csrftoken=" + token + ("; " + cookie if cookie else "")
    conn.request("POST", path, body=form, headers=headers)
    resp = conn.getresponse()
    resp.read()
    conn.close()
    if with_headers:
        return resp.status, resp.getheader("Retry-After")
    return resp.status


def csrf():
    conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=60)
    conn.request("GET", "/api/csrf/")
    token = json.loads(conn.getresponse().read())["csrf_token"]
    conn.close()
    return token


async def echo_latencies(count):
    async with websockets.connect("ws://127.0.0.1:%d/echo/" % PORT) as ws:
        out = []
        for i in range(count):
            start = time.perf_counter()
            await ws.send("ping %d" % i)
            assert await asyncio.wait_for(ws.recv(), 30) == "ping %d" % i
            out.append((time.perf_counter() - start) * 1000)
            await asyncio.sleep(0.005)
        return out


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


def login_process(stop, counts, threads):
    # The load generator stands in for other machines: it must not take the CPU from the echo
    # client whose latency is measured (nor from the server) when they share cores.
    os.nice(19)
    def loop():
        while not stop.is_set():
            status, retry = post("/api/login/", "username=bench&password=bench-password", csrf(), with_headers=True)
            with counts.get_lock():
                counts[0 if status == 200 else 1 if status == 503 else 2] += 1
            if status in (429, 503):
                time.sleep(float(retry or 1))

    workers = [threading.Thread(target=loop, daemon=True) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)


def main():
    token = csrf()
    assert post("/api/register/", "username=bench&password=bench-password", token) in (200, 409)
    idle = asyncio.run(echo_latencies(ECHOES))
    # The logins run in processes of their own (the echo client's timing must not share a GIL
    # with them), each thread a client that logs in again as soon as it is answered, and waits
    # the Retry-After a 503 or 429 gives it, as a real client would.
    stop = multiprocessing.Event()
    counts = multiprocessing.Array("i", 3)
    procs = [multiprocessing.Process(target=login_process, args=(stop, counts, LOGINS // 2 + (i < LOGINS % 2)))
             for i in range(2)]
    for p in procs:
        p.start()
    time.sleep(2)
    started = time.time()
    before = list(counts)
    loaded = asyncio.run(echo_latencies(ECHOES))
    seconds = time.time() - started
    during = [a - b for a, b in zip(counts, before)]
    stop.set()
    for p in procs:
        p.join(90)
    print("| | echo p50 | echo p99 | logins answered |")
    print("|---|---:|---:|---:|")
    print("| idle | %.2f ms | %.2f ms | |" % (statistics.median(idle), pct(idle, 0.99)))
    print("| %d concurrent logins | %.2f ms | %.2f ms | %d ok (%.1f/s), %d busy (503), %d other |" % (
        LOGINS, statistics.median(loaded), pct(loaded, 0.99), during[0], during[0] / seconds, during[1], during[2]))
    print("p99 loaded / idle: %.2f" % (pct(loaded, 0.99) / pct(idle, 0.99)))


main()
