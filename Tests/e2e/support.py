"""Helpers shared by the end-to-end scripts: real `chat` processes, real HTTP and WebSocket
clients, a pass/fail tally that prints the closing 'N passed, N failed' line.

Each script is run as: SCRIPT CHAT_BINARY REDIS_URL
"""
import asyncio
import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback

import websockets

from ports import free_port, get  # noqa: F401 (get: used by the test scripts)

# Frames the server writes itself about presence and history (`presence`, `presence_diff`,
# `position`) come between a room's messages. The tests written before them read a room
# frame by frame; for them the clients skip these frames. A socket whose `server_frames`
# attribute is True (the presence and recovery tests) gets every frame.
SERVER_FRAMES = ('{"type":"presence"', '{"type":"presence_diff"', '{"type":"position"')


def _skipping_server_frames(recv):
    async def recv_async(self, *args, **kwargs):
        while True:
            frame = await recv(self, *args, **kwargs)
            if getattr(self, "server_frames", False) or not isinstance(frame, str) or not frame.startswith(SERVER_FRAMES):
                return frame

    def recv_sync(self, *args, **kwargs):
        while True:
            frame = recv(self, *args, **kwargs)
            if getattr(self, "server_frames", False) or not isinstance(frame, str) or not frame.startswith(SERVER_FRAMES):
                return frame
    return recv_async if asyncio.iscoroutinefunction(recv) else recv_sync


import websockets.legacy.protocol  # noqa: E402
import websockets.sync.connection  # noqa: E402

websockets.legacy.protocol.WebSocketCommonProtocol.recv = _skipping_server_frames(
    websockets.legacy.protocol.WebSocketCommonProtocol.recv)
websockets.sync.connection.Connection.recv = _skipping_server_frames(websockets.sync.connection.Connection.recv)

CHAT, REDIS_URL = sys.argv[1], sys.argv[2]
results = []
# Every process of a test run shares one SQLite file, as the processes of one machine would.
# The processes' logs go beside it; the folder is removed when every test passed, kept (and
# named) when one failed.
DB_DIR = tempfile.mkdtemp(prefix="chat-e2e-")
os.environ["CHAT_DATABASE"] = os.path.join(DB_DIR, "chat.sqlite3")




class Proc:
    def __init__(self, *args, wrapper=()):
        """`chat *args`, its output in a log of its own; `wrapper`: a command it runs under
        (`("faketime", "-f", "+30s")`, which runs it as a child): then the two get a process
        group of their own, and signals go to the group."""
        # Appending: the child writes at the end whatever offset the reads here seek to (the
        # file offset is shared; a write in "w+" landed where a read had just sought, over the start).
        self.log = open(os.path.join(DB_DIR, "%s-%d.log" % (args[0], time.time_ns())), "a+")
        self.group = bool(wrapper)
        self.p = subprocess.Popen([*wrapper, CHAT, *args], stdout=self.log, stderr=subprocess.STDOUT,
                                  start_new_session=self.group)

    def wait_line(self, text, timeout=20):
        deadline = time.time() + timeout
        while time.time() < deadline:
            self.log.seek(0)
            if text in self.log.read():
                return
            if self.p.poll() is not None:
                break
            time.sleep(0.05)
        self.log.seek(0)
        raise AssertionError("no %r in output: %s" % (text, self.log.read()[-2000:]))

    def stop(self, sig=signal.SIGTERM, timeout=20):
        if self.p.poll() is None:
            if self.group:
                os.killpg(self.p.pid, sig)
            else:
                self.p.send_signal(sig)
        return self.p.wait(timeout)


def server(*extra):
    port = free_port()
    proc = Proc("runserver", "--port", str(port), *extra)
    try:
        proc.wait_line("interface server listening")
    except BaseException:
        # Not left running when the test fails here: everything started is stopped.
        if proc.p.poll() is None:
            proc.stop(signal.SIGKILL)
        raise
    return proc, port


def csrf(port, conn=None):
    """GET /api/csrf/: a CSRF token (also the csrftoken cookie value) for an anonymous session."""
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    conn.request("GET", "/api/csrf/")
    resp = conn.getresponse()
    token = json.loads(resp.read())["csrf_token"]
    if own:
        conn.close()
    return token


def post_form(port, path, form, cookies=None, headers=None):
    """POST a form with a fresh CSRF token (as the page does); returns (status, json body, cookies set)."""
    cookies = dict(cookies or {})
    token = csrf(port)
    cookies["csrftoken"] = token
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    all_headers = {"Content-Type": "application/x-www-form-urlencoded", "X-CSRFToken": token,
                   "Cookie": "; ".join("%s=%s" % kv for kv in cookies.items())}
    all_headers.update(headers or {})
    conn.request("POST", path, body=form, headers=all_headers)
    resp = conn.getresponse()
    raw = resp.read()
    try:
        body = json.loads(raw)
    except ValueError:
        body = raw
    set_cookies = {}
    for name, value in resp.getheaders():
        if name.lower() == "set-cookie":
            k, v = value.split(";")[0].split("=", 1)
            set_cookies[k] = v
    conn.close()
    return resp.status, body, set_cookies


def register(port, username, password):
    """POST /api/register/ (CSRF token included); returns (status, json body, session cookie or None)."""
    status, body, cookies = post_form(port, "/api/register/", "username=%s&password=%s" % (username, password))
    return status, body, cookies.get("sessionid") or None


def login(port, username, password):
    """Registers the account if it is new, then POST /api/login/ (CSRF token included); returns
    (status, json body, session cookie value or None)."""
    register(port, username, password)
    status, body, cookies = post_form(port, "/api/login/", "username=%s&password=%s" % (username, password))
    return status, body, cookies.get("sessionid") or None


def read_all(sock):
    """Everything the peer sends until it closes (a reset counts as a close)."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    sock.close()
    return data


def raw_websocket(port, path, timeout=30):
    """A WebSocket handshake on a plain socket (for tests that write frames byte by byte)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.sendall(("GET %s HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n" % path).encode())
    response = b""
    while b"\r\n\r\n" not in response:
        chunk = sock.recv(1)
        assert chunk, "the server closed during the handshake: %r" % response
        response += chunk
    assert b" 101 " in response, response
    return sock


def client_frame(opcode, data):
    """A client's frame (masked with a zero key), for payloads under 126 bytes."""
    assert len(data) < 126
    return bytes([0x80 | opcode, 0x80 | len(data)]) + b"\x00\x00\x00\x00" + data


def read_ws_frame(sock):
    """The next (opcode, payload) from the server (unmasked frames under 126 bytes)."""
    head = b""
    while len(head) < 2:
        chunk = sock.recv(2 - len(head))
        assert chunk, "the server closed the TCP connection without a close frame"
        head += chunk
    length = head[1] & 0x7F
    payload = b""
    while len(payload) < length:
        chunk = sock.recv(length - len(payload))
        assert chunk, "the connection ended inside a frame"
        payload += chunk
    return head[0] & 0x0F, payload


class TestTimedOut(Exception):
    pass


def _timed_out(signum, frame):
    raise TestTimedOut("the test ran past its bound of %d s (E2E_TEST_TIMEOUT)" % TEST_TIMEOUT)


# Every test has a bound: a behaviour that hangs fails the test instead of hanging the suite.
TEST_TIMEOUT = int(os.environ.get("E2E_TEST_TIMEOUT", "300"))
skipped = []


def test(fn):
    name = fn.__name__
    only = os.environ.get("E2E_ONLY")
    if only and only not in name:
        skipped.append(name)
        print("SKIP", name, "(E2E_ONLY=%s)" % only, flush=True)
        return fn
    signal.signal(signal.SIGALRM, _timed_out)
    signal.alarm(TEST_TIMEOUT)
    started = time.time()
    try:
        result = fn()
        if asyncio.iscoroutine(result):
            asyncio.run(result)
        signal.alarm(0)
        results.append((name, None))
        # The time too, so the suite's slow tests can be found from a CI log.
        print("PASS", name, "(%.1f s)" % (time.time() - started), flush=True)
    except BaseException as error:
        signal.alarm(0)
        if isinstance(error, KeyboardInterrupt):
            raise
        results.append((name, traceback.format_exc()))
        print("FAIL", name, "(%.1f s)" % (time.time() - started), "\n" + traceback.format_exc(), flush=True)
    return fn


async def join(port, room, cookie=None):
    """Opens a room socket and returns it with the history frame it gets first."""
    headers = {"Cookie": "sessionid=" + cookie} if cookie else {}
    ws = await websockets.connect("ws://127.0.0.1:%d/chat/%s/" % (port, room), extra_headers=headers)
    history = json.loads(await asyncio.wait_for(ws.recv(), 10))
    assert history["type"] == "history" and history["room"] == room, history
    return ws, history


async def chat_checks(port):
    text = "hello lobby %d" % time.time_ns()
    a, _ = await join(port, "lobby")
    b, _ = await join(port, "lobby")
    c, _ = await join(port, "other")
    await a.send(text)
    for ws in (a, b):
        got = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert got["type"] == "message" and got["text"] == text and got["user"] == "anonymous", got
    try:
        got = await asyncio.wait_for(c.recv(), 0.7)
        raise AssertionError("another room received %r" % got)
    except asyncio.TimeoutError:
        pass
    # History on join: a newcomer sees the message.
    d, history = await join(port, "lobby")
    assert text in [m["text"] for m in history["messages"]], history
    for ws in (a, b, c, d):
        await ws.close()


async def echo_checks(port):
    async with websockets.connect("ws://127.0.0.1:%d/echo/" % port) as ws:
        for i in range(5):
            await ws.send("text %d" % i)
            assert await asyncio.wait_for(ws.recv(), 10) == "text %d" % i
        await ws.send(b"\x00\xff binary")
        assert await asyncio.wait_for(ws.recv(), 10) == b"\x00\xff binary"


def redis_url(prefix, query=""):
    return REDIS_URL + "?prefix=" + prefix + (("&" + query) if query else "")


def redis_cli(*args):
    """A redis-cli command on the test Redis (host and port from REDIS_URL)."""
    hostport = REDIS_URL.split("//", 1)[1].split("/", 1)[0]
    host, port = hostport.rsplit(":", 1)
    out = subprocess.run(["redis-cli", "-h", host, "-p", port, *args], capture_output=True, text=True, timeout=10)
    return out.stdout.strip()


def start_redis(port, workdir, *extra):
    """A redis-server of a test's own on `port`; returns its pid."""
    subprocess.run(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                    "--daemonize", "yes", "--pidfile", workdir + "/redis.pid", "--dir", workdir,
                    "--logfile", workdir + "/redis.log", *extra], check=True)
    for _ in range(200):
        if subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True).stdout.strip() == b"PONG":
            return int(open(workdir + "/redis.pid").read())
        time.sleep(0.05)
    raise AssertionError("redis did not start on %d" % port)


def kill_redis(workdir):
    """SIGKILLs the test's redis-server and waits until it is gone."""
    pid = int(open(workdir + "/redis.pid").read())
    os.kill(pid, signal.SIGKILL)
    for _ in range(200):
        try:
            os.kill(pid, 0)
            time.sleep(0.05)
        except ProcessLookupError:
            return
    raise AssertionError("redis %d did not die" % pid)


@contextlib.contextmanager
def own_redis(*extra):
    """A redis-server of the test's own (extra: its options); yields (port, workdir, layer URL)
    and SIGKILLs it at the end, whatever the test did to it."""
    workdir = tempfile.mkdtemp(prefix="e2e-redis-")
    port = free_port()
    start_redis(port, workdir, *extra)
    try:
        yield port, workdir, "redis://127.0.0.1:%d/0" % port
    finally:
        try:
            kill_redis(workdir)
        except (OSError, ValueError, AssertionError):
            pass


def summary():
    """Prints 'N passed, N failed' and exits non-zero on any failure (or if nothing ran)."""
    failed = [name for name, error in results if error]
    print("%d passed, %d failed, %d skipped" % (len(results) - len(failed), len(failed), len(skipped)))
    if skipped:
        print("SKIPPED (E2E_ONLY=%s): %s" % (os.environ.get("E2E_ONLY"), ", ".join(skipped)))
    if not results:
        print("FAIL: no test ran")
    if failed or not results or os.environ.get("E2E_KEEP_LOGS"):
        print("the processes' logs: %s" % DB_DIR)
    else:
        shutil.rmtree(DB_DIR, ignore_errors=True)
    sys.exit(1 if failed or not results else 0)


def until(check, what, timeout=10):
    """Polls `check` until it holds; fails after `timeout` seconds naming what it waited for."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError("timed out after %d s waiting for %s" % (timeout, what))


class Member:
    """One room socket that records every chat message it receives, by (user text)."""

    def __init__(self, ws, name):
        self.ws, self.name = ws, name
        self.texts = []
        self.closed_code = None
        self.task = asyncio.ensure_future(self.read())

    async def read(self):
        try:
            async for frame in self.ws:
                event = json.loads(frame)
                if event.get("type") == "message":
                    self.texts.append(event["text"])
        except websockets.ConnectionClosed:
            pass
        self.closed_code = self.ws.close_code
