"""WebSocket echo latency while logins hash passwords: idle, then with N clients logging in
concurrently and continuously. Prints the p50/p99 of each phase and the ratio.

Usage: login_load.py PORT [LOGINS] [ECHOES]
The server (the example, `chat runserver`) must be running on 127.0.0.1:PORT.
"""
import asyncio
import http.client
import json
import statistics
import sys
import threading
import time

import websockets

PORT = int(sys.argv[1])
LOGINS = int(sys.argv[2]) if len(sys.argv) > 2 else 50
ECHOES = int(sys.argv[3]) if len(sys.argv) > 3 else 400


def post(path, form, token=None, cookie=None):
    conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=60)
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    if token:
        headers["X-CSRFToken"] = token
        headers["Cookie"] = "csrftoken=" + token + ("; " + cookie if cookie else "")
    conn.request("POST", path, body=form, headers=headers)
    resp = conn.getresponse()
    resp.read()
    conn.close()
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


def main():
    token = csrf()
    assert post("/api/register/", "username=bench&password=bench-password", token) in (200, 409)
    idle = asyncio.run(echo_latencies(ECHOES))
    stop = threading.Event()
    counts = {"ok": 0, "other": 0}
    lock = threading.Lock()

    def login_loop():
        while not stop.is_set():
            t = csrf()
            status = post("/api/login/", "username=bench&password=bench-password", t)
            with lock:
                counts["ok" if status == 200 else "other"] += 1

    threads = [threading.Thread(target=login_loop, daemon=True) for _ in range(LOGINS)]
    for t in threads:
        t.start()
    time.sleep(1)
    started = time.time()
    loaded = asyncio.run(echo_latencies(ECHOES))
    seconds = time.time() - started
    stop.set()
    for t in threads:
        t.join(60)
    print("| | echo p50 | echo p99 | logins answered |")
    print("|---|---:|---:|---:|")
    print("| idle | %.2f ms | %.2f ms | |" % (statistics.median(idle), pct(idle, 0.99)))
    print("| %d concurrent logins | %.2f ms | %.2f ms | %d ok (%.1f/s), %d other |" % (
        LOGINS, statistics.median(loaded), pct(loaded, 0.99), counts["ok"], counts["ok"] / seconds, counts["other"]))
    print("p99 loaded / idle: %.2f" % (pct(loaded, 0.99) / pct(idle, 0.99)))


main()
