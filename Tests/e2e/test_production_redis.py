"""End-to-end tests of production Redis set-ups with real processes: every command over TLS to a
real `redis-server --tls-port`, messages encrypted and shared with the real asgi_redis, and a
Sentinel failover (master + replica + three `redis-sentinel`s) while WebSockets stay open.

Run by scripts/test.sh: test_production_redis.py CHAT_BINARY REDIS_URL
"""
import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import websockets

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from support import *  # noqa: E402,F403


def sentinel_conf(directory, port, master_port):
    path = os.path.join(directory, "sentinel-%d.conf" % port)
    with open(path, "w") as conf:
        conf.write("port %d\nbind 127.0.0.1\ndaemonize no\nlogfile \"\"\nloglevel warning\n"
                   "sentinel monitor svc 127.0.0.1 %d 2\nsentinel down-after-milliseconds svc 1000\n"
                   "sentinel failover-timeout svc 6000\n" % (port, master_port))
    return path


def redis_cli(port, *args):
    return subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True, timeout=5).stdout


def wait_for(check, what, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - a server not up yet
            pass
        time.sleep(0.1)
    raise AssertionError("timed out after %d s waiting for %s" % (timeout, what))


def make_certificates():
    """A CA and a server certificate for `localhost` it signed, made by openssl."""
    directory = tempfile.mkdtemp(prefix="e2e-tls-")
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run = lambda *args: subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)  # noqa: E731
    run("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=e2e-ca")
    run("req", *key, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    with open(os.path.join(directory, "server.ext"), "w") as ext:
        ext.write("subjectAltName=DNS:localhost\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.crt", "-days", "2", "-extfile", "server.ext")
    return directory


@test
def every_process_over_tls_with_encryption():
    """runserver --noworker, two runworkers, rundelay, stats and the session store, all over
    rediss:// with encryption on; the real asgi_redis (same key, plain TCP to the same Redis)
    reads what our processes wrote and writes what they read."""
    certs = make_certificates()
    tls_port = free_port()
    with own_redis("--tls-port", str(tls_port), "--tls-cert-file", certs + "/server.crt",
                   "--tls-key-file", certs + "/server.key", "--tls-ca-cert-file", certs + "/ca.crt",
                   "--tls-auth-clients", "no") as (plain_port, _, plain_url):
        key = "e2e key %d" % os.getpid()
        layer = "rediss://localhost:%d/0?ssl_ca_certs=%s/ca.crt&prefix=e2etls:" % (tls_port, certs)
        env = dict(os.environ, CHANNEL_LAYER_ENCRYPTION_KEYS=key)
        old_env = os.environ.copy()
        os.environ.update(env)  # Proc inherits it: every process gets the key from the environment
        try:
            proc, port = server("--noworker", "--layer", layer)
            workers = [Proc("runworker", "--layer", layer) for _ in range(2)]
            delay = Proc("rundelay", "--layer", layer)
        finally:
            os.environ.clear()
            os.environ.update(old_env)
        try:
            for w in workers:
                w.wait_line("worker ready")
            delay.wait_line("delay server ready")
            for i in range(10):
                assert get(port, "/hello/tls%d" % i) == (200, b"Hello world! You asked for /hello/tls%d" % i)
            asyncio.run(echo_checks(port))
            asyncio.run(chat_checks(port))

            async def sessions_and_delay():
                # A login: the session store (the layer's Redis, over TLS) keeps it.
                status, body, cookie = login(port, "e2e-tls-user", "pw-%d" % os.getpid())
                assert status == 200 and cookie, (status, body)
                ws, _ = await join(port, "tlsroom", cookie)
                await ws.send("/later 1 through the delay server")
                got = json.loads(await asyncio.wait_for(ws.recv(), 10))
                assert got["text"] == "through the delay server" and got["user"] == "e2e-tls-user", got
                await ws.close()
                return cookie
            session_cookie = asyncio.run(sessions_and_delay())

            stored = "e2etls:session:" + hashlib.sha256(session_cookie.encode()).hexdigest()
            assert redis_cli(plain_port, "exists", stored).strip() == "1", "the login's session is not in the TLS Redis"
            # Sealed with the layer's keys: the user's name is not readable in Redis.
            raw = subprocess.run(["redis-cli", "-p", str(plain_port), "--no-raw", "GET", stored],
                                 capture_output=True, text=True).stdout
            assert raw.startswith('"gAAAAA'), "a session is stored as a Fernet token: %r" % raw[:40]

            # stats over TLS.
            env_stats = dict(os.environ, CHANNEL_LAYER_ENCRYPTION_KEYS=key)
            out = subprocess.run([CHAT, "stats", "--layer", layer, "--json"], capture_output=True, text=True,
                                 timeout=30, env=env_stats)
            assert out.returncode == 0, out.stderr
            assert "channels" in json.loads(out.stdout), out.stdout

            # The real asgi_redis with the same key, on the plain port of the same Redis.
            from asgi_redis import RedisChannelLayer
            python = RedisChannelLayer(hosts=[plain_url], prefix="e2etls:", symmetric_encryption_keys=[key])
            python.send("e2e.tls.inbox", {"text": "from python"})
            ours = subprocess.run([CHAT, "stats", "--layer", layer, "--json", "e2e.tls.inbox"], capture_output=True,
                                  text=True, timeout=30, env=env_stats)
            assert json.loads(ours.stdout)["channels"]["e2e.tls.inbox"]["messages_pending"] == 1, ours.stdout
            body_keys = subprocess.run(["redis-cli", "-p", str(plain_port), "lrange", "e2etls:e2e.tls.inbox", "0", "0"],
                                       capture_output=True, text=True).stdout.split()
            body = subprocess.run(["redis-cli", "-p", str(plain_port), "get", body_keys[0]],
                                  capture_output=True, text=True).stdout.strip()
            assert body.startswith("gAAAAA"), body[:20]  # a Fernet token, not msgpack
            # And what our workers write, Python reads: an http.request sent by Python (as
            # Daphne 1.4 would) is answered by a runworker, encrypted, on Python's reply channel.
            python.send("http.request", {
                "reply_channel": "e2e.pyclient!abc", "http_version": "1.1", "method": "GET", "scheme": "http",
                "path": "/hello/from-python", "query_string": b"", "root_path": "", "headers": [[b"host", b"x"]],
                "body": b"", "client": ["127.0.0.1", 1], "server": ["127.0.0.1", 2]})
            reply = (None, None)
            for _ in range(4):
                reply = python.receive(["e2e.pyclient!"], block=True)
                if reply[0]:
                    break
            assert reply[0] == "e2e.pyclient!abc", reply
            assert reply[1]["status"] == 200 and b"/hello/from-python" in reply[1]["content"], reply
            for w in workers:
                assert w.p.poll() is None, "a worker died"
        finally:
            for p in workers + [delay]:
                p.stop()
            assert proc.stop() == 0


@test
def sentinel_failover_keeps_the_sockets():
    """runserver --noworker + 2 runworkers on redis+sentinel://; 50 echo sockets send all along;
    the master is SIGKILLed; after the failover every socket is still open and echoes again, and
    every message is either echoed or counted (refused while there was no master, or lost with
    the killed master's unreplicated writes)."""
    workdir = tempfile.mkdtemp(prefix="e2e-sentinel-")
    master_port, replica_port = free_port(), free_port()
    master_dir, replica_dir = workdir + "/master", workdir + "/replica"
    os.makedirs(master_dir)
    os.makedirs(replica_dir)
    start_redis(master_port, master_dir)
    start_redis(replica_port, replica_dir, "--replicaof", "127.0.0.1", str(master_port))
    sentinels = []
    procs = []
    try:
        for _ in range(3):
            port = free_port()
            sentinels.append((port, subprocess.Popen(["redis-sentinel", sentinel_conf(workdir, port, master_port)],
                                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
        wait_for(lambda: "master_link_status:up" in redis_cli(replica_port, "info", "replication"), "replica sync", 20)
        wait_for(lambda: all(redis_cli(p, "sentinel", "sentinels", "svc").count("name") == 2 for p, _ in sentinels),
                 "the sentinels to find each other", 30)
        hosts = ",".join("127.0.0.1:%d" % p for p, _ in sentinels)
        layer = "redis+sentinel://%s/svc?prefix=e2esent:" % hosts
        proc, port = server("--noworker", "--layer", layer)
        procs.append(proc)
        for _ in range(2):
            w = Proc("runworker", "--layer", layer)
            procs.append(w)
            w.wait_line("worker ready")

        async def run():
            sockets = [await websockets.connect("ws://127.0.0.1:%d/echo/" % port) for _ in range(50)]
            sent, echoed = {}, {}
            stop = asyncio.Event()

            async def talk(i, ws):
                n = 0
                sent[i], echoed[i] = set(), set()

                async def reader():
                    async for frame in ws:
                        echoed[i].add(frame)
                reading = asyncio.ensure_future(reader())
                while not stop.is_set():
                    n += 1
                    text = "%d:%d" % (i, n)
                    await ws.send(text)
                    sent[i].add(text)
                    await asyncio.sleep(0.1)
                return reading

            talkers = [asyncio.ensure_future(talk(i, ws)) for i, ws in enumerate(sockets)]
            await asyncio.sleep(2)
            before = sum(len(e) for e in echoed.values())
            assert before > 200, "echo did not flow before the kill: %d" % before
            kill_redis(master_dir)
            killed_at = time.time()
            await asyncio.get_event_loop().run_in_executor(None, lambda: wait_for(
                lambda: redis_cli(sentinels[0][0], "sentinel", "get-master-addr-by-name", "svc").split()[-1]
                == str(replica_port), "the failover", 45))
            failover = time.time() - killed_at
            # Traffic after the failover: every socket echoes again.
            await asyncio.sleep(5)
            stop.set()
            readers = await asyncio.gather(*talkers)
            await asyncio.sleep(3)  # last echoes
            open_sockets = sum(1 for ws in sockets if ws.open)
            for ws in sockets:
                await ws.close()
            for r in readers:
                r.cancel()
            total_sent = sum(len(s) for s in sent.values())
            total_echoed = sum(len(e) for e in echoed.values())
            missing = total_sent - total_echoed
            print("   sentinel failover: %.1f s to promote; %d sent, %d echoed, %d not echoed (in the window); "
                  "%d of 50 sockets open" % (failover, total_sent, total_echoed, missing, open_sockets))
            assert open_sockets == 50, "sockets closed by the failover: %d open" % open_sockets
            # Every socket echoed messages it sent after the failover (its last 20).
            for i in sent:
                last = sorted(sent[i], key=lambda t: int(t.split(":")[1]))[-20:-5]
                assert all(t in echoed[i] for t in last), (i, [t for t in last if t not in echoed[i]])
            return missing
        missing = asyncio.run(run())
        # The bound: frames sent while there is no master are held by the server (for up to
        # --layer-outage-timeout, 120 s, far longer than the failover here) and then sent, so they
        # are echoed. What can be lost is what the killed master had taken and not yet streamed to
        # its replica (asynchronous replication streams every write as it happens; allow a whole
        # second of this traffic: 50 sockets x 10 frames/s = 500), plus what the two workers had
        # in hand when their replies' Redis died (2 x (32 threads + 8 reserved slots) = 80).
        assert missing <= 500 + 80, "%d echoes missing: more than the failover can lose" % missing
    finally:
        for p in procs:
            if p.p.poll() is None:
                p.stop(signal.SIGKILL)
        for _, s in sentinels:
            s.kill()
        for d in (master_dir, replica_dir):
            try:
                kill_redis(d)
            except (OSError, ValueError, AssertionError):
                pass


summary()
