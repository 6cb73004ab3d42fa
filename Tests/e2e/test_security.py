"""Attack tests with real processes (issue 26, /tmp/security-spec.md): session takeover from
identifiers an attacker can read (logs, `chat stats`, Redis), logout and disconnect leaving no
session behind, cross-site WebSocket hijacking and Host/Origin checks, CSRF on the login API,
login enumeration and a rate limit shared by workers, cookie attributes.

Every check goes through real sockets to `chat runserver` / `chat runworker`, and each attack has
a positive control beside it (the same request done rightly succeeds), so a missing protection
makes the test fail instead of passing vacuously. Each test prints what it sent and received.

Run: .venv-interop/bin/python Tests/e2e/test_security.py CHAT_BINARY REDIS_URL
(E2E_ONLY=substring runs only the tests whose name has it.) Prints 'N passed, N failed'.
"""
import os
import sys

os.environ.setdefault("E2E_TEST_TIMEOUT", "120")  # read by support at import: every test is bounded
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from support import *  # noqa: E402,F403  (Proc, server, test, free_port, redis_url, CHAT, REDIS_URL, DB_DIR)

import base64  # noqa: E402
import collections  # noqa: E402
import contextlib  # noqa: E402
import functools  # noqa: E402
import hashlib  # noqa: E402
import http.client  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import struct  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import urllib.parse  # noqa: E402

import redis as redis_py  # noqa: E402
from websockets.exceptions import ConnectionClosed  # noqa: E402
from websockets.sync.client import connect as ws_connect  # noqa: E402

# Hashing cost is not what these tests measure (except where they say so); the per-address login
# limit is set out of the way so only the limit a test is about can answer 429.
os.environ["CHAT_PASSWORD_ITERATIONS"] = "1000"
os.environ["CHAT_LOGIN_ATTEMPTS_PER_ADDRESS"] = "1000"

PID = os.getpid()
ALICE, ALICE_PW = "alice", "pw-alice-%d" % PID
BOB, BOB_PW = "bob", "pw-bob-%d" % PID
EVIL = "https://evil.example"
R = redis_py.StrictRedis.from_url(REDIS_URL.split("?")[0])
PREFIXES = []  # the layer prefixes this run used: their keys are deleted at the end


# ---------------------------------------------------------------------------------------------
# What was sent and received, per test.

TRAFFIC = collections.Counter()


def counted(fn):
    """Resets the traffic tally before the test and prints it after (pass or fail)."""
    @functools.wraps(fn)
    def run():
        TRAFFIC.clear()
        try:
            return fn()
        finally:
            sent = ", ".join("%d %s" % (TRAFFIC[k], k[5:]) for k in sorted(TRAFFIC) if k.startswith("sent "))
            got = ", ".join("%s x%d" % (k[5:], TRAFFIC[k]) for k in sorted(TRAFFIC) if k.startswith("recv "))
            print("   sent: %s; received: %s" % (sent or "nothing", got or "nothing"), flush=True)
    return run


# ---------------------------------------------------------------------------------------------
# HTTP

class Response:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    def header(self, name):
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def set_cookies(self):
        """{'name': (value, 'the whole Set-Cookie value')}"""
        out = {}
        for k, v in self.headers:
            if k.lower() == "set-cookie":
                name, value = v.split(";")[0].split("=", 1)
                out[name.strip()] = (value, v)
        return out

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return "<%d %r>" % (self.status, self.body[:200])


def request(port, method, path, body=None, headers=None, conn=None):
    """One HTTP request (on `conn` when given: a keep-alive connection); counted."""
    own = conn is None
    c = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    if isinstance(body, str):
        body = body.encode()
    TRAFFIC["sent HTTP requests"] += 1
    c.request(method, path, body=body, headers=dict(headers or {}))
    resp = c.getresponse()
    data = resp.read()
    TRAFFIC["recv HTTP %d" % resp.status] += 1
    if own:
        c.close()
    return Response(resp.status, resp.getheaders(), data)


def cookies(**values):
    return "; ".join("%s=%s" % kv for kv in values.items() if kv[1] is not None)


def own_origin(port, scheme="http"):
    return "%s://127.0.0.1:%d" % (scheme, port)


def csrf_token(port, session=None, headers=None):
    """GET /api/csrf/ (with the session cookie when given): the token, checked to be the cookie set too."""
    h = dict(headers or {})
    if session:
        h["Cookie"] = cookies(sessionid=session)
    r = request(port, "GET", "/api/csrf/", headers=h)
    assert r.status == 200, r
    token = r.json()["csrf_token"]
    assert r.set_cookies().get("csrftoken", (None,))[0] == token, ("csrftoken cookie is the token", r.headers)
    return token


def post(port, path, form, session=None, token=None, cookie_token=None, origin=None, headers=None, field=False):
    """A form POST. `token` goes in X-CSRFToken (or the csrfmiddlewaretoken field with field=True);
    `cookie_token` is the csrftoken cookie (default: the same token)."""
    h = {"Content-Type": "application/x-www-form-urlencoded"}
    cookie_token = token if cookie_token is None else cookie_token
    if token and not field:
        h["X-CSRFToken"] = token
    if token and field:
        form += "&csrfmiddlewaretoken=" + token
    c = cookies(sessionid=session, csrftoken=cookie_token or None)
    if c:
        h["Cookie"] = c
    if origin:
        h["Origin"] = origin
    h.update(headers or {})
    return request(port, "POST", path, body=form, headers=h)


def creds(name, password):
    return "username=%s&password=%s" % (name, password)


def page_post(port, path, form, session=None, headers=None):
    """The page's own flow: GET /api/csrf/ (with the session), then POST with the header, the
    cookie and the page's Origin."""
    token = csrf_token(port, session)
    return post(port, path, form, session=session, token=token, origin=own_origin(port), headers=headers)


def sign_in(port, name, password):
    """Registers the account, or logs in when it exists: exactly one HTTP session is made. Returns
    (session cookie, CSRF token of that session from the response)."""
    r = page_post(port, "/api/register/", creds(name, password))
    if r.status == 409:
        r = page_post(port, "/api/login/", creds(name, password))
    assert r.status == 200 and r.json().get("user") == name, r
    session = r.set_cookies().get("sessionid", (None,))[0]
    assert session, r.headers
    return session, r.json()["csrf_token"]


def me(port, session=None, query_key=None, conn=None):
    """Who /api/me/ says the caller is (None: anonymous)."""
    path = "/api/me/" + ("?session_key=" + urllib.parse.quote(query_key, safe="") if query_key is not None else "")
    r = request(port, "GET", path, headers={"Cookie": cookies(sessionid=session)} if session else {}, conn=conn)
    assert r.status == 200, r
    return r.json().get("user")


# ---------------------------------------------------------------------------------------------
# WebSocket handshakes over a raw socket (the Host, Origin and Cookie are exactly what we send)

class RawSocket:
    """An accepted WebSocket: reads the server's frames."""

    def __init__(self, sock, buffered):
        self.sock, self.buf = sock, buffered

    def _need(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AssertionError("the server closed the connection inside a frame")
            self.buf += chunk

    def frame(self):
        self._need(2)
        opcode, length = self.buf[0] & 0x0F, self.buf[1] & 0x7F
        head = 2
        if length == 126:
            self._need(4)
            length, head = int.from_bytes(self.buf[2:4], "big"), 4
        elif length == 127:
            self._need(10)
            length, head = int.from_bytes(self.buf[2:10], "big"), 10
        self._need(head + length)
        payload, self.buf = self.buf[head:head + length], self.buf[head + length:]
        return opcode, payload

    def text(self):
        """The next text frame (pings skipped)."""
        while True:
            opcode, payload = self.frame()
            if opcode == 1:
                return payload.decode()
            if opcode == 8:
                raise AssertionError("closed: %r" % payload)

    def close(self):
        self.sock.close()


def handshake(port, path, host=None, origin=None, session=None, keep=False):
    """A WebSocket handshake to 127.0.0.1:port; returns (status, RawSocket or None)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    lines = ["GET %s HTTP/1.1" % path, "Host: %s" % (host or "127.0.0.1:%d" % port), "Upgrade: websocket",
             "Connection: Upgrade", "Sec-WebSocket-Key: " + base64.b64encode(os.urandom(16)).decode(),
             "Sec-WebSocket-Version: 13"]
    if origin is not None:
        lines.append("Origin: " + origin)
    if session is not None:
        lines.append("Cookie: " + cookies(sessionid=session))
    TRAFFIC["sent WebSocket handshakes"] += 1
    s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    data = b""
    deadline = time.time() + 10
    while b"\r\n\r\n" not in data and time.time() < deadline:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 "), "no HTTP answer to a handshake: %r" % data[:200]
    status = int(head.split()[1])
    TRAFFIC["recv handshake %d" % status] += 1
    if status == 101 and keep:
        return status, RawSocket(s, rest)
    s.close()
    return status, None


def close_drained(ws):
    """Closes a client socket at once. The sync client reads the server's close answer only once
    every frame before it was taken: the room's own frames (position, presence) that no test reads
    would otherwise hold the close until its close_timeout."""
    try:
        while True:
            ws.recv(timeout=0.05)
    except TimeoutError:
        pass
    ws.close()


def ws_open(port, path, session=None, origin=None):
    """A live client socket (the websockets library) with the session cookie."""
    TRAFFIC["sent WebSocket handshakes"] += 1
    ws = ws_connect("ws://127.0.0.1:%d%s" % (port, path), open_timeout=10, origin=origin,
                    additional_headers={"Cookie": cookies(sessionid=session)} if session else None)
    TRAFFIC["recv handshake 101"] += 1
    return ws


def ws_json(ws, timeout=10):
    TRAFFIC["recv WebSocket frames"] += 1
    return json.loads(ws.recv(timeout=timeout))


def wait_closed_by_server(ws, timeout=10):
    """Reads until the server closes the socket (bounded); returns the close code it sent."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            ws.recv(timeout=max(0.05, deadline - time.time()))
        except TimeoutError:
            break
        except ConnectionClosed as e:
            return e.rcvd.code if e.rcvd else None
    raise AssertionError("the server did not close the socket within %d s" % timeout)


# ---------------------------------------------------------------------------------------------
# Processes, Redis

@contextlib.contextmanager
def env(**values):
    """Environment variables for the processes started inside the block."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: str(v) for k, v in values.items()})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def stop_all(*procs):
    """SIGTERM each process we started (by its pid), SIGKILL what does not exit in time."""
    for p in procs:
        if p is not None and p.p.poll() is None:
            p.p.send_signal(signal.SIGTERM)
    for p in procs:
        if p is None:
            continue
        try:
            p.p.wait(20)
        except subprocess.TimeoutExpired:
            p.p.kill()
            p.p.wait(5)


def layer_for(name):
    prefix = "sec%d%s:" % (PID, name)
    PREFIXES.append(prefix)
    return prefix, redis_url(prefix)


def deployment(layer, workers=1, *server_args):
    """runserver --noworker and `workers` runworkers on one layer; waits until all are ready."""
    srv, port = server("--noworker", "--layer", layer, *server_args)
    procs = [Proc("runworker", "--layer", layer, "--threads", "4", *server_args) for _ in range(workers)]
    for w in procs:
        w.wait_line("worker ready")
    return srv, port, procs


def settles(check, timeout=10):
    """True once `check()` holds (polled for at most `timeout` s)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return check()


def describe(prefix, limit=5):
    """The session keys under prefix with their TTL and stored bytes (for a failure message)."""
    keys = session_keys(prefix)
    shown = ["%s ttl=%s %r" % (k[len(prefix):len(prefix) + 20] + "...", R.ttl(k), (R.get(k) or b"")[:80]) for k in keys[:limit]]
    return "%d keys: %s" % (len(keys), "; ".join(shown))


def session_keys(prefix):
    return sorted(k.decode() for k in R.scan_iter(match=prefix + "session:*", count=1000))


# ---------------------------------------------------------------------------------------------
# 1. Takeover: no identifier an attacker can read opens alice's session.

TOKEN = re.compile(r"[A-Za-z0-9_.!:\-]{6,}")
REPLY_CHANNEL = re.compile(r"[A-Za-z0-9_.\-]+![A-Za-z0-9_.\-]+")


def tokens_of(text):
    """Token-ish strings in a text: whole runs and their ':', '.', '!'-separated parts; not
    timestamps, addresses or plain words."""
    out = set()
    for run in TOKEN.findall(text):
        for t in {run, run.strip(":.-")} | set(re.split(r"[:.]", run)) | set(run.split("!")):
            if len(t) < 8 or re.fullmatch(r"[\dTZ:.\-]+", t):
                continue
            if any(ch.isdigit() for ch in t) or "!" in t or (any(ch.isupper() for ch in t) and any(ch.islower() for ch in t)):
                out.add(t)
    return out


def log_texts(*procs):
    """Each process's log, with JSON lines' string values unescaped beside the raw line."""
    texts = []
    for p in procs:
        raw = open(p.log.name, errors="replace").read()
        values = []
        for line in raw.splitlines():
            if line.startswith("{"):
                try:
                    values += [str(v) for v in json.loads(line).values()]
                except ValueError:
                    pass
        texts.append(raw + "\n" + "\n".join(values))
    return texts


def redis_harvest(prefixes):
    """Every key under the given prefixes (names, and what each holds by type) as text."""
    parts, count = [], 0
    for prefix in prefixes:
        for key in R.scan_iter(match=prefix + "*", count=1000):
            count += 1
            parts.append(key.decode(errors="replace"))
            kind = R.type(key).decode()
            if kind == "string":
                values = [R.get(key) or b""]
            elif kind == "list":
                values = R.lrange(key, 0, -1)
            elif kind == "zset":
                values = R.zrange(key, 0, -1)
            elif kind == "set":
                values = list(R.smembers(key))
            elif kind == "hash":
                values = [b for kv in R.hgetall(key).items() for b in kv]
            else:
                values = []
            parts += [v.decode("latin-1") for v in values]
    return "\n".join(parts), count


def chn_keys(texts):
    """Channels 1.x's channel-session key for every reply channel seen: 'chn' + sha1[:29] (32 chars of
    [a-z0-9], the HTTP session key's form), and the same for process channels (ending in '!')."""
    channels = set()
    for text in texts:
        channels |= set(REPLY_CHANNEL.findall(text))
        channels |= set(re.findall(r"[A-Za-z0-9_.\-]+!", text))
    return channels, {"chn" + hashlib.sha1(c.encode()).hexdigest()[:29] for c in channels}


def try_identifiers(port, candidates, label):
    """Presents each candidate as ?session_key=, as the sessionid cookie, and to ws /private/ both
    ways. Returns the list of (candidate, how) that opened alice's session."""
    took = []
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        for x in sorted(candidates):
            if me(port, query_key=x, conn=conn) == ALICE:
                took.append((x, "GET /api/me/?session_key="))
            if me(port, session=x, conn=conn) == ALICE:
                took.append((x, "Cookie sessionid="))
            status, _ = handshake(port, "/private/?session_key=" + urllib.parse.quote(x, safe=""))
            if status != 403:
                took.append((x, "ws /private/?session_key= answered %d" % status))
            status, _ = handshake(port, "/private/", session=x)
            if status != 403:
                took.append((x, "ws /private/ with Cookie sessionid= answered %d" % status))
    finally:
        conn.close()
    print("   %s: %d identifiers tried (4 ways each), %d opened alice's session" % (label, len(candidates), len(took)),
          flush=True)
    return took


def alice_on_sockets(port, session):
    """alice in the lobby (and on /private/), posting a message; returns the open sockets."""
    lobby = ws_open(port, "/chat/lobby/", session)
    history = ws_json(lobby)
    assert history["type"] == "history" and history["user"] == ALICE, history
    private = ws_open(port, "/private/", session)
    welcome = ws_json(private)
    assert welcome == {"type": "welcome", "user": ALICE}, welcome
    text = "secret plans %d" % time.time_ns()
    TRAFFIC["sent WebSocket frames"] += 1
    lobby.send(text)
    got = ws_json(lobby)
    assert got["type"] == "message" and got["text"] == text and got["user"] == ALICE, got
    return lobby, private


def alice_at_once(port, session, path, count):
    """`count` sockets opened at once with alice's session (their connects race on it); each has
    said it is alice."""
    import concurrent.futures
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        sockets = list(pool.map(lambda _: ws_open(port, path, session), range(count)))
    for ws in sockets:
        assert ws_json(ws)["user"] == ALICE
    return sockets


def positive_controls(port, session):
    """alice's real key does open her session, every way the attacks tried (so they could succeed)."""
    assert me(port, session=session) == ALICE, "alice's own cookie is not alice: the attacks prove nothing"
    assert me(port, query_key=session) == ALICE, "?session_key= with alice's key is not alice"
    status, sock = handshake(port, "/private/?session_key=" + session, keep=True)
    assert status == 101, "ws /private/?session_key=<alice's key> refused (%d): the attacks prove nothing" % status
    assert json.loads(sock.text()) == {"type": "welcome", "user": ALICE}
    sock.close()
    status, _ = handshake(port, "/private/", session=session)
    assert status == 101, status


@test
@counted
def takeover_from_logs_stats_and_redis_identifiers():
    # In-memory layer, JSON logs at debug level: the identifiers are what the logs show.
    proc, port = server("--log-format", "json", "--verbose")
    try:
        session, _ = sign_in(port, ALICE, ALICE_PW)
        lobby, private = alice_on_sockets(port, session)
        time.sleep(0.3)  # the access lines of the handshakes are written
        texts = log_texts(proc)
        channels, derived = chn_keys(texts)
        candidates = set().union(*(tokens_of(t) for t in texts)) | derived
        print("   memory: %d token-ish strings in the log, %d channel names (%d full reply channels)" % (
            len(candidates), len(channels), sum(1 for c in channels if not c.endswith("!"))), flush=True)
        # Logs never carry a reply channel (the process channel, ending in '!', may be named).
        full = [c for c in channels if not c.endswith("!")]
        assert not full, "reply channels in the log: %s" % full[:5]
        taken = try_identifiers(port, candidates, "memory")
        assert not taken, "alice's session opened by a logged identifier: %s" % taken[:5]
        positive_controls(port, session)
        time.sleep(0.3)
        leaked = [p for p in (session,) if any(p in t for t in log_texts(proc))]
        assert not leaked, "alice's session key (sent as ?session_key=) is in the log"
        lobby.close()
        private.close()
    finally:
        stop_all(proc)

    # Redis: runserver --noworker + runworker. Identifiers: both logs, `chat stats --json`, and
    # every key under the layer's prefix and the stats prefix with what it holds.
    prefix, layer = layer_for("take")
    srv, port, workers = deployment(layer, 1, "--log-format", "json", "--verbose")
    try:
        session, _ = sign_in(port, ALICE, ALICE_PW)
        lobby, private = alice_on_sockets(port, session)
        time.sleep(0.3)
        stats = subprocess.run([CHAT, "stats", "--json", "--layer", layer], capture_output=True, text=True, timeout=30)
        assert stats.returncode == 0, stats.stderr
        redis_text, key_count = redis_harvest([prefix, "asgi-meta:"])
        logs = log_texts(srv, *workers)
        texts = logs + [stats.stdout, redis_text]
        channels, derived = chn_keys(texts)
        replies = sorted(c for c in channels if not c.endswith("!"))
        # Reply channels are in Redis (group members, the HTTP session's socket list): the
        # Channels 1.x derivation from them is really tried.
        assert replies, "no reply channel found in Redis: the 'chn'+sha1 keys were not exercised"
        for c in replies:
            assert not any(c in t for t in logs), "reply channel %s in a process log" % c
        candidates = set().union(*(tokens_of(t) for t in texts)) | derived
        print("   redis: %d keys read, %d token-ish strings, %d reply channels, %d derived 'chn' keys" % (
            key_count, len(candidates), len(replies), len(derived)), flush=True)
        # Stored under a hash of the key: no Redis key name is a usable cookie.
        stored = session_keys(prefix)
        assert prefix + "session:" + hashlib.sha256(session.encode()).hexdigest() in stored, stored
        assert all(re.fullmatch(re.escape(prefix) + r"session:[0-9a-f]{64}", k) for k in stored), stored
        assert not any(session in k for k in stored), "alice's key is in a Redis key name"
        taken = try_identifiers(port, candidates, "redis")
        assert not taken, "alice's session opened by an identifier from logs/stats/Redis: %s" % taken[:5]
        positive_controls(port, session)
        lobby.close()
        private.close()
    finally:
        stop_all(srv, *workers)


# ---------------------------------------------------------------------------------------------
# 2. Logout signs the sockets out; disconnect leaves no session.

@test
@counted
def logout_closes_sockets_and_no_session_is_left():
    prefix, layer = layer_for("logout")
    srv, port, workers = deployment(layer, 1)
    try:
        assert session_keys(prefix) == [], "a fresh prefix holds sessions"
        session, _ = sign_in(port, ALICE, ALICE_PW)
        assert len(session_keys(prefix)) == 1, ("one HTTP session after one sign-in", session_keys(prefix))
        http_key = prefix + "session:" + hashlib.sha256(session.encode()).hexdigest()
        lobby, private = alice_on_sockets(port, session)
        during = session_keys(prefix)
        # Positive control: the sockets' channel sessions are in Redis, so "0 after" measures something.
        assert len(during) >= 2, ("channel sessions in Redis while alice's sockets are open", during)
        ttls = {k: R.ttl(k) for k in during}
        assert 14 * 86400 - 60 < ttls[http_key] <= 14 * 86400, ("the HTTP session lives 14 days", ttls)
        channel_ttls = [t for k, t in ttls.items() if k != http_key]
        assert all(0 < t <= 86400 for t in channel_ttls), ("channel sessions live a day, not 14", channel_ttls)
        print("   while open: %d session keys (1 HTTP, %d channel/ordering)" % (len(during), len(during) - 1), flush=True)

        r = page_post(port, "/api/logout/", "", session=session)
        assert r.status == 200 and r.json()["user"] is None, r
        codes = [wait_closed_by_server(ws) for ws in (lobby, private)]
        assert codes == [1008, 1008], ("the server closes alice's sockets (lobby, /private/) with 1008 at logout", codes)
        assert me(port, session=session) is None, "alice's cookie still logged in after logout"
        # The checks below are independent: each runs, and the test fails at the end with every problem.
        problems = []
        if not settles(lambda: session_keys(prefix) == []):
            problems.append("after alice's logout and her sockets' disconnect, left in Redis: %s" % describe(prefix))
        after_logout = len(session_keys(prefix))

        # An anonymous socket: its channel session goes with its disconnect.
        before = len(session_keys(prefix))
        ws = ws_open(port, "/chat/anonroom/")
        assert ws_json(ws)["type"] == "history"
        TRAFFIC["sent WebSocket frames"] += 1
        ws.send("hello from nobody")
        assert ws_json(ws)["text"] == "hello from nobody"
        opened = len(session_keys(prefix))
        assert opened > before, ("the anonymous socket has a channel session in Redis", before, opened)
        ws.close()
        if not settles(lambda: len(session_keys(prefix)) == before):
            problems.append("an anonymous socket's disconnect left %d session keys" % (len(session_keys(prefix)) - before))
        after_anon = len(session_keys(prefix))

        # Refused handshakes (anonymous to /private/, a made-up ?session_key=) store nothing either:
        # else anyone can fill Redis with day-long sessions without logging in.
        refused_before = len(session_keys(prefix))
        statuses = [handshake(port, "/private/")[0] for _ in range(10)]
        statuses += [handshake(port, "/private/?session_key=" + "chn%029d" % i)[0] for i in range(5)]
        assert statuses == [403] * 15, statuses
        if not settles(lambda: len(session_keys(prefix)) == refused_before):
            problems.append("15 refused /private/ handshakes left %d session keys in Redis: %s" % (
                len(session_keys(prefix)) - refused_before, describe(prefix, 2)))
        print("   session keys: 0 -> 1 (login) -> %d (sockets) -> %d (logout); anonymous socket %d -> %d -> %d; "
              "15 refused handshakes %d -> %d" % (len(during), after_logout, before, opened, after_anon,
                                                   refused_before, len(session_keys(prefix))), flush=True)
        assert not problems, "\n".join(problems)
    finally:
        stop_all(srv, *workers)


@test
@counted
def aborted_handshakes_leave_no_session_and_no_group_member():
    """A client that sends the upgrade and leaves before the accept: the application hears of it
    (websocket.disconnect), so neither its channel session nor its room membership stays."""
    prefix, layer = layer_for("knock")
    srv, port, workers = deployment(layer, 1)
    try:
        group = prefix + ":group:chat-knocked"
        knocks = 40
        for i in range(knocks):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            TRAFFIC["sent WebSocket handshakes"] += 1
            s.sendall(("GET /chat/knocked/ HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                       "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n"
                       % base64.b64encode(os.urandom(16)).decode()).encode())
            if i % 2:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
            s.close()
        # Positive control: a real member joins the same group, so the group exists and is counted.
        ws = ws_open(port, "/chat/knocked/")
        assert ws_json(ws)["type"] == "history"
        ok = settles(lambda: R.zcard(group) == 1 and len(session_keys(prefix)) == 1, timeout=15)
        members, keys = R.zcard(group), len(session_keys(prefix))
        print("   %d aborted handshakes: group members %d (1 real), session keys %d (1 real)" % (knocks, members, keys), flush=True)
        assert ok, ("aborted handshakes left group members or sessions", members, describe(prefix))
        ws.close()
        assert settles(lambda: R.zcard(group) == 0 and session_keys(prefix) == [], timeout=15), describe(prefix)
    finally:
        stop_all(srv, *workers)


@test
@counted
def logout_closes_every_socket_opened_at_the_same_moment():
    """24 sockets opened at once with one session (their connects race to list themselves on it,
    more of them than a save's usual 10 tries): logout closes every one with 1008, none is left
    open as alice."""
    prefix, layer = layer_for("logoutall")
    srv, port, workers = deployment(layer, 2)
    try:
        session, _ = sign_in(port, ALICE, ALICE_PW)
        sockets = alice_at_once(port, session, "/chat/together/", 24)
        r = page_post(port, "/api/logout/", "", session=session)
        assert r.status == 200, r
        codes = []
        for ws in sockets:
            try:
                codes.append(wait_closed_by_server(ws))
            except AssertionError:
                codes.append("open")
        print("   24 sockets opened at once, after logout: close codes %s" % sorted(codes, key=str), flush=True)
        assert codes == [1008] * 24, ("every socket alice opened is closed (1008) by her logout", codes)
    finally:
        stop_all(srv, *workers)


@test
@counted
def a_logout_while_sockets_are_opening_leaves_none_signed_in():
    """Sockets opening while the logout runs (12 over 0.4 s, the logout at 0.2 s, 6 rounds, a user
    of its own each, under the login rate limit): each one is either closed by the logout (1008)
    or was never its user: no socket that connected as the user stays open. (Before: a connect that listed itself just after the logout read the list,
    or found the session deleted and went on as alice, survived, 5 in 25 rounds.)"""
    import concurrent.futures
    import random
    prefix, layer = layer_for("logoutopening")
    srv, port, workers = deployment(layer, 2)
    try:
        as_alice = survivors = 0
        for round_ in range(6):
            user = "opener%d" % round_
            session, _ = sign_in(port, user, "pw-%s-%d" % (user, PID))
            token = csrf_token(port, session)

            def opener(_):
                time.sleep(random.random() * 0.4)
                try:
                    ws = ws_open(port, "/chat/opening/", session)
                except Exception:
                    return None  # refused: never alice
                try:
                    while True:
                        frame = ws_json(ws)
                        if frame.get("type") == "history":
                            return ws, frame.get("user")
                except (ConnectionClosed, TimeoutError):
                    return ws, None

            with concurrent.futures.ThreadPoolExecutor(12) as pool:
                futures = [pool.submit(opener, i) for i in range(12)]
                time.sleep(0.2)
                r = post(port, "/api/logout/", "", session=session, token=token, origin=own_origin(port))
                assert r.status == 200, r
                opened = [f.result() for f in futures]
            alice = [ws for ws, name in (o for o in opened if o) if name == user]
            as_alice += len(alice)
            for ws in alice:
                try:
                    code = wait_closed_by_server(ws, timeout=5)
                except AssertionError:
                    code = "open"
                if code != 1008:
                    survivors += 1
            for o in opened:
                if o:
                    try:
                        close_drained(o[0])
                    except ConnectionClosed:
                        pass
        print("   6 rounds x 12 sockets opening across a logout: %d connected as the user, %d of them not closed" % (
            as_alice, survivors), flush=True)
        assert as_alice > 0, "no socket connected as its user: the race was not exercised"
        assert survivors == 0, "%d sockets connected as their user outlived the logout" % survivors
    finally:
        stop_all(srv, *workers)


@test
@counted
def logout_ends_every_socket_however_many_and_however_opened():
    """Sockets opened at once (their connects race on the HTTP session) and more sockets than the
    closing list remembers: after logout none of them is alice any more."""
    prefix, layer = layer_for("logoutrace")
    srv, port, workers = deployment(layer, 2)
    try:
        session, _ = sign_in(port, ALICE, ALICE_PW)
        sockets = alice_at_once(port, session, "/chat/race/", 8)
        # More sockets than the list keeps: 70 opened and closed after the first eight.
        for _ in range(70):
            extra = ws_open(port, "/chat/race/", session)
            ws_json(extra)
            close_drained(extra)
        r = page_post(port, "/api/logout/", "", session=session)
        assert r.status == 200, r
        still_alice = []
        for i, ws in enumerate(sockets):
            try:
                TRAFFIC["sent WebSocket frames"] += 1
                ws.send("who am i %d" % i)
                deadline = time.time() + 10
                while time.time() < deadline:
                    event = ws_json(ws, timeout=max(0.1, deadline - time.time()))
                    if event.get("type") == "message" and event.get("text") == "who am i %d" % i:
                        if event.get("user") == ALICE:
                            still_alice.append(i)
                        break
            except (ConnectionClosed, TimeoutError):
                pass  # closed by the server: that is signed out too
        print("   8 racing sockets + 70 churned: after logout %d still post as alice" % len(still_alice), flush=True)
        assert still_alice == [], ("sockets still posting as alice after her logout", still_alice)
        for ws in sockets:
            ws.close()
    finally:
        stop_all(srv, *workers)


# ---------------------------------------------------------------------------------------------
# 3. Cross-site WebSocket hijacking, Host and Origin checks.

@test
@counted
def cross_site_websocket_hijacking_host_and_origin():
    proc, port = server()
    try:
        session, _ = sign_in(port, ALICE, ALICE_PW)
        own = own_origin(port)
        # A page of evil.example opens sockets with alice's cookie (the browser attaches it).
        for path in ("/private/", "/chat/lobby/"):
            status, _ = handshake(port, path, origin=EVIL, session=session)
            assert status == 403, ("Origin %s to %s with alice's cookie" % (EVIL, path), status)
        for bad in ("null", "http://127.0.0.1.evil.example", "http://localhost.evil.example",
                    "http://localhost@evil.example", "https://evil.example/http://127.0.0.1:%d" % port):
            status, _ = handshake(port, "/private/", origin=bad, session=session)
            assert status == 403, ("Origin %r" % bad, status)
        assert handshake(port, "/echo/", origin="null")[0] == 403, "Origin: null"
        # The page's own origin (and a client without Origin) is accepted: the refusals were the Origin's.
        status, sock = handshake(port, "/private/", origin=own, session=session, keep=True)
        assert status == 101, ("own origin on /private/", status)
        assert json.loads(sock.text()) == {"type": "welcome", "user": ALICE}
        sock.close()
        status, sock = handshake(port, "/chat/lobby/", origin=own, session=session, keep=True)
        assert status == 101 and json.loads(sock.text())["user"] == ALICE, status
        sock.close()
        assert handshake(port, "/echo/")[0] == 101, "no Origin (not a browser) is allowed"
        # DNS rebinding: a Host the loopback server does not answer to.
        for host in ("evil.example", "127.0.0.1.evil.example", "evil.example:%d" % port):
            r = request(port, "GET", "/hello/x", headers={"Host": host})
            assert r.status == 400, ("GET with Host %s" % host, r)
            assert handshake(port, "/echo/", host=host)[0] == 400, "handshake with Host %s" % host
        assert request(port, "GET", "/hello/x", headers={"Host": "localhost:%d" % port}).status == 200
        assert handshake(port, "/echo/", host="localhost:%d" % port)[0] == 101
    finally:
        stop_all(proc)

    # --allowed-hosts .example.com: the domain and its subdomains, nothing that merely ends alike.
    proc, port = server("--allowed-hosts", ".example.com")
    try:
        for host, want in (("chat.example.com", 200), ("example.com", 200), ("chat.example.com:%d" % port, 200),
                           ("evil.example", 400), ("example.com.evil.org", 400), ("evilexample.com", 400)):
            r = request(port, "GET", "/hello/x", headers={"Host": host})
            assert r.status == want, ("Host %s" % host, want, r)
        for origin, want in (("https://sub.example.com", 101), ("https://example.com", 101),
                             ("https://example.com.evil.org", 403), ("https://evilexample.com", 403), (EVIL, 403)):
            status, _ = handshake(port, "/echo/", host="chat.example.com", origin=origin)
            assert status == want, ("Origin %s with Host chat.example.com" % origin, want, status)
    finally:
        stop_all(proc)

    # --allowed-origins: exact origins for the server; the /partner/ route's own validator narrows it.
    proc, port = server("--allowed-origins", "https://partner.example", "https://other.example")
    try:
        for path, origin, want in (("/echo/", "https://partner.example", 101), ("/echo/", "https://other.example", 101),
                                   ("/echo/", "http://partner.example", 403), ("/echo/", "https://partner.example.evil", 403),
                                   ("/echo/", EVIL, 403), ("/partner/", "https://partner.example", 101),
                                   ("/partner/", "https://other.example", 403), ("/partner/", EVIL, 403)):
            status, _ = handshake(port, path, origin=origin)
            assert status == want, ("%s with Origin %s" % (path, origin), want, status)
    finally:
        stop_all(proc)


# ---------------------------------------------------------------------------------------------
# 4. CSRF on login, register and logout.

@test
@counted
def csrf_on_login_register_and_logout():
    proc, port = server()
    try:
        own = own_origin(port)
        sign_in(port, ALICE, ALICE_PW)  # the account exists (its session is not used)
        bob, bob_token = sign_in(port, BOB, BOB_PW)
        alice_creds = creds(ALICE, ALICE_PW)

        def refused(r, what):
            assert r.status == 403, (what, r)
            assert "sessionid" not in r.set_cookies(), (what, "a refused POST set a session cookie", r.headers)

        # Login CSRF: an evil page's form logs the victim in (to any account).
        refused(post(port, "/api/login/", alice_creds, origin=EVIL), "cross-site form, no token")
        refused(post(port, "/api/login/", alice_creds), "no token, no Origin")
        anon = csrf_token(port)
        refused(post(port, "/api/login/", alice_creds, token=anon, origin=EVIL), "valid token, Origin evil")
        refused(post(port, "/api/login/", alice_creds, session=bob, token=anon, origin=own),
                "an anonymous token with bob's session")
        alice_pre, alice_pre_token = sign_in(port, ALICE, ALICE_PW)
        refused(post(port, "/api/login/", alice_creds, session=bob, token=alice_pre_token, origin=own),
                "alice's session's token with bob's session")
        other = csrf_token(port)
        refused(post(port, "/api/login/", alice_creds, token=other, cookie_token=anon, origin=own),
                "header and cookie are two different valid tokens")
        refused(post(port, "/api/register/", creds("csrfvictim", "pw-csrf-1"), origin=EVIL), "cross-site register")
        # The page's own flow works (header; form field), so the refusals above were CSRF's.
        token = csrf_token(port)
        r = post(port, "/api/login/", alice_creds, token=token, origin=own)
        assert r.status == 200 and r.json()["user"] == ALICE, r
        session = r.set_cookies()["sessionid"][0]
        fresh = r.json()["csrf_token"]
        assert fresh != token and r.set_cookies()["csrftoken"][0] == fresh, ("a fresh token after login", r.headers)
        r = post(port, "/api/login/", alice_creds, token=csrf_token(port), origin=own, field=True)
        assert r.status == 200, ("csrfmiddlewaretoken form field", r)
        r = page_post(port, "/api/register/", creds("csrfvictim", "pw-csrf-1"))
        assert r.status == 200, ("the cross-site register created nothing: the name is free", r)

        # Logout CSRF: each refused logout leaves alice logged in.
        for what, kwargs in (
                ("cross-site form, no token", dict(origin=EVIL)),
                ("alice's valid token, Origin evil", dict(token=fresh, origin=EVIL)),
                ("bob's token with alice's cookie", dict(token=bob_token, origin=own)),
                ("an anonymous token with alice's cookie", dict(token=csrf_token(port), origin=own)),
                ("alice's token from before her last login", dict(token=alice_pre_token, origin=own))):
            r = post(port, "/api/logout/", "", session=session, **kwargs)
            assert r.status == 403, (what, r)
            assert me(port, session=session) == ALICE, ("a refused logout logged alice out", what)
        r = post(port, "/api/logout/", "", session=session, token=fresh, origin=own)
        assert r.status == 200 and r.json()["user"] is None and r.json()["csrf_token"], r
        assert me(port, session=session) is None, "the page's own logout did not log out"
        assert me(port, session=bob) == BOB, "bob is still logged in"
    finally:
        stop_all(proc)


# ---------------------------------------------------------------------------------------------
# 5. Login: no enumeration, no account creation, a rate limit every worker shares.

@test
@counted
def login_enumeration_creation_and_shared_rate_limit():
    prefix, layer = layer_for("rate")
    with env(CHAT_LOGIN_ATTEMPTS_PER_NAME=3, CHAT_LOGIN_WINDOW=30):
        srv, port, (a,) = deployment(layer, 1)
    b = None
    try:
        victim, pw = "victim", "pw-victim-%d" % PID
        r = page_post(port, "/api/register/", creds(victim, pw))
        assert r.status == 200, r
        # Unknown name and wrong password: the same answer (victim failure 1).
        wrong = page_post(port, "/api/login/", creds(victim, "not-the-password"))
        unknown = page_post(port, "/api/login/", creds("nobody%d" % PID, "not-the-password"))
        assert wrong.status == unknown.status == 403, (wrong, unknown)
        assert wrong.body == unknown.body, (wrong.body, unknown.body)
        assert wrong.json() == {"error": "invalid user name or password"}, wrong.body
        assert wrong.header("content-type") == unknown.header("content-type")
        assert sorted(k.lower() for k, _ in wrong.headers) == sorted(k.lower() for k, _ in unknown.headers), (
            wrong.headers, unknown.headers)
        # Login never creates an account: twice refused, no session, and the name is still free.
        ghost = "ghost%d" % PID
        for _ in range(2):
            r = page_post(port, "/api/login/", creds(ghost, "pw-ghost-1"))
            assert r.status == 403, ("login created an account", r)
            assert "sessionid" not in r.set_cookies(), r.headers
        assert me(port) is None
        r = page_post(port, "/api/register/", creds(ghost, "pw-ghost-1"))
        assert r.status == 200, ("the ghost name was taken by a login", r)

        # Failures 2 and 3 for the victim, answered by worker A (the only one).
        for i in (2, 3):
            r = page_post(port, "/api/login/", creds(victim, "guess-%d" % i))
            assert r.status == 403, ("failure %d is still a 403" % i, r)
        # Worker B takes over alone: the count is in Redis, not in A.
        with env(CHAT_LOGIN_ATTEMPTS_PER_NAME=3, CHAT_LOGIN_WINDOW=30):
            b = Proc("runworker", "--layer", layer, "--threads", "4")
        b.wait_line("worker ready")
        assert a.stop() == 0 and a.p.poll() is not None
        r = page_post(port, "/api/login/", creds(victim, "guess-4"))
        assert r.status == 429, ("the 4th failure, answered by the other worker", r)
        retry = r.header("Retry-After")
        assert retry and retry.isdigit() and 1 <= int(retry) <= 30, ("Retry-After", r.headers)
        # Locked means locked: the right password gets the same 429 (else the 429 is an oracle).
        r = page_post(port, "/api/login/", creds(victim, pw))
        assert r.status == 429, ("the right password during the lockout", r)
        # Another name is not locked by the victim's failures.
        r = page_post(port, "/api/login/", creds("bystander%d" % PID, "wrong-pw"))
        assert r.status == 403, ("another name", r)
        # Both workers running: every attempt is 429, whichever answers.
        with env(CHAT_LOGIN_ATTEMPTS_PER_NAME=3, CHAT_LOGIN_WINDOW=30):
            a = Proc("runworker", "--layer", layer, "--threads", "4")
        a.wait_line("worker ready")
        statuses = [page_post(port, "/api/login/", creds(victim, "guess-%d" % i)).status for i in range(5, 11)]
        assert statuses == [429] * 6, statuses
        answered = [open(p.log.name).read().count("login rate limited") for p in (a, b)]
        print("   429s logged by the restarted worker A / worker B: %s" % answered, flush=True)
    finally:
        stop_all(srv, a, b)


# ---------------------------------------------------------------------------------------------
# 6. Cookies: Secure behind a TLS proxy only, SameSite=Lax.

@test
@counted
def session_cookie_secure_behind_tls_proxy_and_samesite_lax():
    def login_cookie(port, forwarded):
        headers = {"X-Forwarded-Proto": "https"} if forwarded else {}
        scheme = "https" if forwarded else "http"
        headers["Referer"] = own_origin(port, scheme) + "/"  # a browser's POST from the page
        token = csrf_token(port, headers=headers)
        r = post(port, "/api/login/", creds(ALICE, ALICE_PW), token=token, origin=own_origin(port, scheme),
                 headers=headers)
        assert r.status == 200, r
        value = r.set_cookies()["sessionid"][1]
        return [a.strip().lower() for a in value.split(";")[1:]]

    proxied, pport = server("--proxy-headers")
    plain, port = server()
    try:
        sign_in(port, ALICE, ALICE_PW)
        attrs = login_cookie(pport, forwarded=True)
        assert "secure" in attrs and "samesite=lax" in attrs and "httponly" in attrs, attrs
        attrs = login_cookie(pport, forwarded=False)
        assert "secure" not in attrs and "samesite=lax" in attrs, ("plain http under --proxy-headers", attrs)
        attrs = login_cookie(port, forwarded=True)
        assert "secure" not in attrs and "samesite=lax" in attrs, ("X-Forwarded-Proto trusted without --proxy-headers", attrs)
    finally:
        stop_all(proxied, plain)


for _prefix in PREFIXES:
    for _key in R.scan_iter(match=_prefix + "*", count=1000):
        R.delete(_key)
summary()
