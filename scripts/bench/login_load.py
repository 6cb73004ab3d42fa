"""WebSocket echo latency while logins hash passwords: idle; then with N clients sending the
same kind of HTTP traffic without any hashing (a CSRF fetch and a login form refused before its
password is hashed, then a 1-2 s pause, about what a refused login waits): the reference that
separates the cost of serving HTTP requests on the server's CPU from the cost of hashing; then
with N clients logging in concurrently and continuously. Prints the p50/p99 of each phase,
the request rates, and the ratios.

Usage: login_load.py PORT [LOGINS] [ECHOES]
The server (the example, `chat runserver`) must be running on 127.0.0.1:PORT.
"""
import asyncio
import http.client
import json
import multiprocessing
import os
import random
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


def login_process(stop, counts, threads, hashing):
    # The load generator stands in for other machines: it must not take the CPU from the echo
    # client whose latency is measured (nor from the server) when they share cores.
    os.nice(19)
    def loop():
        while not stop.is_set():
            if hashing:
                status, retry = post("/api/login/", "username=bench&password=bench-password", csrf(), with_headers=True)
            else:
                # Refused before the hash (a password is 4 characters or more): HTTP work only.
                status, retry = post("/api/login/", "username=bench&password=x", csrf(), with_headers=True)
            with counts.get_lock():
                counts[0 if status == 200 else 1 if status == 503 else 2] += 1
                counts[3] += 2  # requests: the CSRF fetch and the POST
            if status in (429, 503):
                time.sleep(float(retry or 1))
            elif status == 400:
                time.sleep(random.uniform(1, 2))

    workers = [threading.Thread(target=loop, daemon=True) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)


def loaded_phase(hashing):
    """Echo latencies while LOGINS clients run; returns (latencies, counts during, seconds)."""
    stop = multiprocessing.Event()
    counts = multiprocessing.Array("i", 4)
    procs = [multiprocessing.Process(target=login_process, args=(stop, counts, LOGINS // 2 + (i < LOGINS % 2), hashing))
             for i in range(2)]
    for p in procs:
        p.start()
    time.sleep(2)
    started = time.time()
    before = list(counts)
    latencies = asyncio.run(echo_latencies(ECHOES))
    seconds = time.time() - started
    during = [a - b for a, b in zip(counts, before)]
    stop.set()
    for p in procs:
        p.join(90)
    return latencies, during, seconds


def main():
    token = csrf()
    assert post("/api/register/", "username=bench&password=bench-password", token) in (200, 409)
    idle = asyncio.run(echo_latencies(ECHOES))
    # The clients run in processes of their own (the echo client's timing must not share a GIL
    # with them), each thread a client that logs in again as soon as it is answered, and waits
    # the Retry-After a 503 or 429 gives it, as a real client would.
    plain, plain_counts, plain_seconds = loaded_phase(hashing=False)
    assert plain_counts[2] > 0 and plain_counts[0] == 0 and plain_counts[1] == 0, plain_counts
    loaded, during, seconds = loaded_phase(hashing=True)
    print("| | echo p50 | echo p99 | HTTP requests | logins answered |")
    print("|---|---:|---:|---:|---:|")
    print("| idle | %.2f ms | %.2f ms | | |" % (statistics.median(idle), pct(idle, 0.99)))
    print("| %d clients, HTTP without hashing | %.2f ms | %.2f ms | %.0f/s | %d refused before hashing (400) |" % (
        LOGINS, statistics.median(plain), pct(plain, 0.99), plain_counts[3] / plain_seconds, plain_counts[2]))
    print("| %d concurrent logins | %.2f ms | %.2f ms | %.0f/s | %d ok (%.1f/s), %d busy (503), %d other |" % (
        LOGINS, statistics.median(loaded), pct(loaded, 0.99), during[3] / seconds, during[0], during[0] / seconds,
        during[1], during[2]))
    print("p99 loaded / idle: %.2f" % (pct(loaded, 0.99) / pct(idle, 0.99)))
    print("p99 HTTP without hashing / idle: %.2f" % (pct(plain, 0.99) / pct(idle, 0.99)))
    print("p99 logins / HTTP without hashing: %.2f (what the hashing itself adds)" % (pct(loaded, 0.99) / pct(plain, 0.99)))


main()
