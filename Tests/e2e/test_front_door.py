"""The front door under attack (issue 27), with real processes and real sockets.

Each attack runs against a real `chat runserver` while a well-behaved client (the probe) does a
`GET /hello/` and a WebSocket echo every 100 ms on connections it opened before the attack.
Every test states what bounds the attack (a timeout, a cap, a buffer bound), checks the
server's counters for it on /metrics, checks the server's RSS, and checks that the probe was
never refused and none of its sockets was closed. The probe's latency is printed (idle and under
attack); it is not asserted (machines are noisy): scripts/bench-front-door.sh states the figures.

Sizes: the defaults fit CI (2 cores, a few seconds per attack); FRONT_DOOR_SCALE=full runs the
sizes the issue names (1,000 slow-loris heads, 5,000 idle connections, 200 held upgrades, 20
non-reading downloads, 100 concurrent 16 MiB uploads, 10,000 frames among 100 sockets).

Run: .venv-interop/bin/python Tests/e2e/test_front_door.py CHAT_BINARY REDIS_URL
(E2E_ONLY=substring runs only the tests whose name has it.) Prints 'N passed, N failed'.
"""
import os
import sys

os.environ.setdefault("E2E_TEST_TIMEOUT", "240")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from support import *  # noqa: E402,F403

import asyncio  # noqa: E402
import hashlib  # noqa: E402
import http.client  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import ssl  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import redis as redis_py  # noqa: E402
from session_churn import http_get, metric_by_label  # noqa: E402  (the /metrics readers)
from session_churn import metric  # noqa: E402


def metric_value(port, name):
    """The value of `name` on /metrics, 0 while it has not been counted yet."""
    return metric(port, name) or 0
import websockets  # noqa: E402
from websockets.sync.client import connect as ws_connect  # noqa: E402

FULL = os.environ.get("FRONT_DOOR_SCALE") == "full"
SIZE = {
    "loris": 1000 if FULL else 300,
    "idle": 5000 if FULL else 600,
    "max_connections": 2000 if FULL else 400,
    "upgrades": 200 if FULL else 60,
    "downloads": 20 if FULL else 6,
    "uploads": 100 if FULL else 12,
    "burst_frames": 10000 if FULL else 3000,
    "chatters": 100 if FULL else 40,
}
RSS_BOUND_MB = 300
R = redis_py.StrictRedis.from_url(REDIS_URL.split("?")[0])
PREFIXES = []

soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def rss_mb(proc):
    with open("/proc/%d/status" % proc.p.pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


class RSSWatch(threading.Thread):
    """Samples a process's RSS every 100 ms; `peak` is the highest seen."""

    def __init__(self, proc):
        super().__init__(daemon=True)
        self.proc, self.peak, self.stopping = proc, 0.0, False

    def run(self):
        while not self.stopping:
            try:
                self.peak = max(self.peak, rss_mb(self.proc))
            except OSError:
                return
            time.sleep(0.1)

    def stop(self):
        self.stopping = True
        self.join(5)
        return self.peak


def pct(values, p):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p / 100.0))]


class Probe(threading.Thread):
    """The well-behaved client: on connections opened before the attack, a GET /hello/ and a
    WebSocket echo every 100 ms. Any refusal, error or closed socket is a failure."""

    def __init__(self, port, websocket=True):
        super().__init__(daemon=True)
        self.port, self.websocket = port, websocket
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        self.ws = ws_connect("ws://127.0.0.1:%d/echo/" % port, open_timeout=10) if websocket else None
        self.http, self.echo, self.failures = [], [], []
        self.mark = 0
        self.stopping = False

    def run(self):
        i = 0
        while not self.stopping:
            i += 1
            try:
                t = time.perf_counter()
                self.conn.request("GET", "/hello/", headers={"Host": "localhost"})
                resp = self.conn.getresponse()
                body = resp.read()
                if resp.status != 200 or b"Hello" not in body:
                    self.failures.append("GET /hello/ answered %d %r" % (resp.status, body[:80]))
                self.http.append(time.perf_counter() - t)
                if self.ws is not None:
                    t = time.perf_counter()
                    self.ws.send("probe %d" % i)
                    got = self.ws.recv(timeout=10)
                    if got != "probe %d" % i:
                        self.failures.append("echo %d came back as %r" % (i, got))
                    self.echo.append(time.perf_counter() - t)
            except Exception as error:  # noqa: BLE001 (any error is a failure of the probe)
                self.failures.append("%s: %s" % (type(error).__name__, error))
                return
            time.sleep(0.1)

    def start_attack(self):
        """Marks the end of the idle samples."""
        self.mark = (len(self.http), len(self.echo))

    def finish(self, what):
        self.stopping = True
        self.join(15)
        assert not self.is_alive(), "the probe hung"
        idle_h, idle_e = self.http[:self.mark[0]], self.echo[:self.mark[1]]
        att_h, att_e = self.http[self.mark[0]:], self.echo[self.mark[1]:]
        print("  probe during %s: GET p50/p99 %.1f/%.1f ms (idle %.1f/%.1f), echo p50/p99 %.1f/%.1f ms (idle %.1f/%.1f), %d requests, %d failures"
              % (what, 1e3 * pct(att_h, 50), 1e3 * pct(att_h, 99), 1e3 * pct(idle_h, 50), 1e3 * pct(idle_h, 99),
                 1e3 * pct(att_e, 50), 1e3 * pct(att_e, 99), 1e3 * pct(idle_e, 50), 1e3 * pct(idle_e, 99),
                 len(att_h), len(self.failures)), flush=True)
        assert not self.failures, ("the well-behaved client was refused or cut", self.failures[:5])
        assert len(att_h) >= 1, "the probe made no request during the attack"
        if self.ws is not None:
            self.ws.close()
        self.conn.close()


def limits(mport):
    return metric_by_label(mport, "channels_connection_limits_total", "limit")


def serve(*extra):
    """A runserver with a metrics port; returns (proc, port, metrics port)."""
    mport = free_port()
    proc, port = server("--metrics-port", str(mport), *extra)
    return proc, port, mport


def redis_pair(prefix, server_extra=(), worker_extra=()):
    """runserver --noworker and one runworker on a Redis prefix of their own."""
    PREFIXES.append(prefix)
    url = redis_url(prefix)
    mport, wport = free_port(), free_port()
    proc, port = server("--layer", url, "--noworker", "--metrics-port", str(mport), *server_extra)
    worker = Proc("runworker", "--layer", url, "--metrics-port", str(wport), *worker_extra)
    worker.wait_line("worker ready")
    return proc, port, mport, worker, wport


def stop_all(*procs):
    for p in procs:
        try:
            p.stop()
        except Exception:  # noqa: BLE001
            p.p.kill()


def open_many(port, count):
    socks = []
    for _ in range(count):
        s = socket.socket()
        s.setblocking(True)
        s.settimeout(10)
        s.connect(("127.0.0.1", port))
        socks.append(s)
    return socks


def open_event_streams(port, count):
    """`count` SSE streams of ten minutes (`/events/?n=600`), each past its first event."""
    streams = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.send(b"GET /events/?n=600 HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert b"event 0" in s.recv(4096)
        streams.append(s)
    return streams


def closed_within(sock, seconds):
    """What the server sent before closing `sock` (b'' for a plain close), or None if it was
    still open after `seconds`."""
    sock.settimeout(seconds)
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk
    except socket.timeout:
        return None
    except (ConnectionResetError, BrokenPipeError):
        return data


# ---------------------------------------------------------------------------------------------


@test
def slow_loris_heads_get_408_and_close():
    n = SIZE["loris"]
    proc, port, mport = serve("--header-timeout", "2")
    watch = RSSWatch(proc)
    watch.start()
    probe = Probe(port)
    probe.start()
    try:
        time.sleep(1.0)
        probe.start_attack()
        started = time.time()
        socks = open_many(port, n)
        for i, s in enumerate(socks):
            s.send(b"GET /hello/ HTTP/1.1\r\nHost: localhost\r\nX-Slow-%d: " % i)
        # Keep dripping a byte a second into every head: dripping buys no time.
        answers = []
        deadline = time.time() + 8
        pending = list(socks)
        while pending and time.time() < deadline:
            for s in list(pending):
                try:
                    s.send(b"a")
                except OSError:
                    pass
            time.sleep(0.5)
            still = []
            for s in pending:
                s.setblocking(False)
                try:
                    data = s.recv(4096)
                    answers.append(data)
                    s.close()
                except BlockingIOError:
                    still.append(s)
                except OSError:
                    answers.append(b"")
                    s.close()
            pending = still
        elapsed = time.time() - started
        assert not pending, "%d of %d slow heads still open after %.1f s" % (len(pending), n, elapsed)
        got408 = sum(1 for a in answers if a.startswith(b"HTTP/1.1 408"))
        print("  %d slow heads: %d answered 408, all closed within %.1f s" % (n, got408, elapsed))
        assert got408 >= n * 0.95, "only %d of %d got a 408" % (got408, n)
        counted = limits(mport).get("header_timeout", 0)
        assert counted >= n, ("header_timeout counted", counted, n)
        time.sleep(1)
        probe.finish("%d slow-loris heads" % n)
    finally:
        peak = watch.stop()
        print("  server RSS peak %.0f MB" % peak)
        stop_all(proc)
    assert peak < RSS_BOUND_MB, peak


@test
def a_body_dripped_under_the_minimum_rate_gets_408():
    """Bytes just inside every pause buy no time: past the first --body-timeout, a body must
    average --min-body-rate. A client at the rate is served."""
    proc, port, mport = serve("--body-timeout", "2", "--min-body-rate", "100")
    try:
        drips = []
        for _ in range(20):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.send(b"POST /poll/ HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100000\r\n\r\n")
            drips.append(s)
        started = time.time()
        answers = {}
        while len(answers) < len(drips) and time.time() - started < 15:
            for i, s in enumerate(drips):
                if i in answers:
                    continue
                try:
                    s.send(b"x" * 5)  # 5 bytes every 0.5 s: 10/s, pauses far under 2 s
                except OSError:
                    pass
                s.setblocking(False)
                try:
                    answers[i] = (s.recv(4096), time.time() - started)
                except BlockingIOError:
                    pass
                except OSError:
                    answers[i] = (b"", time.time() - started)
                s.setblocking(True)
            time.sleep(0.5)
        assert len(answers) == len(drips), "%d of %d dripped bodies still open after 15 s" % (
            len(drips) - len(answers), len(drips))
        got408 = sum(1 for data, _ in answers.values() if data.startswith(b"HTTP/1.1 408"))
        slowest = max(at for _, at in answers.values())
        # A client at the minimum rate: 300 bytes a second for 6 s, in parts of 150.
        s = socket.create_connection(("127.0.0.1", port), timeout=20)
        s.send(b"POST /poll/ HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1800\r\nConnection: close\r\n\r\n")
        for _ in range(12):
            s.send(b"y" * 150)
            time.sleep(0.5)
        answer = s.recv(4096)
        s.close()
        counted = limits(mport).get("body_timeout", 0)
        print("  20 bodies dripped at 10 B/s (pauses of 0.5 s): %d answered 408, the last after %.1f s; "
              "counted %d; a body at 300 B/s answered %r" % (got408, slowest, counted, answer[:12]))
        assert got408 == len(drips), got408
        assert slowest < 8, slowest
        assert counted >= len(drips), counted
        assert not answer.startswith(b"HTTP/1.1 408"), answer[:40]
    finally:
        stop_all(proc)


@test
def idle_connections_over_the_cap_are_refused_fast_and_time_out():
    n, cap = SIZE["idle"], SIZE["max_connections"]
    # The header timeout is longer than opening all n takes (5,000 took over 3 s once): an
    # admitted connection closed by it meanwhile frees a place that a later one takes, and the
    # count of refusals below would be short by as many.
    proc, port, mport = serve("--header-timeout", "8", "--max-connections", str(cap))
    watch = RSSWatch(proc)
    watch.start()
    probe = Probe(port)
    probe.start()
    try:
        time.sleep(1.0)
        probe.start_attack()
        opened = time.time()
        socks = open_many(port, n)
        opened = time.time() - opened
        # Over the cap (less the probe's two connections): a 503 at once, then closed.
        refused = 0
        for s in socks:
            s.settimeout(0.2)
            try:
                data = s.recv(4096)
                if data.startswith(b"HTTP/1.1 503") or data == b"":
                    refused += 1
            except socket.timeout:
                pass
            except ConnectionResetError:
                refused += 1
        expected = n - (cap - 2)
        print("  %d idle connections (opened in %.1f s) over a cap of %d: %d refused at once" % (n, opened, cap, refused))
        assert refused >= expected * 0.95, (refused, expected)
        counted = limits(mport).get("max_connections", 0)
        assert counted >= expected * 0.95, ("max_connections counted", counted, expected)
        # The admitted idle ones are closed by the header timeout; then new clients get in.
        until(lambda: limits(mport).get("idle", 0) >= cap - 2 - 5, "the idle connections closed", timeout=20)
        status, body = http_get(port, "/hello/")
        assert status == 200, status
        for s in socks:
            s.close()
        probe.finish("%d idle connections" % n)
    finally:
        peak = watch.stop()
        print("  server RSS peak %.0f MB" % peak)
        stop_all(proc)
    assert peak < RSS_BOUND_MB, peak


@test
def held_upgrades_streaming_garbage_are_bounded():
    """Upgrades the application does not answer (no worker takes websocket.connect) while the
    client streams bytes: reading is paused, memory stays bounded, each is refused at the
    connect timeout."""
    n = SIZE["upgrades"]
    proc, port, mport, worker, wport = redis_pair(
        "fdup%d:" % os.getpid(), server_extra=("--websocket-connect-timeout", "4"),
        worker_extra=("--exclude-channels", "websocket.connect"))
    watch = RSSWatch(proc)
    watch.start()
    probe = Probe(port, websocket=False)
    probe.start()
    try:
        time.sleep(1.0)
        probe.start_attack()
        socks = open_many(port, n)
        key = "dGhlIHNhbXBsZSBub25jZQ=="
        for s in socks:
            s.send(("GET /echo/ HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n" % key).encode())
            s.setblocking(False)
        junk = os.urandom(64 * 1024)
        sent = [0] * n
        deadline = time.time() + 3
        while time.time() < deadline:
            for i, s in enumerate(socks):
                try:
                    sent[i] += s.send(junk)
                except (BlockingIOError, OSError):
                    pass
            time.sleep(0.01)
        print("  %d held upgrades: %.1f MB sent by the clients in 3 s (the rest held back by TCP)"
              % (n, sum(sent) / 1e6))
        answers = [closed_within(s, 10) for s in socks]
        open_after = sum(1 for a in answers if a is None)
        assert open_after == 0, "%d held upgrades still open 10 s after the connect timeout" % open_after
        refused = sum(1 for a in answers if a and (a.startswith(b"HTTP/1.1 403") or a.startswith(b"HTTP/1.1 503")))
        overflow = limits(mport).get("upgrade_overflow", 0)
        print("  refused %d, closed for overflowing %d" % (refused, overflow))
        assert refused + overflow >= n * 0.95, (refused, overflow, n)
        probe.finish("%d held upgrades streaming garbage" % n)
    finally:
        peak = watch.stop()
        print("  server RSS peak %.0f MB" % peak)
        stop_all(proc, worker)
    assert peak < RSS_BOUND_MB, peak


class RedisMemoryWatch(threading.Thread):
    """The peak of Redis's used_memory while it runs (what the layer holds)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.base = R.info("memory")["used_memory"]
        self.peak = self.base
        self.done = threading.Event()

    def run(self):
        while not self.done.wait(0.05):
            self.peak = max(self.peak, R.info("memory")["used_memory"])

    def stop(self):
        self.done.set()
        self.join(5)
        return (self.peak - self.base) / (1 << 20)


@test
def downloads_nobody_reads_are_bounded_and_the_worker_stops():
    """A client that reads nothing holds at most the response credit in the layer and the
    server (the worker waits for the server's acknowledgements), and is closed by the write
    timeout; the worker's consumers stop when it is."""
    n = SIZE["downloads"]
    proc, port, mport, worker, wport = redis_pair(
        "fddl%d:" % os.getpid(), server_extra=("--max-response-buffer", str(8 << 20), "--write-timeout", "3"))
    watch = RSSWatch(proc)
    watch.start()
    redis_memory = RedisMemoryWatch()
    redis_memory.start()
    probe = Probe(port)
    probe.start()
    try:
        time.sleep(1.0)
        probe.start_attack()
        socks = []
        for _ in range(n):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(("127.0.0.1", port))
            s.send(b"GET /download/64/ HTTP/1.1\r\nHost: localhost\r\n\r\n")
            socks.append(s)
        until(lambda: limits(mport).get("slow_http_client", 0) >= n, "%d non-reading downloads closed" % n, timeout=60)
        until(lambda: metric_value(wport, "channels_http_streams_abandoned_total") >= n,
              "the worker stopped all %d downloads" % n, timeout=20)
        waits = metric_value(wport, "channels_http_stream_credit_waits_total")
        layer_mb = redis_memory.stop()
        print("  %d non-reading downloads of 64 MiB: all closed by the write timeout, the worker stopped all %d "
              "(it waited for credit %d times); Redis held at most %.1f MB more"
              % (n, metric_value(wport, "channels_http_streams_abandoned_total"), waits, layer_mb))
        assert waits >= n, waits
        # Each download may have its credit (a quarter of the 8 MiB bound) plus a chunk in flight.
        assert layer_mb < n * 3, layer_mb
        for s in socks:
            s.close()
        status, body = http_get(port, "/download/3/")
        assert status == 200 and len(body) == 3 << 20, (status, len(body))
        probe.finish("%d downloads nobody reads" % n)
    finally:
        redis_memory.stop()
        peak = watch.stop()
        print("  server RSS peak %.0f MB" % peak)
        stop_all(proc, worker)
    assert peak < RSS_BOUND_MB, peak


@test
def a_client_that_floods_pings_and_never_reads_gets_no_pongs_queued():
    """A socket that sends pings and never reads their pongs: the server used to answer every
    ping whatever was already queued (red team: 49 -> 332 MB in 25 s for 95 MB of pings). Past
    --max-queued-bytes pongs are no longer written (the client gets the pong of a later ping
    once it reads), so 40 MB of pings leave the server's memory where it was, and it serves on."""
    proc, port = server("--max-queued-bytes", "65536")
    try:
        before = rss_mb(proc)
        sock = raw_websocket(port, "/echo/")
        sock.settimeout(10)
        chunk = client_frame(9, b"x" * 125) * 512
        sent = 0
        while sent < (40 << 20):
            sock.sendall(chunk)
            sent += len(chunk)
        grown = rss_mb(proc) - before
        assert grown < 30, "the server's RSS grew %d MB for %d MB of pings" % (grown, sent >> 20)
        # It still echoes on that socket once the client reads again.
        sock.sendall(client_frame(1, b"still here"))
        sock.settimeout(30)
        seen = b""
        while b"still here" not in seen:
            data = sock.recv(1 << 20)
            assert data, "the server closed the socket"
            seen = (seen + data)[-(1 << 16):]
        sock.close()
        assert get(port, "/hello/after-pings")[0] == 200
        print("  40 MB of pings never read: RSS +%d MB; the socket still echoes" % grown, flush=True)
    finally:
        proc.stop(signal.SIGKILL)


@test
def a_slow_reader_gets_the_whole_download():
    """A client that reads slower than the worker makes the body gets all of it: the worker
    waits for the server's credit, so what waits for the client never passes the bound that
    closes a client that does not read (before the credit, it did: 64 MiB pushed at once)."""
    proc, port, mport, worker, wport = redis_pair(
        "fdsr%d:" % os.getpid(), server_extra=("--max-response-buffer", str(4 << 20)))
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        s.send(b"GET /download/24/ HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        received = bytearray()
        started = time.time()
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            received += chunk
            time.sleep(0.004)  # about 12 MiB/s at most, slower than the worker makes it
        s.close()
        head, _, body = bytes(received).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head[:80]
        assert len(body) == 24 << 20, len(body)
        waits = metric_value(wport, "channels_http_stream_credit_waits_total")
        closed = limits(mport).get("slow_http_client", 0)
        print("  24 MiB read slowly in %.1f s: every byte, the worker waited for credit %d times, %d slow-client closes"
              % (time.time() - started, waits, closed))
        assert waits > 0 and closed == 0, (waits, closed)
    finally:
        stop_all(proc, worker)


@test
def downloads_abandoned_before_their_consumer_starts_free_the_worker_at_once():
    """12 clients ask for /download/8/ and close at once, against a worker with 2 slots: each
    consumer starts after its client is gone, and its response start reaches a server that no
    longer holds the request. Red team: each then waited for credit for 120 s (its credit
    timeout), and 8 of them (the slots and as many lent) kept /hello/ from an answer for
    minutes. The server now tells such a response's disconnect channel that the client left."""
    proc, port, mport, worker, wport = redis_pair("fdab%d:" % os.getpid(), worker_extra=("--threads", "2"))
    try:
        for _ in range(12):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(b"GET /download/8/ HTTP/1.1\r\nHost: localhost\r\n\r\n")
            s.close()
        until(lambda: metric_value(wport, "channels_http_streams_abandoned_total") >= 12,
              "the worker to stop all 12 abandoned downloads", timeout=30)
        started = time.time()
        status, body = http_get(port, "/hello/")
        took = time.time() - started
        print("  12 downloads abandoned before their consumers started: all 12 stopped; /hello/ answered %d in %.2f s"
              % (status, took))
        assert status == 200 and took < 10, (status, took)
    finally:
        stop_all(proc, worker)


def in_child_threads(target, n, results, timeout):
    """Runs `target` in `n` threads of a forked child and returns what they appended to
    `results` there (bounded by `timeout`; a child that does not finish is killed)."""
    import multiprocessing
    context = multiprocessing.get_context("fork")
    queue = context.Queue()

    def child():
        threads = [threading.Thread(target=target) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout)
        queue.put(list(results))

    process = context.Process(target=child, daemon=True)
    process.start()
    try:
        return queue.get(timeout=timeout + 10)
    finally:
        process.join(5)
        if process.is_alive():
            process.kill()


@test
def concurrent_large_uploads_stream_through():
    n = SIZE["uploads"]
    size = 16 << 20
    proc, port, mport, worker, wport = redis_pair("fdul%d:" % os.getpid(), worker_extra=("--threads", str(max(4, n))))
    watch = RSSWatch(proc)
    watch.start()
    probe = Probe(port)
    probe.start()
    results = []
    try:
        time.sleep(1.0)
        probe.start_attack()
        payload = os.urandom(1 << 20) * 16

        def upload():
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                conn.request("POST", "/poll/", body=payload, headers={"Content-Type": "application/octet-stream"})
                resp = conn.getresponse()
                results.append((resp.status, resp.read()))
            except Exception as error:  # noqa: BLE001
                results.append((0, repr(error).encode()))

        # The uploads run in a child process: 100 sending threads beside the probe in one
        # interpreter would make the probe wait for the GIL, and its figure would be Python's.
        results = in_child_threads(upload, n, results, timeout=150)
        ok = sum(1 for status, body in results if status == 200 and json.loads(body).get("received") == size)
        print("  %d concurrent 16 MiB uploads: %d answered with every byte counted" % (n, ok))
        assert ok == n, [r for r in results if r[0] != 200][:3]
        probe.finish("%d concurrent 16 MiB uploads" % n)
    finally:
        peak = watch.stop()
        print("  server RSS peak %.0f MB" % peak)
        stop_all(proc, worker)
    assert peak < RSS_BOUND_MB, peak


@test
def one_bursting_socket_does_not_close_its_neighbours():
    frames, chatters = SIZE["burst_frames"], SIZE["chatters"]
    proc, port, mport, worker, wport = redis_pair("fdbu%d:" % os.getpid())
    probe = Probe(port)
    probe.start()

    async def run():
        room = "burst%d" % os.getpid()
        members = []
        for _ in range(chatters):
            ws = await websockets.connect("ws://127.0.0.1:%d/echo/" % port, max_queue=None)
            members.append(ws)
        burster = await websockets.connect("ws://127.0.0.1:%d/echo/" % port, max_queue=None)
        probe.start_attack()

        async def burst():
            for i in range(frames):
                await burster.send("b%d" % i)
            got = 0
            while got < frames:
                await asyncio.wait_for(burster.recv(), 60)
                got += 1
            return got

        latencies = []

        async def chat(ws, k):
            sent = 0
            for i in range(5):
                t = time.perf_counter()
                await ws.send("m%d-%d" % (k, i))
                sent += 1
                reply = await asyncio.wait_for(ws.recv(), 30)
                latencies.append(time.perf_counter() - t)
                assert reply == "m%d-%d" % (k, i), reply
                await asyncio.sleep(0.2)
            return sent

        results = await asyncio.gather(burst(), *[chat(ws, k) for k, ws in enumerate(members)], return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        print("  burst of %d frames among %d chatting sockets: burster got %r echoes, %d chatters done, %d errors"
              % (frames, chatters, results[0], sum(1 for r in results[1:] if r == 5), len(errors)))
        print("  the chatters' echo p50/p99 during the burst: %.1f/%.1f ms" % (1e3 * pct(latencies, 50), 1e3 * pct(latencies, 99)))
        assert not errors, errors[:3]
        for ws in members + [burster]:
            await ws.close()

    try:
        asyncio.run(run())
        paced = limits(mport).get("frames_paced", 0)
        print("  the burster was paced %d times (reading paused, nothing dropped)" % paced)
        assert paced > 0, "a socket sending %d frames at once was never paced" % frames
        probe.finish("a burst of %d frames" % frames)
    finally:
        stop_all(proc, worker)


@test
def server_sent_events_outlive_the_http_timeout_and_stop_with_their_client():
    proc, port, mport = serve("--http-timeout", "2")
    try:
        started = time.time()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
        conn.request("GET", "/events/?n=5")
        resp = conn.getresponse()
        body = resp.read().decode()
        elapsed = time.time() - started
        events = [line for line in body.splitlines() if line.startswith("data: ")]
        print("  a 5 s stream under --http-timeout 2: %d events in %.1f s" % (len(events), elapsed))
        assert resp.status == 200 and events == ["data: event %d" % i for i in range(6)], body
        assert elapsed >= 4.5, elapsed
        # A client that leaves: the consumer is cancelled (the worker's count moves) at once.
        before = metric_value(mport, "channels_http_streams_abandoned_total")
        s = socket.create_connection(("127.0.0.1", port))
        s.send(b"GET /events/?n=100 HTTP/1.1\r\nHost: localhost\r\n\r\n")
        s.settimeout(5)
        assert b"event 0" in s.recv(4096)
        s.close()
        left = time.time()
        until(lambda: metric_value(mport, "channels_http_streams_abandoned_total") > before,
              "the streaming consumer stopped", timeout=5)
        print("  a client that left a stream: its consumer stopped %.2f s later" % (time.time() - left))
        assert time.time() - left < 1.5
        # HEAD of a long stream: its headers, then the response ends at once on a kept-alive
        # connection, and the consumer is told (it stops instead of streaming for 100 s).
        before = metric_value(mport, "channels_http_streams_abandoned_total")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("HEAD", "/events/?n=100")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read() == b"", resp.status
        until(lambda: metric_value(mport, "channels_http_streams_abandoned_total") > before,
              "the streaming consumer behind a HEAD stopped", timeout=5)
        conn.request("GET", "/hello/")
        resp = conn.getresponse()
        assert resp.status == 200 and b"Hello" in resp.read(), "the connection after the HEAD"
        status, _ = http_get(port, "/hello/")
        assert status == 200
    finally:
        stop_all(proc)
    # The same across processes: the worker that streams hears of the client through Redis.
    proc, port, mport, worker, wport = redis_pair("fdsse%d:" % os.getpid(), server_extra=("--http-timeout", "2"))
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
        conn.request("GET", "/events/?n=3")
        body = conn.getresponse().read().decode()
        assert body.count("data: event") == 4, body
        s = socket.create_connection(("127.0.0.1", port))
        s.send(b"GET /events/?n=100 HTTP/1.1\r\nHost: localhost\r\n\r\n")
        s.settimeout(5)
        assert b"event 0" in s.recv(4096)
        s.close()
        left = time.time()
        until(lambda: metric_value(wport, "channels_http_streams_abandoned_total") >= 1,
              "the runworker's streaming consumer stopped", timeout=5)
        print("  through Redis: the runworker's consumer stopped %.2f s after its client left" % (time.time() - left))
    finally:
        stop_all(proc, worker)


# --- TLS and HTTP/2 ------------------------------------------------------------------------------

def make_certificate(directory, name):
    cert, key = os.path.join(directory, name + ".pem"), os.path.join(directory, name + "-key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "2", "-subj", "/CN=" + name, "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key


def served_certificate(port):
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port)) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            return hashlib.sha256(tls.getpeercert(binary_form=True)).hexdigest()


def fingerprint(cert_path):
    der = ssl.PEM_cert_to_DER_cert(open(cert_path).read())
    return hashlib.sha256(der).hexdigest()


@test
def streams_in_flight_when_redis_restarts_empty_are_cut_not_left_hanging():
    """Redis SIGKILLed and restarted empty under 5 open SSE streams: the chunks they wait for
    are gone with it, so the server cuts them (the client sees an error, never a stream that
    silently stops) and counts them; new streams work once Redis is back."""
    with own_redis("--appendonly", "no") as (rport, workdir, layer):
        mport, wport = free_port(), free_port()
        proc, port = server("--layer", layer, "--noworker", "--metrics-port", str(mport), "--http-timeout", "5")
        worker = Proc("runworker", "--layer", layer, "--threads", "8", "--metrics-port", str(wport))
        try:
            worker.wait_line("worker ready")
            streams = open_event_streams(port, 5)
            kill_redis(workdir)
            killed = time.time()
            time.sleep(1.0)
            start_redis(rport, workdir, "--appendonly", "no")
            ends = []
            for s in streams:
                s.settimeout(30)
                try:
                    while s.recv(65536):
                        pass
                except OSError:
                    pass
                ends.append(time.time() - killed)
                s.close()
            lost = limits(mport).get("store_lost", 0)
            # The consumers still streaming are told their clients are gone, and stop.
            until(lambda: metric_value(wport, "channels_http_streams_abandoned_total") >= 5,
                  "the worker stopped the 5 streams", timeout=20)
            print("  5 SSE streams across a Redis SIGKILL + empty restart: all cut within %.1f s; store_lost %d; "
                  "the worker stopped %d" % (max(ends), lost, metric_value(wport, "channels_http_streams_abandoned_total")))
            assert max(ends) < 20, ends
            assert lost >= 5, lost
            until(lambda: http_get(port, "/events/?n=1")[0] == 200, "a new stream after Redis came back", timeout=20)
            assert proc.p.poll() is None and worker.p.poll() is None, "nothing crashed"
        finally:
            stop_all(proc, worker)


@test
def a_stream_whose_worker_is_sigkilled_is_cut_and_a_live_workers_stream_runs_on():
    """A worker SIGKILLed under 50 open SSE streams (runserver --noworker + runworker
    --stream-lease 2 on Redis): before, nothing ended them and their clients waited forever.
    The worker holds a lease per stream and the server cuts the streams whose lease lapsed
    (the client sees an incomplete response and reconnects), every one of them counted. A live
    worker's stream three lease durations long runs whole, and a new worker serves new streams.
    A --stream-lease that is not a number of seconds from 2 to 86400 is a clear start-up error."""
    for bad in ("0", "1.5", "nan", "abc", "100000"):
        p = subprocess.run([CHAT, "runworker", "--layer", redis_url("fd-lease:"), "--stream-lease", bad],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode != 0 and "stream-lease" in p.stderr, (bad, p.returncode, p.stderr[-300:])
        if bad != "abc":  # not a number: the argument parser's own error names the flag
            assert "must be a number of seconds from 2 to 86400" in p.stderr, (bad, p.stderr[-300:])
    count = 50
    proc, port, mport, worker, wport = redis_pair("fd-lease:", worker_extra=("--stream-lease", "2", "--threads", "80"))
    replacement = None
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.send(b"GET /events/?n=6 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        whole = closed_within(s, 30)
        s.close()
        assert whole is not None and b"event 6" in whole and whole.endswith(b"0\r\n\r\n"), whole
        assert limits(mport).get("worker_lost", 0) == 0, limits(mport)
        streams = open_event_streams(port, count)
        worker.stop(signal.SIGKILL)
        killed = time.time()
        ends = []
        for s in streams:
            got = closed_within(s, 30)
            assert got is not None, "a stream was still open 30 s after its worker was SIGKILLed"
            assert not got.endswith(b"0\r\n\r\n"), "cut, not ended as if whole: %r" % got[-40:]
            ends.append(time.time() - killed)
            s.close()
        lost = limits(mport).get("worker_lost", 0)
        print("  %d SSE streams whose worker was SIGKILLed: all cut within %.1f s (lease 2 s); worker_lost %d; "
              "a 6 s stream on a live worker ran whole" % (count, max(ends), lost))
        assert len(ends) == count and lost == count, (len(ends), lost)
        replacement = Proc("runworker", "--layer", redis_url("fd-lease:"), "--stream-lease", "2")
        replacement.wait_line("worker ready")
        status, body = http_get(port, "/events/?n=1")
        assert status == 200 and b"event 1" in body, (status, body)
        assert proc.p.poll() is None, "the server kept serving"
    finally:
        stop_all(*[p for p in (proc, worker, replacement) if p is not None])


def h2_exchange(port, cafile, method, path, timeout=10):
    """One request on a fresh HTTP/2 connection; returns the h2 events of its stream, up to its
    end or reset (bounded by `timeout`)."""
    import h2.config
    import h2.connection
    import h2.events
    context = ssl.create_default_context(cafile=cafile)
    context.set_alpn_protocols(["h2"])
    tls = context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=timeout), server_hostname="localhost")
    try:
        h2c = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True))
        h2c.initiate_connection()
        h2c.send_headers(1, [(":method", method), (":path", path), (":scheme", "https"), (":authority", "localhost")],
                         end_stream=True)
        tls.sendall(h2c.data_to_send())
        events, deadline = [], time.time() + timeout
        while time.time() < deadline:
            data = tls.recv(65536)
            assert data, "the connection closed before the stream ended: %r" % events
            for event in h2c.receive_data(data):
                if getattr(event, "stream_id", None) != 1:
                    continue
                if isinstance(event, h2.events.DataReceived):
                    h2c.acknowledge_received_data(event.flow_controlled_length, 1)
                events.append(event)
                if isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                    return events
            tls.sendall(h2c.data_to_send())
        raise AssertionError("no end of stream within %d s: %r" % (timeout, events))
    finally:
        tls.close()


@test
def tls_https_wss_http2_and_a_certificate_reload():
    directory = tempfile.mkdtemp(prefix="e2e-tls-")
    cert, key = make_certificate(directory, "first")
    live_cert, live_key = os.path.join(directory, "live.pem"), os.path.join(directory, "live-key.pem")
    shutil.copy(cert, live_cert)
    shutil.copy(key, live_key)
    # Wrong files are clear start-up errors.
    for args, words in [(("--tls-cert", "/nonexistent.pem", "--tls-key", live_key), "cannot read the TLS certificate"),
                        (("--tls-cert", live_cert), "needs --tls-key"),
                        (("--tls-cert", live_key, "--tls-key", live_key), "TLS certificate")]:
        out = subprocess.run([CHAT, "runserver", "--port", str(free_port()), *args], capture_output=True, timeout=30)
        text = (out.stdout + out.stderr).decode()
        assert out.returncode != 0 and words in text, (args, out.returncode, text[-400:])
    proc, port = server("--tls-cert", live_cert, "--tls-key", live_key)
    try:
        context = ssl.create_default_context(cafile=cert)
        conn = http.client.HTTPSConnection("localhost", port, context=context, timeout=10)
        conn.request("GET", "/hello/")
        resp = conn.getresponse()
        assert resp.status == 200 and b"Hello" in resp.read()

        async def wss():
            async with websockets.connect("wss://localhost:%d/echo/" % port, ssl=context) as ws:
                for i in range(20):
                    await ws.send("tls %d" % i)
                    assert await asyncio.wait_for(ws.recv(), 10) == "tls %d" % i
        asyncio.run(wss())

        def curl(*args):
            out = subprocess.run(["curl", "-sS", "--http2", "--cacert", cert, *args], capture_output=True, timeout=60)
            assert out.returncode == 0, out.stderr
            return out.stdout

        version = curl("-o", "/dev/null", "-w", "%{http_version}", "https://localhost:%d/hello/" % port)
        assert version == b"2", version
        body = curl("https://localhost:%d/download/5/" % port)
        assert len(body) == 5 << 20, len(body)
        events = curl("https://localhost:%d/events/?n=2" % port)
        assert events.count(b"data: event") == 3, events
        upload = curl("-X", "POST", "--data-binary", "@" + live_key, "https://localhost:%d/poll/" % port)
        assert json.loads(upload)["received"] == os.path.getsize(live_key), upload
        # HEAD over HTTP/2: headers and the GET's content-length, then END_STREAM; no body and
        # no reset (a body sent after a HEAD is a content-length violation the codec resets).
        for path in ("/hello/", "/download/3/", "/missing-page/"):
            events = h2_exchange(port, cert, "HEAD", path)
            names = [type(e).__name__ for e in events]
            assert "StreamReset" not in names and names[-1] == "StreamEnded", (path, names)
            assert not any(type(e).__name__ == "DataReceived" and e.data for e in events), (path, names)
            head = dict(next(e.headers for e in events if type(e).__name__ == "ResponseReceived"))
            got = h2_exchange(port, cert, "GET", path, timeout=30)
            get = dict(next(e.headers for e in got if type(e).__name__ == "ResponseReceived"))
            body = sum(len(e.data) for e in got if type(e).__name__ == "DataReceived")
            assert head[b":status"] == get[b":status"], (path, head, get)
            assert int(head[b"content-length"]) == int(get[b"content-length"]) == body, (path, head, get, body)
            print("  HEAD %s over HTTP/2: %s, content-length %s, ended without a body or a reset"
                  % (path, head[b":status"].decode(), head[b"content-length"].decode()))
        # Many streams on one connection, answered in full.
        urls = ["https://localhost:%d/hello/%d" % (port, i) for i in range(50)]
        many = curl("--parallel", "--parallel-immediate", "--parallel-max", "50", *urls)
        assert many.count(b"Hello world") == 50, many[:200]
        # The reload: new files, SIGHUP, new connections get the new certificate.
        assert served_certificate(port) == fingerprint(cert)
        second, second_key = make_certificate(directory, "second")
        shutil.copy(second, live_cert)
        shutil.copy(second_key, live_key)
        proc.p.send_signal(signal.SIGHUP)
        until(lambda: served_certificate(port) == fingerprint(second), "the reloaded certificate served", timeout=10)
        # The connection opened before the reload still works.
        conn.request("GET", "/hello/again")
        resp = conn.getresponse()
        assert resp.status == 200 and b"again" in resp.read()
        assert proc.p.poll() is None
    finally:
        stop_all(proc)
        shutil.rmtree(directory, ignore_errors=True)


@test
def http2_rapid_reset_flood_is_cut_and_others_are_served():
    import h2.config
    import h2.connection
    import h2.events
    directory = tempfile.mkdtemp(prefix="e2e-h2-")
    cert, key = make_certificate(directory, "h2")
    mport = free_port()
    proc, port = server("--tls-cert", cert, "--tls-key", key, "--metrics-port", str(mport))
    try:
        before = metric_value(mport, "channels_http_requests_total")
        context = ssl.create_default_context(cafile=cert)
        context.set_alpn_protocols(["h2"])
        raw = socket.create_connection(("127.0.0.1", port))
        tls = context.wrap_socket(raw, server_hostname="localhost")
        assert tls.selected_alpn_protocol() == "h2"
        h2c = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True))
        h2c.initiate_connection()
        tls.sendall(h2c.data_to_send())
        attempts, cut = 5000, False
        headers = [(":method", "GET"), (":path", "/hello/reset"), (":scheme", "https"), (":authority", "localhost")]
        sent = 0
        try:
            for i in range(attempts):
                stream = h2c.get_next_available_stream_id()
                h2c.send_headers(stream, headers, end_stream=True)
                h2c.reset_stream(stream)
                tls.sendall(h2c.data_to_send())
                sent += 1
        except (OSError, ssl.SSLError, h2.exceptions.ProtocolError):
            cut = True
        if not cut:
            tls.settimeout(5)
            try:
                while True:
                    data = tls.recv(65536)
                    if not data:
                        cut = True
                        break
                    for event in h2c.receive_data(data):
                        if isinstance(event, h2.events.ConnectionTerminated):
                            cut = True
                    tls.sendall(h2c.data_to_send())
                    if cut:
                        break
            except (OSError, ssl.SSLError, h2.exceptions.ProtocolError):
                cut = True
        dispatched = metric_value(mport, "channels_http_requests_total") - before
        print("  rapid reset: %d HEADERS+RST_STREAM sent before the server cut the connection; %d requests reached the application"
              % (sent, dispatched))
        assert cut, "the server never cut a connection that reset %d streams" % sent
        assert dispatched < attempts / 2, dispatched
        # Everyone else is still served, over HTTP/2 too.
        out = subprocess.run(["curl", "-sS", "--http2", "--cacert", cert, "https://localhost:%d/hello/" % port],
                             capture_output=True, timeout=30)
        assert out.returncode == 0 and b"Hello" in out.stdout, out
    finally:
        stop_all(proc)
        shutil.rmtree(directory, ignore_errors=True)


def ws_handshake(port, path=b"/echo/"):
    """A raw WebSocket handshake; returns the socket and the status line."""
    import base64
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              b"Sec-WebSocket-Key: " + base64.b64encode(os.urandom(16)) + b"\r\nSec-WebSocket-Version: 13\r\n\r\n")
    return s


def masked_frame(opcode, payload):
    mask = os.urandom(4)
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


@test
def edges_found_by_attacking_the_credit_and_the_services():
    """Each of these broke once (a red-team pass of the response credit, the services and the
    WebSocket state machine); each is attacked again here."""
    import struct
    directory = tempfile.mkdtemp(prefix="e2e-edges2-")
    log_path = os.path.join(directory, "access.log")
    proc, port, mport = serve("--threads", "2", "--max-response-buffer", str(1 << 20), "--access-log", log_path,
                              "--shutdown-timeout", "15")
    try:
        # 1. Every consumer slot held by a download waiting for credit: the credit is still read,
        #    the downloads finish and a plain request is answered meanwhile (it deadlocked for 120 s).
        results = []

        def slow_download():
            s = socket.create_connection(("127.0.0.1", port), timeout=60)
            s.sendall(b"GET /download/4/ HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            data = bytearray()
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
                time.sleep(0.02)  # about 3 MB/s
            s.close()
            results.append(len(data.partition(b"\r\n\r\n")[2]))

        threads = [threading.Thread(target=slow_download) for _ in range(6)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        started = time.time()
        status, _ = http_get(port, "/hello/meanwhile")
        hello = time.time() - started
        for t in threads:
            t.join(60)
        print("  6 slow downloads on 2 consumer slots: %s bytes each; /hello/ answered %d in %.1f s" % (
            sorted(set(results)), status, hello))
        assert results == [4 << 20] * 6, results
        assert status == 200 and hello < 20, (status, hello)

        # 2. Pipelined downloads: a write completion of the response before must not count as
        #    the next one's credit (a reading client was closed as not reading).
        s = socket.create_connection(("127.0.0.1", port), timeout=60)
        s.sendall(b"GET /download/3/ HTTP/1.1\r\nHost: localhost\r\n\r\n" * 4)
        total = 0
        deadline = time.time() + 60
        while total < 4 * (3 << 20) and time.time() < deadline:
            chunk = s.recv(65536)
            if not chunk:
                break
            total += len(chunk)
            time.sleep(0.005)
        s.close()
        slow_closed = limits(mport).get("slow_http_client", 0)
        print("  4 pipelined 3 MiB downloads read steadily: %d bytes (bodies %d), slow-client closes %d"
              % (total, 4 * (3 << 20), slow_closed))
        assert total >= 4 * (3 << 20) and slow_closed == 0, (total, slow_closed)

        # 3. Clients that reset during the accept: each socket the application accepted gets one
        #    websocket.disconnect, and nothing is left in hand (a shutdown does not wait for it).
        import random
        for _ in range(150):
            ws = ws_handshake(port)
            time.sleep(random.uniform(0, 0.006))
            ws.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            ws.close()

        # 4. A close code that may not be sent (1005 on the wire) and a one-byte close payload are
        #    protocol errors: the server answers 1002.
        answers = []
        for payload in (struct.pack("!H", 1005), b"\x03"):
            ws = ws_handshake(port)
            head = b""
            while b"\r\n\r\n" not in head:
                head += ws.recv(4096)
            ws.sendall(masked_frame(0x8, payload))
            reply = head.partition(b"\r\n\r\n")[2]
            while len(reply) < 4:
                more = ws.recv(4096)
                if not more:
                    break
                reply += more
            answers.append(struct.unpack("!H", reply[2:4])[0] if len(reply) >= 4 and reply[0] & 0x0F == 8 else None)
            ws.close()
        print("  close 1005 on the wire and a one-byte close payload answered %s" % answers)
        assert answers == [1002, 1002], answers

        def counts():
            text = open(log_path).read()
            return text.count('"WSCONNECT'), text.count('"WSDISCONNECT')

        until(lambda: counts()[0] == counts()[1], "one WSDISCONNECT per WSCONNECT", timeout=10)
        connects, disconnects = counts()
        started = time.time()
        assert proc.stop() == 0
        took = time.time() - started
        print("  150 handshakes reset during the accept: %d accepted, %d disconnects; SIGTERM exit in %.1f s"
              % (connects, disconnects, took))
        assert took < 10, took
    finally:
        stop_all(proc)


@test
def edges_found_by_attacking_the_limits():
    """Each of these broke once (a red-team pass); each is attacked again here."""
    directory = tempfile.mkdtemp(prefix="e2e-edges-")
    cert, key = make_certificate(directory, "edges")
    proc, port, mport = serve("--header-timeout", "2", "--body-timeout", "3", "--keep-alive-timeout", "4",
                              "--write-timeout", "3", "--max-response-buffer", str(4 << 20), "--max-body-size", str(4 << 20))
    tproc, tport, tmport = serve("--tls-cert", cert, "--tls-key", key, "--header-timeout", "2", "--keep-alive-timeout", "3",
                                 "--max-response-buffer", str(4 << 20))
    wproc, wport, wmport = serve("--max-frames-per-second", "100")
    try:
        # 1. TLS connections that never handshake (or never send a request) are closed.
        socks = open_many(tport, 30)
        open_after = sum(1 for s in socks if closed_within(s, 6) is None)
        assert open_after == 0, "%d silent TLS connections still open" % open_after
        # 2. An answer that comes before the body ended: the rest of the body is not a new request.
        s = socket.create_connection(("127.0.0.1", port))
        total = 3 << 20
        s.sendall(b"POST /hello/ HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n" % total)
        s.sendall(b"a" * (1536 * 1024))
        sent = 1536 * 1024
        s.settimeout(10)
        got = s.recv(65536)
        assert got.startswith(b"HTTP/1.1 200"), got[:80]
        s.setblocking(False)
        while sent < total:
            s.sendall(b"a" * 100000)
            sent += 100000
            time.sleep(0.5)
            try:
                more = s.recv(65536)
                assert not more.startswith(b"HTTP/1.1 408") and b"408" not in more, more[:80]
            except BlockingIOError:
                pass
        s.close()
        # 3. A pipelined stream behind a download is not cut by the keep-alive deadline.
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"GET /download/1/ HTTP/1.1\r\nHost: localhost\r\n\r\nGET /events/?n=6 HTTP/1.1\r\nHost: localhost\r\n\r\n")
        data = read_all(s)
        assert data.count(b"data: event") == 7, data[-300:]
        # 4. Content-Length over the limit: 413 at once, the body is not read.
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"POST /poll/ HTTP/1.1\r\nHost: localhost\r\nContent-Length: 99999999\r\n\r\n")
        s.settimeout(5)
        assert s.recv(100).startswith(b"HTTP/1.1 413"), "no immediate 413"
        s.close()
        # 5. Expect: 100-continue is answered, then the body is read.
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"POST /poll/ HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        s.settimeout(5)
        assert s.recv(100).startswith(b"HTTP/1.1 100 Continue")
        s.sendall(b"hello")
        assert b'{"received": 5}' in s.recv(1000)
        s.close()
        # 6. An HTTP/1 client that reads nothing of a response smaller than the buffer bound is
        #    closed by the write timeout.
        before = limits(mport).get("slow_http_client", 0)
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", port))
        s.sendall(b"GET /download/3/ HTTP/1.1\r\nHost: localhost\r\n\r\n")
        until(lambda: limits(mport).get("slow_http_client", 0) > before, "the non-reading client closed", timeout=15)
        s.close()
        # 7. An HTTP/2 connection that reads none of its streams is bounded per connection and
        #    closed once (counted once).
        import h2.config
        import h2.connection
        context = ssl.create_default_context(cafile=cert)
        context.set_alpn_protocols(["h2"])
        tls = context.wrap_socket(socket.create_connection(("127.0.0.1", tport)), server_hostname="localhost")
        h2c = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True))
        h2c.initiate_connection()
        tls.sendall(h2c.data_to_send())
        for _ in range(10):
            stream = h2c.get_next_available_stream_id()
            h2c.send_headers(stream, [(":method", "GET"), (":path", "/download/3/"), (":scheme", "https"),
                                      (":authority", "localhost")], end_stream=True)
        tls.sendall(h2c.data_to_send())
        until(lambda: limits(tmport).get("slow_http_client", 0) >= 1, "the non-reading HTTP/2 connection closed", timeout=20)
        time.sleep(1)
        assert limits(tmport).get("slow_http_client", 0) == 1, limits(tmport)
        tls.close()
        # 8. Frames past a socket's share wait in the server: 100/s is what reaches the application.
        async def pace():
            async with websockets.connect("ws://127.0.0.1:%d/echo/" % wport, max_queue=None) as ws:
                for i in range(600):
                    await ws.send("f%d" % i)
                started, got = time.time(), 0
                while time.time() - started < 2:
                    try:
                        await asyncio.wait_for(ws.recv(), 0.2)
                        got += 1
                    except asyncio.TimeoutError:
                        pass
                return got
        echoed = asyncio.run(pace())
        print("  600 frames at once against --max-frames-per-second 100: %d echoed in 2 s" % echoed)
        assert 100 <= echoed <= 2 * 100 + 60, echoed
        for p in (proc, tproc, wproc):
            assert p.p.poll() is None
        status, _ = http_get(port, "/hello/")
        assert status == 200
    finally:
        stop_all(proc, tproc, wproc)
        shutil.rmtree(directory, ignore_errors=True)


def answers_hello(port):
    """Whether GET /hello/ answers 200 now (a server started without the Proc helper)."""
    try:
        return http_get(port, "/hello/", timeout=2)[0] == 200
    except OSError:
        return False


@test
def a_standard_error_nobody_reads_costs_log_lines_not_the_server():
    """The server's standard error is a pipe nobody reads (a stalled log collector): once its
    64 KiB are full, a log line written from the event loop would stop the server there. Every
    request must still be answered; the lines past the backlog (CHANNELS_LOG_BACKLOG=2000 here)
    are dropped and counted in a line of their own once the pipe is read again, so the access
    lines seen plus the count dropped are exactly the requests made."""
    requests, threads = 6000, 4
    port, mport = free_port(), free_port()
    readable, writable = os.pipe()
    proc = subprocess.Popen([CHAT, "runserver", "--port", str(port), "--metrics-port", str(mport)],
                            stdout=subprocess.DEVNULL, stderr=writable,
                            env=dict(os.environ, CHANNELS_LOG_BACKLOG="2000"))
    os.close(writable)
    try:
        until(lambda: answers_hello(port), "the server answers", timeout=60)
        assert metric(mport, "channels_log_lines_dropped_total") == 0, "the count is there from the start"
        failures, slowest = [], [0.0]

        def client(count):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            try:
                for _ in range(count):
                    started = time.perf_counter()
                    conn.request("GET", "/hello/", headers={"Host": "localhost"})
                    resp = conn.getresponse()
                    resp.read()
                    slowest[0] = max(slowest[0], time.perf_counter() - started)
                    if resp.status != 200:
                        failures.append(resp.status)
            except Exception as error:  # noqa: BLE001 (a hung or refused request is the failure)
                failures.append("%s: %s" % (type(error).__name__, error))
            finally:
                conn.close()
        workers = [threading.Thread(target=client, args=(requests // threads,), daemon=True) for _ in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(120)
        assert not any(w.is_alive() for w in workers), "requests hung behind a full standard error"
        print("  %d requests with standard error unread: slowest %.0f ms, %d failures"
              % (requests, 1e3 * slowest[0], len(failures)), flush=True)
        assert not failures, failures[:5]
        # Counted as they are dropped: the count moves while standard error is still stuck.
        stuck_count = metric(mport, "channels_log_lines_dropped_total")
        print("  dropped while standard error is stuck: %s" % stuck_count, flush=True)
        assert stuck_count and stuck_count > 0, stuck_count
        # Now read the pipe: what waited comes out, then the count of what did not fit.
        os.set_blocking(readable, False)
        text, seen, dropped = b"", 0, 0
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                chunk = os.read(readable, 1 << 16)
            except BlockingIOError:
                chunk = None
                time.sleep(0.05)
            if chunk:
                text += chunk
            lines = text.decode(errors="replace").splitlines()
            seen = sum(1 for line in lines if "component=access" in line and "path=/hello/" in line)
            dropped = sum(int(line.split("dropped=")[1].split()[0]) for line in lines if "log lines dropped" in line)
            if seen + dropped >= requests + 1 and chunk is None:
                break
        # `answers_hello` made at least one request before the flood whose line may count as well.
        print("  access lines seen %d, dropped and counted %d" % (seen, dropped), flush=True)
        assert dropped > 0, "the backlog of 2000 should have overflowed"
        assert requests <= seen + dropped <= requests + 60, (seen, dropped)
        assert metric(mport, "channels_log_lines_dropped_total") == dropped, metric(mport, "channels_log_lines_dropped_total")
        assert proc.poll() is None
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        os.close(readable)


@test
def an_access_log_to_a_standard_output_nobody_reads_does_not_hold_the_shutdown():
    """`--access-log -` with standard output a pipe nobody reads: the access lines wait, the
    requests are answered, and SIGTERM still ends the process in bounded time (its last flush
    gives up after 2 s). The build before this change served the requests but never exited."""
    port = free_port()
    readable, writable = os.pipe()
    proc = subprocess.Popen([CHAT, "runserver", "--port", str(port), "--access-log", "-"],
                            stdout=writable, stderr=subprocess.DEVNULL)
    os.close(writable)
    try:
        until(lambda: answers_hello(port), "the server answers", timeout=60)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        for _ in range(2000):  # about 90 KB of access lines: past the pipe's 64 KiB
            conn.request("GET", "/hello/", headers={"Host": "localhost"})
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200, resp.status
        conn.close()
        started = time.time()
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(20)
        except subprocess.TimeoutExpired:
            raise AssertionError("SIGTERM did not end the server within 20 s: its shutdown waits on the unread access log")
        print("  exited %d, %.1f s after SIGTERM" % (code, time.time() - started), flush=True)
        assert code == 0, code
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        os.close(readable)


for _prefix in PREFIXES:
    for _key in R.scan_iter(match=_prefix + "*", count=1000):
        R.delete(_key)
summary()
