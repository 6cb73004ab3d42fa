"""End-to-end checks of secrets, tenants and bounded session storage (issue 26), with real
processes:

1. Secrets never printed: a password-protected Redis, every command (runserver, runworker,
   rundelay, stats) on a URL carrying a password, encryption keys and an admin token; errors
   provoked (a bad URL, a refused AUTH, a Sentinel refusing its password); a request carrying
   ?session_key= and ?token=. Every byte the processes wrote is searched for every secret: no
   hit. The environment and file forms (CHANNEL_LAYER, CHANNEL_LAYER_FILE, --layer-file,
   CHANNELS_ADMIN_TOKEN_FILE, --admin-token-file) keep them off /proc/<pid>/cmdline too.
2. Tenants: two apps (prefix appA: and appB:) on one Redis with the same deployment secret and
   the same encryption key: neither accepts the other's session cookie, each rundelay delivers
   only its own delayed messages, every Redis key is under one of the prefixes, and nothing in
   Redis holds a message text or the user's name in the clear.
3. Churn: ~1,000 sockets join, post, close; afterwards the sessions left (channels_sessions_stored
   in memory, <prefix>session:* keys on Redis) are at most a small bound.

Run: .venv-interop/bin/python Tests/e2e/test_secrets.py CHAT_BINARY REDIS_URL
(REDIS_URL is not used: every test starts a redis-server of its own, stopped by pid.) About a
minute. Environment: E2E_ONLY=<part of a test name>; CHURN_SOCKETS (default 1000); CHURN_BOUND
(default 10); E2E_TIMING=1 prints the time of each part. The full-size churn (10,000 sockets) is
scripts/bench-session-churn.sh.
"""
import asyncio
import contextlib
import hashlib
import http.client
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import websockets

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from support import *  # noqa: E402,F403  (Proc, server, get, test, join, own_redis, ... CHAT, DB_DIR)
import session_churn  # noqa: E402

NONCE = secrets.token_hex(3)


def secret(tag, size=10):
    """A distinctive secret: letters and digits only, so no encoding (URL, JSON) can hide it
    from the search."""
    return "%s%s%s" % (tag, NONCE, secrets.token_hex(size))


CHURN_SOCKETS = int(os.environ.get("CHURN_SOCKETS", "1000"))
CHURN_BOUND = int(os.environ.get("CHURN_BOUND", "10"))
FAST_HASH = {"CHAT_PASSWORD_ITERATIONS": "1000"}  # registrations in milliseconds, not seconds


# ---------------------------------------------------------------------------------------------
# Helpers: processes with an environment and a log folder of their own, a password-protected
# redis-server, a small cookie-keeping HTTP client, the search for secrets.

class EProc(Proc):
    """A chat process with its own environment (None: ours), logging into `logdir`."""

    def __init__(self, logdir, *args, env=None):
        self.log = open(os.path.join(logdir, "%s-%d.log" % (args[0], time.time_ns())), "a+")  # see support.Proc
        self.p = subprocess.Popen([CHAT, *args], stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.args = args

    def output(self):
        self.log.seek(0)
        return self.log.read()

    def finish(self, timeout=20):
        """SIGTERM, then SIGKILL if it does not end in `timeout` s."""
        try:
            return self.stop(timeout=timeout)
        except subprocess.TimeoutExpired:
            return self.stop(signal.SIGKILL, timeout=10)


def finish_all(procs, timeout=25):
    """SIGTERM to every process at once, then SIGKILL what has not ended within `timeout` s."""
    for proc in procs:
        if proc.p.poll() is None:
            proc.p.send_signal(signal.SIGTERM)
    deadline = time.time() + timeout
    for proc in procs:
        try:
            proc.p.wait(max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.p.kill()
            proc.p.wait(10)


def run_once(logdir, name, args, env=None, timeout=30):
    """A one-shot chat command; its stdout and stderr are kept in `logdir` (they are searched
    too). Returns (exit status, stdout, stderr) as text."""
    try:
        out = subprocess.run([CHAT, *args], capture_output=True, env=env, timeout=timeout)
        status, stdout, stderr = out.returncode, out.stdout, out.stderr
    except subprocess.TimeoutExpired as expired:
        status, stdout, stderr = "timeout", expired.stdout or b"", expired.stderr or b""
    stamp = time.time_ns()
    with open(os.path.join(logdir, "%s-%d.stdout" % (name, stamp)), "wb") as f:
        f.write(stdout)
    with open(os.path.join(logdir, "%s-%d.stderr" % (name, stamp)), "wb") as f:
        f.write(stderr)
    return status, stdout.decode("utf-8", "replace"), stderr.decode("utf-8", "replace")


def run_all_for(logdir, seconds, commands, env=None):
    """Chat processes that may never end by themselves (a worker retrying a refused Redis), all
    at once: given `seconds`, then stopped. Returns their outputs, in order."""
    procs = [EProc(logdir, *args, env=env) for args in commands]
    deadline = time.time() + seconds
    try:
        for proc in procs:
            try:
                proc.p.wait(max(0.05, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
    finally:
        finish_all(procs, timeout=15)
    return [proc.output() for proc in procs]


class auth_redis:
    """A redis-server of the test's own with `--requirepass password`; (port, workdir).
    SIGKILLed by pid at the end."""

    def __init__(self, password):
        self.password = password

    def __enter__(self):
        self.workdir = tempfile.mkdtemp(prefix="e2e-redis-auth-")
        self.port = free_port()
        return self.start()

    def start(self):
        """Starts (or, after a kill, restarts) the server on the same port, empty."""
        subprocess.run(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                        "--daemonize", "yes", "--pidfile", self.workdir + "/redis.pid", "--dir", self.workdir,
                        "--logfile", self.workdir + "/redis.log", "--requirepass", self.password],
                       check=True, timeout=20)
        for _ in range(200):
            if redis_cli_auth(self.port, self.password, "ping").strip() == "PONG":
                return self.port, self.workdir
            time.sleep(0.05)
        self.__exit__()
        raise AssertionError("redis did not start on %d" % self.port)

    def __exit__(self, *exc):
        try:
            kill_redis(self.workdir)
        except (OSError, ValueError, AssertionError):
            pass
        shutil.rmtree(self.workdir, ignore_errors=True)  # it holds a sentinel.conf with the password


def redis_cli_auth(port, password, *args):
    cmd = ["redis-cli", "-p", str(port)] + (["-a", password, "--no-auth-warning"] if password else [])
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=10).stdout


class Browser:
    """HTTP requests that keep their cookies, like a browser's; CSRF for the POSTs."""

    def __init__(self, port):
        self.port = port
        self.cookies = {}

    def request(self, method, path, body=None, headers=None, port=None):
        conn = http.client.HTTPConnection("127.0.0.1", port or self.port, timeout=15)
        headers = dict(headers or {})
        if self.cookies:
            headers["Cookie"] = "; ".join("%s=%s" % kv for kv in self.cookies.items())
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        for name, value in resp.getheaders():
            if name.lower() == "set-cookie":
                cookie_name, _, rest = value.partition("=")
                self.cookies[cookie_name.strip()] = rest.split(";")[0]
        conn.close()
        return resp.status, data

    def post_form(self, path, fields):
        if "csrftoken" not in self.cookies:
            status, body = self.request("GET", "/api/csrf/")
            assert status == 200, (status, body)
        body = "&".join("%s=%s" % kv for kv in fields.items())
        return self.request("POST", path, body=body, headers={
            "Content-Type": "application/x-www-form-urlencoded", "X-CSRFToken": self.cookies.get("csrftoken", "")})

    def register(self, username, password):
        status, body = self.post_form("/api/register/", {"username": username, "password": password})
        assert status == 200, ("register", status, body)
        assert self.cookies.get("sessionid"), "no session cookie after registering"
        return self.cookies["sessionid"]

    def me(self, port=None):
        status, body = self.request("GET", "/api/me/", port=port)
        assert status == 200, (status, body)
        return json.loads(body)["user"]


def collected(logdir):
    """Every file the processes of a test wrote (logs, outputs, access logs): {name: bytes}."""
    blobs = {}
    for name in sorted(os.listdir(logdir)):
        path = os.path.join(logdir, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                blobs[name] = f.read()
    return blobs


def hits(blobs, named_secrets):
    """[(secret's name, file, a few bytes around it)] for each occurrence of a secret."""
    found = []
    for label, value in named_secrets.items():
        needle = value.encode()
        for name, data in blobs.items():
            start = data.find(needle)
            while start >= 0:
                found.append((label, name, data[max(0, start - 60):start + len(needle) + 20]))
                start = data.find(needle, start + 1)
    return found


def assert_no_secrets(blobs, named_secrets):
    # The search itself can fail: a canary holding every secret is found, once per secret.
    canary = {"canary": b" ".join(v.encode() for v in named_secrets.values())}
    assert len(hits(canary, named_secrets)) == len(named_secrets), "the secret search finds nothing: broken"
    found = hits(blobs, named_secrets)
    assert not found, "secrets printed (%d hits):\n%s" % (
        len(found), "\n".join("  %s in %s: %r" % hit for hit in found[:30]))


class Expect:
    """Checks that do not stop a test: each failed one is kept (and printed), and done() fails
    the test with all of them, so one run says everything that is missing."""

    def __init__(self):
        self.problems = []

    def __call__(self, condition, message):
        if not condition:
            self.problems.append(message)
            print("   problem: %s" % message, flush=True)
        return condition

    @contextlib.contextmanager
    def section(self, label):
        """A part of a test whose failure is kept and the test goes on (E2E_TIMING=1: its time)."""
        start = time.time()
        try:
            yield
        except Exception as error:  # noqa: BLE001 - kept, reported by done()
            self(False, "%s: %s: %s" % (label, type(error).__name__, str(error)[:1500]))
        finally:
            if os.environ.get("E2E_TIMING"):
                print("   [%.1f s] %s" % (time.time() - start, label), flush=True)

    def done(self):
        assert not self.problems, "%d problem(s):\n - %s" % (len(self.problems), "\n - ".join(self.problems))


def proc_file(pid, name):
    with open("/proc/%d/%s" % (pid, name), "rb") as f:
        return f.read()


def ws_url(port, path):
    return "ws://127.0.0.1:%d%s" % (port, path)


async def room_socket(port, room, cookie=None, query=""):
    headers = {"Cookie": "sessionid=" + cookie} if cookie else {}
    ws = await asyncio.wait_for(websockets.connect(ws_url(port, "/chat/%s/%s" % (room, query)),
                                                   extra_headers=headers), 15)
    history = json.loads(await asyncio.wait_for(ws.recv(), 15))
    assert history["type"] == "history", history
    return ws


async def later_round_trip(port, room, text, cookie=None, query=""):
    """'/later 1 text' in a room: it comes back through the delay server (bounded)."""
    ws = await room_socket(port, room, cookie, query)
    try:
        await ws.send("/later 1 " + text)
        deadline = time.time() + 15
        while time.time() < deadline:
            got = json.loads(await asyncio.wait_for(ws.recv(), max(0.1, deadline - time.time())))
            if got.get("type") == "message" and got.get("text") == text:
                return got
        raise AssertionError("'/later 1 %s' did not come back" % text)
    finally:
        await ws.close()


def admin_status(mport, path="/admin/", token=None, bearer=None):
    headers = {"Authorization": "Bearer " + bearer} if bearer else {}
    return get(mport, path + (("?token=" + token) if token else ""), headers=headers)[0]


def check_admin(mport, token):
    # A visit with ?token= moves the token into an HttpOnly cookie and redirects to a clean URL
    # (the token must not stay in history, logs or a Location); the cookie then opens the page.
    conn = http.client.HTTPConnection("127.0.0.1", mport, timeout=15)
    conn.request("GET", "/admin/?token=" + token)
    resp = conn.getresponse()
    resp.read()
    conn.close()
    assert resp.status == 302, "admin page with ?token= answered %d, not a redirect" % resp.status
    assert resp.getheader("Location") == "/admin/", resp.getheader("Location")
    cookie = (resp.getheader("Set-Cookie") or "").split(";")[0]
    assert "HttpOnly" in (resp.getheader("Set-Cookie") or "") and cookie.startswith("channels_admin="), cookie
    assert get(mport, "/admin/", headers={"Cookie": cookie})[0] == 200, "admin page with its cookie refused"
    assert admin_status(mport, "/admin/stats.json", token=token) == 200, "admin stats with ?token= refused"
    assert admin_status(mport, "/admin/stats.json", bearer=token) == 200, "admin stats with a Bearer token refused"
    assert admin_status(mport) in (401, 403), "admin page without a token answered %d" % admin_status(mport)
    wrong = secret("wrongtok")
    assert admin_status(mport, token=wrong) in (401, 403), "admin page with a wrong token answered"


def start_sentinel(workdir, master_port, master_password):
    """A redis-sentinel watching the master, with a password of its own (not one a test gives);
    returns (Popen, port)."""
    port = free_port()
    conf = os.path.join(workdir, "sentinel-%d.conf" % port)
    with open(conf, "w") as f:
        f.write("port %d\nbind 127.0.0.1\ndaemonize no\nlogfile \"\"\nloglevel warning\nrequirepass %s\n"
                "sentinel monitor svc 127.0.0.1 %d 1\nsentinel auth-pass svc %s\n"
                % (port, secrets.token_hex(12), master_port, master_password))
    proc = subprocess.Popen(["redis-sentinel", conf], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        if "NOAUTH" in redis_cli_auth(port, None, "ping") or "PONG" in redis_cli_auth(port, None, "ping"):
            break
        time.sleep(0.05)
    return proc, port


async def lost_redis_socket(port, query):
    """A socket opened (and a frame sent) while the Redis is gone: whatever it gets, bounded."""
    ws = None
    try:
        ws = await asyncio.wait_for(websockets.connect(ws_url(port, "/chat/lost/" + query)), 3)
        await ws.send("while the Redis is gone")
        await asyncio.wait_for(ws.recv(), 2)
    except (OSError, asyncio.TimeoutError, websockets.exceptions.WebSocketException):
        pass
    finally:
        if ws is not None:
            await ws.close()


def stop_pid(popen):
    if popen.poll() is None:
        popen.kill()
    popen.wait(10)


# ---------------------------------------------------------------------------------------------
# 1. Secrets never printed

@test
def secrets_on_the_command_line_never_printed():
    """Every command on a password-protected, encrypted Redis with an admin token; errors
    provoked; a request with ?session_key=&token=. No output holds a secret; the redacted forms
    (`***`) are where the URLs and queries are printed."""
    PW, KEY, TOK = secret("pw"), secret("key"), secret("tok")
    SPW, WRONGPW = secret("spw"), secret("wrongpw")
    SK, TK = secrets.token_hex(16), secret("tk")  # SK: the form of a real session key (32 [a-z0-9])
    UPW, UPW_WRONG = secret("upw"), secret("upwbad")
    DSK = secret("dsk", 20)
    named = {"PW": PW, "KEY": KEY, "TOK": TOK, "SPW": SPW, "WRONGPW": WRONGPW, "SK": SK, "TK": TK,
             "UPW": UPW, "UPW_WRONG": UPW_WRONG, "CHANNELS_SECRET_KEY": DSK}
    logdir = os.path.join(DB_DIR, "secrets-cmdline")
    os.makedirs(logdir)
    env = dict(os.environ, CHANNELS_SECRET_KEY=DSK, **FAST_HASH)
    procs = []
    sentinel = None
    expect = Expect()
    redis_server = auth_redis(PW)
    with redis_server as (rport, rdir):
        url = "redis://:%s@127.0.0.1:%d/0?prefix=sec:&symmetric_encryption_keys=%s" % (PW, rport, KEY)
        try:
            port, mport, port2 = free_port(), free_port(), free_port()
            access = os.path.join(logdir, "access.log")
            srv = EProc(logdir, "runserver", "--port", str(port), "--noworker", "--layer", url, "--admin",
                        "--metrics-port", str(mport), "--admin-token", TOK, "--log-format", "json",
                        "--access-log", access, env=env)
            # A second server: structured (JSON) access lines in its log instead of a file.
            srv2 = EProc(logdir, "runserver", "--port", str(port2), "--noworker", "--layer", url,
                         "--log-format", "json", "--verbose", env=env)
            worker = EProc(logdir, "runworker", "--layer", url, "--verbose", env=env)  # debug lines too
            delay = EProc(logdir, "rundelay", "--layer", url, "--log-format", "json", env=env)
            procs += [srv, srv2, worker, delay]
            srv.wait_line("interface server listening")
            srv2.wait_line("interface server listening")
            worker.wait_line("worker ready")
            delay.wait_line("delay server ready")

            # Traffic carrying secrets in the query, the cookie and the login form.
            secret_query = "?session_key=%s&token=%s" % (SK, TK)
            with expect.section("requests with ?session_key=&token="):
                for p in (port, port2):
                    assert get(p, "/hello/x" + secret_query) == (200, b"Hello world! You asked for /hello/x")
                    status, body = get(p, "/api/me/" + secret_query, headers={"Cookie": "sessionid=" + SK})
                    assert status == 200 and json.loads(body)["user"] is None, (status, body)
            with expect.section("a room socket with ?session_key=&token=, /later 1 through rundelay"):
                got = asyncio.run(later_round_trip(port, "secroom", "through rundelay", query=secret_query))
                assert got["user"] == "anonymous", got
            with expect.section("register, a wrong and a right password"):
                browser = Browser(port)
                user = "secuser" + NONCE
                browser.register(user, UPW)
                assert browser.me() == user
                wrong = Browser(port)
                status, _ = wrong.post_form("/api/login/", {"username": user, "password": UPW_WRONG})
                assert status == 403, "a wrong password logged in: %d" % status
                status, _ = wrong.post_form("/api/login/", {"username": user, "password": UPW})
                assert status == 200, "the right password was refused: %d" % status
            with expect.section("the admin page and its token"):
                check_admin(mport, TOK)

            # The operator's commands, working.
            with expect.section("stats --layer URL --json"):
                status, out, err = run_once(logdir, "stats-layer", ["stats", "--layer", url, "--json"], env=env)
                assert status == 0 and "channels" in json.loads(out), (status, out, err)
            with expect.section("stats --server --admin-token"):
                status, out, err = run_once(logdir, "stats-server", ["stats", "--server", "http://127.0.0.1:%d" % mport,
                                                                     "--admin-token", TOK, "--json"], env=env)
                assert status == 0, (status, out, err)
                status, out, err = run_once(logdir, "stats-server-notoken",
                                            ["stats", "--server", "http://127.0.0.1:%d" % mport, "--json"],
                                            env={k: v for k, v in env.items() if k != "CHANNELS_ADMIN_TOKEN"})
                assert status != 0, "stats --server without the token worked"

            # Errors. A URL that does not parse (the password and key are in it), a refused AUTH
            # (its error names neither password), a Sentinel refusing sentinel_password=SPW.
            bad = "redis://:%s@127.0.0.1:99999x/0?symmetric_encryption_keys=%s" % (PW, KEY)
            refused = "redis://:%s@127.0.0.1:%d/0?prefix=sec:&symmetric_encryption_keys=%s" % (WRONGPW, rport, KEY)
            sentinel, sport = start_sentinel(rdir, rport, PW)
            sentinel_url = ("redis+sentinel://:%s@127.0.0.1:%d/svc?sentinel_password=%s&socket_connect_timeout=2"
                            "&symmetric_encryption_keys=%s" % (PW, sport, SPW, KEY))
            with expect.section("stats on a URL that does not parse"):
                status, out, err = run_once(logdir, "stats-badurl", ["stats", "--layer", bad, "--json"], env=env)
                assert status != 0, "a bad port parsed"
                assert "***" in out + err, "the parse error does not show the URL redacted: %r" % (out + err)
            with expect.section("stats with a refused AUTH"):
                status, out, err = run_once(logdir, "stats-wrongpw", ["stats", "--layer", refused, "--json"], env=env)
                assert status != 0, "a wrong password was accepted"
                assert re.search("auth|pass", out + err, re.I), "the error does not say AUTH failed: %r" % (out + err)
            with expect.section("stats with a Sentinel refusing sentinel_password"):
                status, out, err = run_once(logdir, "stats-sentinel", ["stats", "--layer", sentinel_url, "--json"],
                                            env=env, timeout=40)
                assert status != 0, "a wrong sentinel password was accepted"
            # The long-running commands on the same URLs, all at once for a few seconds (they may
            # retry rather than exit).
            with expect.section("runworker / rundelay / runserver on those URLs"):
                outputs = run_all_for(logdir, 4, [
                    ("runworker", "--layer", bad),
                    ("runworker", "--layer", refused, "--verbose"),
                    ("rundelay", "--layer", refused, "--verbose"),
                    ("runserver", "--port", str(free_port()), "--noworker", "--layer", refused),
                    ("runworker", "--layer", sentinel_url, "--verbose"),
                ], env=env)
                assert outputs[0].strip(), "runworker on a URL that does not parse said nothing"

            # The Redis goes away under the running processes: their connection errors and retries.
            with expect.section("Redis lost under the running processes"):
                kill_redis(rdir)
                try:
                    http.client.HTTPConnection("127.0.0.1", port, timeout=2).request("GET", "/hello/lost" + secret_query)
                except OSError:
                    pass
                asyncio.run(lost_redis_socket(port, secret_query))
                time.sleep(2)
            # ... and comes back: their reconnections (and a quick shutdown after).
            with expect.section("Redis back"):
                redis_server.start()
                until_ok = time.time() + 10
                while time.time() < until_ok and get(port, "/hello/back")[0] != 200:
                    time.sleep(0.3)
        finally:
            finish_all(procs)
            if sentinel is not None:
                stop_pid(sentinel)

    blobs = collected(logdir)
    text = b"\n".join(blobs.values()).decode("utf-8", "replace")
    # Positive controls: the output was collected, and the URLs and queries are shown redacted.
    expect(len(blobs) >= 15 and all(proc.output() for proc in procs),
           "missing output: %s" % {name: len(data) for name, data in blobs.items()})
    expect(("127.0.0.1:%d" % rport) in text, "the Redis address is nowhere in the output")
    startup = srv.output()
    expect("redis://:***@127.0.0.1:%d/0" % rport in startup, "start-up line without 'redis://:***@': %r" % startup[-1500:])
    expect("symmetric_encryption_keys=***" in startup, "start-up line without 'symmetric_encryption_keys=***'")
    expect("(from --layer)" in startup, "the start-up line does not name the layer's source (from --layer)")
    lines = open(access).read().splitlines() if os.path.exists(access) else []
    expect(any("/hello/x?session_key=***&token=***" in line for line in lines), "access log not masked: %r" % lines)
    objects = [json.loads(line) for line in srv2.output().splitlines() if line.startswith("{")]
    expect(any(o.get("msg") == "http" and str(o.get("path", "")).startswith("/hello/x") for o in objects),
           "no structured access line for /hello/x in the JSON log")
    expect(any("session_key=***" in json.dumps(o) for o in objects if o.get("msg") == "http"),
           "the JSON access lines do not show session_key=*** (is the query logged at all?)")
    with expect.section("secrets in the output"):
        assert_no_secrets(blobs, named)
    expect.done()


@test
def secrets_from_environment_and_files_stay_off_the_command_line():
    """CHANNEL_LAYER, CHANNEL_LAYER_FILE, --layer-file, CHANNELS_ADMIN_TOKEN_FILE,
    --admin-token-file: the service works, /proc/<pid>/cmdline holds no secret (nor environ, for
    the file forms), the start-up line names the source and shows no password."""
    PW, KEY, TOK, DSK = secret("pw"), secret("key"), secret("tok"), secret("dsk", 20)
    named = {"PW": PW, "KEY": KEY, "TOK": TOK, "DEPLOYMENT_SECRET": DSK}
    logdir = os.path.join(DB_DIR, "secrets-env")
    os.makedirs(logdir)
    files = tempfile.mkdtemp(prefix="e2e-secret-files-")
    procs = []
    expect = Expect()
    with auth_redis(PW) as (rport, _):
        url = "redis://:%s@127.0.0.1:%d/0?prefix=secenv:&symmetric_encryption_keys=%s" % (PW, rport, KEY)
        layer_file, token_file = os.path.join(files, "layer"), os.path.join(files, "token")
        secret_file = os.path.join(files, "secret")
        for path, value in ((layer_file, url), (token_file, TOK), (secret_file, DSK)):
            with open(path, "w") as f:
                f.write(value + "\n")  # as `echo` writes it: the trailing newline is not part of it
            os.chmod(path, 0o600)
        base = {k: v for k, v in os.environ.items()
                if k not in ("CHANNEL_LAYER", "CHANNEL_LAYER_FILE", "CHANNELS_ADMIN_TOKEN", "CHANNELS_ADMIN_TOKEN_FILE",
                             "CHANNELS_SECRET_KEY", "CHANNELS_SECRET_KEY_FILE")}
        base.update(FAST_HASH)
        # The deployment's secret from a file too: CHANNELS_SECRET_KEY_FILE or --secret-key-file.
        secret_env = dict(base, CHANNELS_SECRET_KEY_FILE=secret_file)
        try:
            port_e, mport_e, port_f, mport_f = free_port(), free_port(), free_port(), free_port()
            # Env forms: CHANNEL_LAYER and CHANNELS_ADMIN_TOKEN_FILE (workers in process).
            srv_env = EProc(logdir, "runserver", "--port", str(port_e), "--admin", "--metrics-port", str(mport_e),
                            env=dict(secret_env, CHANNEL_LAYER=url, CHANNELS_ADMIN_TOKEN_FILE=token_file))
            # File forms: CHANNEL_LAYER_FILE and --admin-token-file; a worker with --layer-file; a
            # delay server with CHANNEL_LAYER_FILE.
            srv_file = EProc(logdir, "runserver", "--port", str(port_f), "--noworker", "--admin", "--metrics-port",
                             str(mport_f), "--admin-token-file", token_file, "--secret-key-file", secret_file,
                             env=dict(base, CHANNEL_LAYER_FILE=layer_file))
            worker = EProc(logdir, "runworker", "--layer-file", layer_file, "--secret-key-file", secret_file, env=base)
            delay = EProc(logdir, "rundelay", env=dict(secret_env, CHANNEL_LAYER_FILE=layer_file))
            procs += [srv_env, srv_file, worker, delay]
            for proc, line in ((srv_env, "interface server listening"), (srv_file, "interface server listening"),
                               (worker, "worker ready"), (delay, "delay server ready")):
                proc.wait_line(line)

            # Nothing secret on any command line; nothing in the environment of the file forms.
            for proc in procs:
                cmdline = proc_file(proc.p.pid, "cmdline")
                leaked = [label for label, value in named.items() if value.encode() in cmdline]
                expect(not leaked, "%s in /proc/%d/cmdline of %s" % (leaked, proc.p.pid, proc.args[0]))
            for proc in procs:  # srv_env has CHANNEL_LAYER (the env form): only the password-free ones
                environ = proc_file(proc.p.pid, "environ")
                if proc is srv_env:
                    environ = environ.replace(url.encode(), b"")
                leaked = [label for label, value in named.items() if value.encode() in environ]
                expect(not leaked, "%s in /proc/%d/environ of %s" % (leaked, proc.p.pid, proc.args[0]))

            # The service works on both.
            with expect.section("GET /hello/x"):
                for p in (port_e, port_f):
                    assert get(p, "/hello/x") == (200, b"Hello world! You asked for /hello/x"), p
            with expect.section("/later 1 through runworker --layer-file and rundelay with CHANNEL_LAYER_FILE"):
                got = asyncio.run(later_round_trip(port_f, "fileroom", "delayed through the file-configured layer"))
                assert got["user"] == "anonymous", got
            with expect.section("admin token from CHANNELS_ADMIN_TOKEN_FILE"):
                check_admin(mport_e, TOK)
            with expect.section("admin token from --admin-token-file"):
                check_admin(mport_f, TOK)
            # stats: the layer and the admin token from the environment and files.
            for label, args, extra in (
                    ("stats with CHANNEL_LAYER_FILE", ["stats", "--json"], {"CHANNEL_LAYER_FILE": layer_file}),
                    ("stats with CHANNEL_LAYER", ["stats", "--json"], {"CHANNEL_LAYER": url}),
                    ("stats --layer-file", ["stats", "--layer-file", layer_file, "--json"], {}),
                    ("stats --server with CHANNELS_ADMIN_TOKEN_FILE",
                     ["stats", "--server", "http://127.0.0.1:%d" % mport_f, "--json"],
                     {"CHANNELS_ADMIN_TOKEN_FILE": token_file})):
                with expect.section(label):
                    status, out, err = run_once(logdir, label.split()[0], args, env=dict(base, **extra))
                    assert status == 0 and "channels" in json.loads(out), (status, out[-500:], err[-500:])
        finally:
            finish_all(procs)
            shutil.rmtree(files, ignore_errors=True)

    out_env, out_file = srv_env.output(), srv_file.output()
    expect("(from CHANNEL_LAYER)" in out_env, "start-up line without (from CHANNEL_LAYER): %r" % out_env[-1500:])
    expect("redis://:***@127.0.0.1:%d/0" % rport in out_env, "start-up line without 'redis://:***@'")
    expect("(from CHANNEL_LAYER_FILE)" in out_file,
           "start-up line without (from CHANNEL_LAYER_FILE): %r" % out_file[-1500:])
    expect("redis://:***@127.0.0.1:%d/0" % rport in out_file, "start-up line without 'redis://:***@'")
    with expect.section("secrets in the output"):
        assert_no_secrets(collected(logdir), named)
    expect.done()


# ---------------------------------------------------------------------------------------------
# 2. Two tenants on one Redis

def redis_values(port):
    """{key: [raw value bytes]} for every key (strings, lists, sets, sorted sets, hashes)."""
    import redis
    r = redis.StrictRedis(host="127.0.0.1", port=port)
    values = {}
    for key in r.scan_iter(count=1000):
        kind = r.type(key)
        if kind == b"string":
            found = [r.get(key)]
        elif kind == b"list":
            found = r.lrange(key, 0, -1)
        elif kind == b"set":
            found = list(r.smembers(key))
        elif kind == b"zset":
            found = r.zrange(key, 0, -1)
        elif kind == b"hash":
            found = [b for pair in r.hgetall(key).items() for b in pair]
        else:
            found = []
        values[key.decode("utf-8", "replace")] = [v for v in found if v is not None]
    return values


@test
def two_tenants_on_one_redis_stay_apart():
    """appA: and appB: on one Redis, each runserver --noworker + runworker + rundelay, the same
    CHANNELS_SECRET_KEY, the same encryption key and the same user database (the hard case:
    only the prefix keeps them apart)."""
    shared_secret, key = secret("deploy", 16), secret("tenantkey")
    user, password = "tenant_" + NONCE, secret("tpw")
    logdir = os.path.join(DB_DIR, "tenants")
    os.makedirs(logdir)
    env = dict(os.environ, CHANNELS_SECRET_KEY=shared_secret, **FAST_HASH)
    procs = []
    expect = Expect()
    with own_redis() as (rport, _, base):
        urls = {t: "%s?prefix=%s:&stats_prefix=%s:stats:&symmetric_encryption_keys=%s" % (base, t, t, key)
                for t in ("appA", "appB")}
        try:
            ports = {}
            for tenant, url in urls.items():
                ports[tenant] = free_port()
                srv = EProc(logdir, "runserver", "--port", str(ports[tenant]), "--noworker", "--layer", url, env=env)
                procs += [srv, EProc(logdir, "runworker", "--layer", url, env=env),
                          EProc(logdir, "rundelay", "--layer", url, env=env)]
            for proc in procs:
                proc.wait_line({"runserver": "interface server listening", "runworker": "worker ready",
                                "rundelay": "delay server ready"}[proc.args[0]])
            port_a, port_b = ports["appA"], ports["appB"]

            # Her session on A is nobody on B; his on B is nobody on A.
            browser = Browser(port_a)
            cookie = browser.register(user, password)
            assert browser.me() == user, "the registration did not log in on A"
            expect(browser.me(port=port_b) is None, "A's session cookie is logged in on B")
            status, body = get(port_b, "/api/me/", headers={"Cookie": "sessionid=" + cookie})
            expect(json.loads(body)["user"] is None, "A's session cookie is logged in on B: %r" % body)
            browser_b = Browser(port_b)
            cookie_b = browser_b.register(user + "b", password)
            expect(browser_b.me() == user + "b", "the registration did not log in on B")
            status, body = get(port_a, "/api/me/", headers={"Cookie": "sessionid=" + cookie_b})
            expect(json.loads(body)["user"] is None, "B's session cookie is logged in on A: %r" % body)

            texts = {t: {"now": "hello-%s-%s" % (t[-1], NONCE), "pending": "pending-%s-%s" % (t[-1], NONCE)}
                     for t in ("appA", "appB")}
            room = "shared" + NONCE

            async def private_sockets():
                # /private/ needs a logged-in user: A lets her in, B does not.
                ws = await asyncio.wait_for(websockets.connect(ws_url(port_a, "/private/"),
                                                               extra_headers={"Cookie": "sessionid=" + cookie}), 15)
                welcome = json.loads(await asyncio.wait_for(ws.recv(), 10))
                assert welcome.get("user") == user, welcome
                await ws.close()
                try:
                    ws = await asyncio.wait_for(websockets.connect(
                        ws_url(port_b, "/private/"), extra_headers={"Cookie": "sessionid=" + cookie}), 15)
                    await ws.close()
                    raise AssertionError("B let A's session into /private/")
                except websockets.exceptions.InvalidStatusCode as e:
                    assert e.status_code == 403, e.status_code
            with expect.section("/private/ with A's cookie"):
                asyncio.run(private_sockets())

            async def rooms():
                listeners = {}
                for tenant in ("appA", "appB"):
                    port = ports[tenant]
                    sender = await room_socket(port, room, cookie if tenant == "appA" else cookie_b)
                    other = await room_socket(port, room)
                    listeners[tenant] = [Member(sender, tenant + "-sender"), Member(other, tenant + "-other")]
                for tenant in ("appA", "appB"):
                    await listeners[tenant][0].ws.send("/later 5 " + texts[tenant]["pending"])
                for tenant in ("appA", "appB"):
                    await listeners[tenant][0].ws.send("/later 1 " + texts[tenant]["now"])

                def delay_sets_filled():
                    return all(redis_cli_auth(rport, None, "zcard", t + ":delay").strip() not in ("", "0")
                               for t in ("appA", "appB"))
                filled_by = time.time() + 4
                while not delay_sets_filled() and time.time() < filled_by:
                    await asyncio.sleep(0.1)
                raw = await asyncio.to_thread(redis_values, rport)  # while the pending ones wait

                def complete():
                    return all(texts[t][k] in l.texts for t in listeners for l in listeners[t] for k in texts[t])
                deadline = time.time() + 20
                while not complete() and time.time() < deadline:
                    await asyncio.sleep(0.1)
                await asyncio.sleep(1.5)  # anything that should not come, would have
                for ls in listeners.values():
                    for l in ls:
                        await l.ws.close()
                        l.task.cancel()
                return listeners, raw

            listeners, raw = asyncio.run(rooms())
            counts = {l.name: {text: l.texts.count(text) for t in texts for text in texts[t].values()}
                      for ls in listeners.values() for l in ls}
            print("   tenants: messages per socket: %s" % counts)
            for tenant, ls in listeners.items():
                other = "appB" if tenant == "appA" else "appA"
                for l in ls:
                    for text in texts[tenant].values():
                        expect(l.texts.count(text) == 1, "%s got its own %r %d times" % (l.name, text, l.texts.count(text)))
                    for text in texts[other].values():
                        expect(text not in l.texts, "%s got the other tenant's %r" % (l.name, text))
        finally:
            finish_all(procs)
        keys = session_churn.redis_keys(rport)

    # Every key under one of the two prefixes.
    outside = [k for k in keys if not (k.startswith("appA:") or k.startswith("appB:"))]
    expect(not outside, "keys outside appA:/appB: %s" % sorted(outside)[:20])
    raw_outside = [k for k in raw if not (k.startswith("appA:") or k.startswith("appB:"))]
    expect(not raw_outside, "keys outside appA:/appB: while messages waited: %s" % sorted(raw_outside)[:20])
    # Sessions are stored under a hash of their key, never the cookie itself.
    for tenant, c in (("appA", cookie), ("appB", cookie_b)):
        hashed = "%s:session:%s" % (tenant, hashlib.sha256(c.encode()).hexdigest())
        expect(hashed in raw, "the session of %s's user is not at %s (session keys: %s)" % (
            tenant, hashed, [k for k in raw if ":session:" in k][:10]))
        expect(not any(c in k for k in raw), "a Redis key holds %s's session cookie" % tenant)
    # Positive controls: the sessions, the delay sets and the rate-limit counters were there.
    for tenant in ("appA", "appB"):
        expect(raw.get(tenant + ":delay"), "no %s:delay set while a message waited (keys: %s)" % (tenant, sorted(raw)[:30]))
        expect(sum(1 for k in raw if k.startswith(tenant + ":session:")) >= 2,
               "%s: expected a user's HTTP session and channel sessions under %s:session:" % (tenant, tenant))
        expect(any(k.startswith(tenant + ":ratelimit:") for k in raw),
               "%s: no rate-limit counter under %s:ratelimit: after a registration" % (tenant, tenant))
    # Nothing in the clear: no value holds a text or a user's name.
    needles = [user.encode()] + [text.encode() for t in texts for text in texts[t].values()]
    clear = [(k, n) for k, vs in raw.items() for v in vs for n in needles if n in v]
    expect(not clear, "values in the clear in Redis: %s" % clear[:10])
    expect.done()


# ---------------------------------------------------------------------------------------------
# 3. Churn: what is left of 1,000 closed sockets is bounded

def stop_safely(proc):
    """SIGTERM, then SIGKILL if it does not end in 20 s."""
    try:
        proc.stop()
    except subprocess.TimeoutExpired:
        proc.stop(signal.SIGKILL, timeout=10)


def print_churn(label, figures):
    print("   churn (%s): %d sockets, %d opened, %d messages sent, %d came back, %d frames, %d closed, "
          "%.1f s%s" % (label, figures["sockets"], figures["opened"], figures["sent"], figures["received_own"],
                        figures["frames"], figures["closed"], figures["seconds"],
                        (", errors %s e.g. %s" % (figures["errors"], figures["error_examples"]))
                        if figures["errors"] else ""))


def check_churn(figures, metrics_ports):
    """Every socket opened and posted; its message came back to (nearly) all of them: a room
    broadcast to a reply channel that is full is dropped (and counted), as Channels does."""
    assert figures["opened"] == figures["sockets"], "sockets refused: %s" % figures
    assert figures["sent"] == figures["sockets"], "messages not sent: %s" % figures
    missing = figures["sockets"] - figures["received_own"]
    if missing:
        print("   churn: %d messages did not come back; channels_dropped_total: %s" % (
            missing, session_churn.dropped(*metrics_ports)))
    assert missing <= figures["sockets"] // 100, "messages missing: %s" % figures


@test
def churn_leaves_a_bounded_in_memory_session_store():
    mport = free_port()
    proc, port = server("--metrics-port", str(mport))
    try:
        read = lambda: session_churn.sessions_stored(mport)  # noqa: E731
        with session_churn.Peak(read) as peak:
            figures = asyncio.run(session_churn.churn(port, CHURN_SOCKETS, "churn" + NONCE, concurrency=50))
        print_churn("in-memory", figures)
        stored, waited = session_churn.settle(read, CHURN_BOUND, 20)
        print("   churn (in-memory): channels_sessions_stored = %s after %.1f s (peak during the churn: %s)"
              % (stored, waited, peak.peak))
        check_churn(figures, [mport])
        assert stored is not None, "channels_sessions_stored is not on /metrics"
        assert peak.peak and peak.peak > CHURN_BOUND, \
            "channels_sessions_stored never counted the open sockets' sessions (peak %s)" % peak.peak
        assert stored <= CHURN_BOUND, "%d sessions left after %d closed sockets" % (stored, CHURN_SOCKETS)
        assert proc.p.poll() is None, "the server died"
    finally:
        stop_safely(proc)


@test
def churn_leaves_a_bounded_number_of_redis_sessions():
    prefix = "churn%s:" % NONCE
    with own_redis() as (rport, _, base):
        url = "%s?prefix=%s" % (base, prefix)
        sport, wport = free_port(), free_port()
        proc, port = server("--noworker", "--layer", url, "--metrics-port", str(sport))
        worker = Proc("runworker", "--layer", url, "--metrics-port", str(wport))
        try:
            worker.wait_line("worker ready")
            read = lambda: len(session_churn.redis_keys(rport, prefix + "session:*"))  # noqa: E731
            with session_churn.Peak(read, 1.0) as peak:
                figures = asyncio.run(session_churn.churn(port, CHURN_SOCKETS, "churn" + NONCE, concurrency=50))
            print_churn("redis", figures)
            left, waited = session_churn.settle(read, CHURN_BOUND, 20)
            print("   churn (redis): %d %ssession:* keys left after %.1f s (peak during the churn: %s); keys by kind: %s"
                  % (left, prefix, waited, peak.peak,
                     session_churn.census(session_churn.redis_keys(rport, prefix + "*"), prefix)))
            check_churn(figures, [sport, wport])
            assert peak.peak, "no %ssession:* key was ever seen: are channel sessions in Redis at all?" % prefix
            assert left <= CHURN_BOUND, "%d session keys left after %d closed sockets" % (left, CHURN_SOCKETS)
            assert proc.p.poll() is None and worker.p.poll() is None, "a process died"
        finally:
            for p in (worker, proc):
                stop_safely(p)


summary()
