"""Session churn: many WebSockets join a chat room, post one message each, and close. What the
server keeps of them afterwards must stay bounded: `channels_sessions_stored` on /metrics (the
in-memory session store of the process) and the `<prefix>session:*` keys in Redis.

Used two ways:
- as a module by Tests/e2e/test_secrets.py (a reduced run, ~1,000 sockets): churn(),
  sessions_stored(), redis_keys(), settle();
- as the benchmark driver of scripts/bench-session-churn.sh (10,000 sockets on both layers):

    python Tests/e2e/session_churn.py --chat CHAT [--sockets 10000] [--concurrency 100]
        [--layers memory,redis] [--redis-port P] [--workers 1]

  It starts and stops (by pid) its own `chat` processes; the Redis server (for the redis layer)
  is the caller's (--redis-port). It builds nothing.

Importing this file has no side effects (it does not read sys.argv).
"""
import argparse
import asyncio
import collections
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import websockets

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ports import free_port  # noqa: E402

# Keys the channel-session and ordering code may leave per socket (for the key census).
SESSION_PART = "session:"


def http_get(port, path, timeout=10):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def metric(port, name):
    """The value of `name` (summed over its label sets) on 127.0.0.1:port/metrics, or None when
    the metric is not there at all."""
    status, body = http_get(port, "/metrics")
    if status != 200:
        raise AssertionError("/metrics answered %d" % status)
    total, found = 0.0, False
    for line in body.decode().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, _, value = line.rpartition(" ")
        if key == name or key.startswith(name + "{"):
            total += float(value)
            found = True
    return total if found else None


def metric_by_label(port, name, label):
    """{label value: value} of the series of `name` on 127.0.0.1:port/metrics (empty if none)."""
    status, body = http_get(port, "/metrics")
    found = collections.Counter()
    for line in body.decode().splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            key, _, value = line.rpartition(" ")
            labels = dict(part.split("=", 1) for part in key[len(name) + 1:-1].split(",") if "=" in part) \
                if "{" in key else {}
            found[labels.get(label, "").strip('"') or "-"] += float(value)
    return {k: int(v) for k, v in found.items() if v}


def dropped(*metrics_ports):
    """channels_dropped_total by reason, summed over the processes' metrics ports."""
    total = collections.Counter()
    for port in metrics_ports:
        try:
            total.update(metric_by_label(port, "channels_dropped_total", "reason"))
        except OSError:
            pass
    return dict(total)


def sessions_stored(metrics_port):
    return metric(metrics_port, "channels_sessions_stored")


def redis_keys(redis_port, pattern="*", password=None):
    """Every key matching `pattern` (redis-cli --scan: never KEYS)."""
    cmd = ["redis-cli", "-p", str(redis_port)]
    if password:
        cmd += ["-a", password, "--no-auth-warning"]
    out = subprocess.run(cmd + ["--scan", "--pattern", pattern], capture_output=True, timeout=60)
    if out.returncode != 0:
        raise AssertionError("redis-cli --scan failed: %r" % out.stderr[-300:])
    return [k for k in out.stdout.decode("utf-8", "replace").splitlines() if k]


def census(keys, prefix):
    """Keys counted by kind: the part after `prefix` up to the first ':', '!' or '.'."""
    kinds = collections.Counter()
    for key in keys:
        rest = key[len(prefix):] if key.startswith(prefix) else "<outside prefix> " + key.split(":")[0] + ":"
        cut = len(rest)
        for sep in ":!.":
            i = rest.find(sep)
            if i > 0:
                cut = min(cut, i + 1)
        kinds[rest[:cut]] += 1
    return dict(kinds.most_common())


class Peak:
    """Samples read() every `interval` s on a thread while the churn runs; .peak is the largest
    value seen (None if the figure was never available): a positive control, the sessions were
    there to be counted."""

    def __init__(self, read, interval=0.5):
        self.read, self.interval, self.peak = read, interval, None
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stopping.is_set():
            try:
                value = self.read()
            except Exception:  # noqa: BLE001 - a sample missed
                value = None
            if value is not None and (self.peak is None or value > self.peak):
                self.peak = value
            self.stopping.wait(self.interval)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        self.thread.join(30)


def settle(read, bound, timeout):
    """Polls read() until it is <= bound or `timeout` seconds passed; (last value, seconds).
    A None (the figure is not available) ends the wait at once."""
    start = time.time()
    value = read()
    while value is not None and value > bound and time.time() - start < timeout:
        time.sleep(0.25)
        value = read()
    return value, time.time() - start


async def churn(port, sockets, room, concurrency=50, per_socket_timeout=30, path="/chat/%s/"):
    """`sockets` WebSockets, at most `concurrency` at a time, each: connect to the room, post one
    message, wait for that message to come back (the room's broadcast), close. Returns the figures (nothing raises: failures are counted)."""
    nonce = "%x" % time.time_ns()
    figures = collections.Counter()
    errors = collections.Counter()
    examples = {}
    limit = asyncio.Semaphore(concurrency)
    url = "ws://127.0.0.1:%d%s" % (port, path % room)

    async def one(i):
        async with limit:
            text = "churn %s %d" % (nonce, i)
            try:
                ws = await asyncio.wait_for(websockets.connect(url, max_size=None, ping_interval=None,
                                                               close_timeout=5, open_timeout=per_socket_timeout),
                                            per_socket_timeout)
            except Exception as error:  # noqa: BLE001 - counted
                errors["connect: %s" % type(error).__name__] += 1
                return
            figures["opened"] += 1
            try:
                async def exchange():
                    # Sent at once: the room's consumers run one socket's messages in order (the
                    # join first). Room messages may come before the history frame: the socket is
                    # in the room's group before its accept and history.
                    await ws.send(text)
                    figures["sent"] += 1
                    while True:
                        frame = json.loads(await ws.recv())
                        figures["frames"] += 1
                        if frame.get("type") == "history":
                            figures["histories"] += 1
                        elif frame.get("type") == "message" and frame.get("text") == text:
                            figures["received_own"] += 1
                            return
                await asyncio.wait_for(exchange(), per_socket_timeout)
            except Exception as error:  # noqa: BLE001 - counted
                errors["exchange: %s" % type(error).__name__] += 1
                examples.setdefault(type(error).__name__, str(error)[:300])
            finally:
                try:
                    await asyncio.wait_for(ws.close(), 10)
                    figures["closed"] += 1
                except Exception as error:  # noqa: BLE001 - counted
                    errors["close: %s" % type(error).__name__] += 1

    start = time.time()
    await asyncio.gather(*(one(i) for i in range(sockets)))
    took = time.time() - start
    result = {"sockets": sockets, "opened": figures["opened"], "sent": figures["sent"],
              "received_own": figures["received_own"], "frames": figures["frames"], "closed": figures["closed"],
              "histories": figures["histories"], "seconds": round(took, 2),
              "sockets_per_s": round(sockets / took, 1) if took else None, "errors": dict(errors),
              "error_examples": examples}
    return result


# ---------------------------------------------------------------------------------------------
# The benchmark driver: its own chat processes, stopped by pid.

class Process:
    def __init__(self, chat, logdir, *args, env=None):
        self.name = args[0]
        self.path = os.path.join(logdir, "%s-%d.log" % (args[0], time.time_ns()))
        self.log = open(self.path, "a+")  # appending: see support.Proc
        self.p = subprocess.Popen([chat, *args], stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait_line(self, text, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            self.log.seek(0)
            if text in self.log.read():
                return
            if self.p.poll() is not None:
                break
            time.sleep(0.05)
        self.log.seek(0)
        raise SystemExit("%s: no %r in its output: %s" % (self.name, text, self.log.read()[-2000:]))

    def stop(self, timeout=30):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                return self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.send_signal(signal.SIGKILL)
        return self.p.wait(10)


def run_layer(args, layer, logdir):
    env = dict(os.environ, CHAT_DATABASE=os.path.join(logdir, "chat-%s.sqlite3" % layer))
    port, mport = free_port(), free_port()
    procs = []
    prefix = "churn%d:" % os.getpid()
    try:
        if layer == "memory":
            server = Process(args.chat, logdir, "runserver", "--port", str(port), "--metrics-port", str(mport), env=env)
            procs.append(server)
            server.wait_line("interface server listening")
        else:
            url = "redis://127.0.0.1:%d/0?prefix=%s" % (args.redis_port, prefix)
            server = Process(args.chat, logdir, "runserver", "--noworker", "--port", str(port), "--metrics-port",
                             str(mport), "--layer", url, env=env)
            procs.append(server)
            server.wait_line("interface server listening")
            for _ in range(args.workers):
                wport = free_port()
                worker = Process(args.chat, logdir, "runworker", "--layer", url, "--metrics-port", str(wport), env=env)
                worker.metrics_port = wport
                procs.append(worker)
                worker.wait_line("worker ready")
        room = "churn%d" % (time.time_ns() % 10**9)
        read_redis = lambda: len(redis_keys(args.redis_port, prefix + SESSION_PART + "*"))  # noqa: E731
        read_memory = lambda: sessions_stored(mport)  # noqa: E731
        with Peak(read_memory) as memory_peak, Peak(read_redis if layer == "redis" else lambda: None, 1.0) as redis_peak:
            figures = asyncio.run(churn(port, args.sockets, room, args.concurrency))
        figures["channels_sessions_stored_peak"] = memory_peak.peak
        figures["redis_session_keys_peak"] = redis_peak.peak
        stored, waited = settle(read_memory, args.bound, args.settle)
        figures["channels_sessions_stored"] = stored
        figures["settled_after_s"] = round(waited, 2)
        figures["dropped"] = dropped(mport, *[p.metrics_port for p in procs if hasattr(p, "metrics_port")])
        if layer == "redis":
            left, waited = settle(read_redis, args.bound, args.settle)
            figures["redis_session_keys"] = left
            figures["redis_settled_after_s"] = round(waited, 2)
            figures["redis_keys_by_kind"] = census(redis_keys(args.redis_port, prefix + "*"), prefix)
            outside = [k for k in redis_keys(args.redis_port) if not k.startswith(prefix)]
            figures["redis_keys_outside_prefix"] = census(outside, "")
        for p in procs:
            figures.setdefault("alive_at_end", []).append("%s=%s" % (p.name, p.p.poll() is None))
        return figures
    finally:
        for p in procs:
            p.stop()


def report(layer, figures):
    print("--- %s layer" % layer)
    print("  sockets %d (opened %d, closed %d) in %.1f s (%s sockets/s)" % (
        figures["sockets"], figures["opened"], figures["closed"], figures["seconds"], figures["sockets_per_s"]))
    print("  messages sent %d, own messages received back %d, room frames received (broadcasts) %d" % (
        figures["sent"], figures["received_own"], figures["frames"]))
    if figures["errors"]:
        print("  errors: %s (e.g. %s)" % (figures["errors"], figures["error_examples"]))
    print("  channels_dropped_total by reason (every process): %s" % (figures["dropped"] or "none"))
    stored = figures["channels_sessions_stored"]
    if layer == "memory" or stored is not None:
        print("  channels_sessions_stored (runserver /metrics): %s" % (
            "missing from /metrics" if stored is None else "%d left (after %.1f s; peak during the churn %s)" % (
                stored, figures["settled_after_s"], figures["channels_sessions_stored_peak"])))
    if layer == "redis":
        print("  Redis <prefix>session:* keys: %d left (after %.1f s; peak during the churn %s)" % (
            figures["redis_session_keys"], figures["redis_settled_after_s"], figures["redis_session_keys_peak"]))
        print("  Redis keys under the prefix by kind: %s" % figures["redis_keys_by_kind"])
        if figures["redis_keys_outside_prefix"]:
            print("  Redis keys outside the prefix: %s" % figures["redis_keys_outside_prefix"])
    print("  processes alive at the end: %s" % ", ".join(figures["alive_at_end"]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chat", default=os.environ.get("CHAT"), help="the chat binary (default: $CHAT)")
    parser.add_argument("--sockets", type=int, default=10000)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--layers", default="memory,redis")
    parser.add_argument("--redis-port", type=int, help="a Redis of the caller's (needed for the redis layer)")
    parser.add_argument("--workers", type=int, default=1, help="runworker processes on the redis layer")
    parser.add_argument("--bound", type=int, default=10, help="sessions that may be left (default 10)")
    parser.add_argument("--settle", type=float, default=30, help="seconds to wait for the sessions to go")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    parser.add_argument("--logdir", help="where the processes' logs go (default: a new temporary folder)")
    args = parser.parse_args()
    if not args.chat or not os.access(args.chat, os.X_OK):
        parser.error("give the chat binary: --chat PATH or CHAT=PATH (built, e.g. Examples/.build/debug/chat)")
    layers = [layer for layer in args.layers.split(",") if layer]
    if "redis" in layers and not args.redis_port:
        parser.error("the redis layer needs --redis-port")
    logdir = args.logdir or tempfile.mkdtemp(prefix="session-churn-")
    os.makedirs(logdir, exist_ok=True)
    print("session churn: %d sockets per layer, %d at a time; logs in %s" % (args.sockets, args.concurrency, logdir))
    problems, notes = [], []
    all_figures = {}
    for layer in layers:
        figures = run_layer(args, layer, logdir)
        all_figures[layer] = figures
        report(layer, figures)
        if layer == "memory":
            left, what = figures["channels_sessions_stored"], "channels_sessions_stored"
        else:
            left, what = figures["redis_session_keys"], "session keys in Redis"
        if left is None:
            problems.append("%s: %s is not available" % (layer, what))
        elif left > args.bound:
            problems.append("%s: %d %s left (bound %d)" % (layer, left, what, args.bound))
        if figures["received_own"] < figures["sockets"]:
            notes.append("%s: %d of %d messages did not come back to their sender (drops: %s)" % (
                layer, figures["sockets"] - figures["received_own"], figures["sockets"], figures["dropped"] or "none"))
    if args.json:
        print(json.dumps(all_figures, indent=2, sort_keys=True))
    for note in notes:
        print("NOTE: %s" % note)
    print("RESULT: %s" % ("; ".join(problems) if problems else
                          "within the bound (at most %d sessions left per layer)" % args.bound))
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
