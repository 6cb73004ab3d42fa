"""Delivery under real load, end to end: real `chat runserver` / `chat runworker` processes,
hundreds to a thousand real WebSocket clients, faults injected while traffic flows. Every
message sent and every message received is counted; a test passes only when each member got
each message (or, where a fault makes loss unavoidable, when what was lost is bounded and said).

Run by scripts/test.sh with the venv's python: test_delivery.py CHAT_BINARY REDIS_URL
"""
import asyncio
import collections
import json
import os
import resource
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import websockets

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from support import *  # noqa: E402,F403


async def open_members(ports, room, count, batch=100):
    """`count` sockets in `room`, spread round-robin over `ports`, each past its history frame."""
    members = []
    for start in range(0, count, batch):
        async def one(i):
            port = ports[i % len(ports)]
            ws = await websockets.connect("ws://127.0.0.1:%d/chat/%s/" % (port, room), max_queue=None,
                                          open_timeout=30, ping_interval=None)
            history = json.loads(await asyncio.wait_for(ws.recv(), 30))
            assert history["type"] == "history", history
            return Member(ws, "%s-%d" % (room, i))
        members += await asyncio.gather(*(one(i) for i in range(start, min(count, start + batch))))
    return members


async def wait_all(members, expected, timeout):
    """Waits until every member holds `expected` texts (bounded); returns deliveries missing."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        missing = sum(max(0, expected - len(m.texts)) for m in members)
        if missing == 0:
            return 0
        await asyncio.sleep(0.1)
    return sum(max(0, expected - len(m.texts)) for m in members)


async def close_all(members):
    await asyncio.gather(*(m.ws.close() for m in members), return_exceptions=True)


def redis_stack(prefix, workers=2, servers=1, extra_worker=(), layer=None):
    """`servers` x runserver --noworker and `workers` x runworker on the test Redis under
    `prefix` (or on `layer`)."""
    layer = layer or redis_url(prefix)
    # Hundreds of sockets connect at once to a debug build on 2 cores: the accept may take longer
    # than the default 5 s (a 403). These tests count deliveries, not connect latency.
    procs = [server("--noworker", "--layer", layer, "--websocket-connect-timeout", "30") for _ in range(servers)]
    ws = [Proc("runworker", "--layer", layer, "--threads", "32", *extra_worker) for _ in range(workers)]
    for w in ws:
        w.wait_line("worker ready")
    return layer, procs, ws


def stop_all(procs, workers):
    for w in workers:
        if w.p.poll() is None:
            w.stop()
    for p, _ in procs:
        if p.p.poll() is None:
            p.stop()


async def big_room(ports, room, size, messages=3, logs=()):
    members = await open_members(ports, room, size)
    # The servers' logs from here on: a group send that skips members while the room's messages
    # go out is a failure (during the join storm itself, a presence diff may find a server's
    # process channel full of accept replies: at most once, counted, not this test's subject).
    marks = [(proc, os.path.getsize(proc.log.name)) for proc in logs]
    sender = members[0]
    texts = ["%s message %d" % (room, i) for i in range(messages)]
    started = time.time()
    for t in texts:
        await sender.ws.send(t)
    missing = await wait_all(members, messages, 60)
    took = time.time() - started
    got = sum(len(m.texts) for m in members)
    print("  %s: %d members x %d messages: %d of %d deliveries in %.2f s" % (room, size, messages, got,
                                                                            size * messages, took), flush=True)
    assert missing == 0, "%d deliveries missing" % missing
    assert all(m.texts == texts for m in members), "a member got the messages out of order or twice"
    for proc, mark in marks:
        with open(proc.log.name) as f:
            f.seek(mark)
            assert "skipped members" not in f.read(), "a group send skipped members while the room's messages went out"
    await close_all(members)


@test
def a_room_of_1000_on_redis_one_server_and_split_over_two():
    (layer, procs, workers) = redis_stack("e2ebig%d:" % os.getpid(), servers=2)
    try:
        ports = [port for _, port in procs]
        asyncio.run(big_room(ports[:1], "big-one", 1000, logs=[p for p, _ in procs]))
        asyncio.run(big_room(ports, "big-two", 1000, logs=[p for p, _ in procs]))
    finally:
        stop_all(procs, workers)


async def join_with_retry(port, room, name, retried):
    """Joins `room`, coming back after the Retry-After of each 503 (counted in `retried`), as a
    client does; fails when it never gets in."""
    for _ in range(6):
        try:
            ws = await websockets.connect("ws://127.0.0.1:%d/chat/%s/" % (port, room), max_queue=None,
                                          open_timeout=60, ping_interval=None)
        except websockets.exceptions.InvalidStatusCode as e:
            assert e.status_code == 503, "refused with %d, not 503" % e.status_code
            retry = int(e.headers.get("retry-after", "0"))
            assert 1 <= retry <= 5, e.headers
            retried[0] += 1
            await asyncio.sleep(retry)
            continue
        history = json.loads(await asyncio.wait_for(ws.recv(), 60))
        assert history["type"] == "history", history
        return Member(ws, name)
    raise AssertionError("socket %s never got in" % name)


@test
def a_join_storm_of_1000_sockets_at_once_all_get_in():
    """1,000 sockets open at once on one room (what every client does after a restart or a
    1012), against one server and two workers with the default 5 s connect timeout: the connects
    queue behind each other with backpressure (the timeout starts when a connect reaches the
    layer); a client the server truly cannot take is told 503 with a Retry-After and gets in
    when it comes back then. Every socket joins, and a message reaches all 1,000."""
    (layer, procs, workers) = redis_stack("e2estorm%d:" % os.getpid())
    proc, port = procs[0]
    # The default connect timeout: the stack's server has 30 s, this one the default 5 s.
    storm, sport = server("--noworker", "--layer", layer)
    try:
        async def run():
            room = "storm%d" % os.getpid()
            retried = [0]
            started = time.time()
            members = await asyncio.gather(*(join_with_retry(sport, room, "storm-%d" % i, retried) for i in range(1000)))
            joined = time.time() - started
            await members[0].ws.send("after the storm")
            missing = await wait_all(members, 1, 60)
            print("  1000 sockets at once: all in after %.1f s (%d told 503 + Retry-After and came back); "
                  "1 message to all: %d missing" % (joined, retried[0], missing), flush=True)
            assert missing == 0, "%d members missed the message" % missing
            await close_all(members)
        asyncio.run(run())
    finally:
        storm.stop()
        stop_all(procs, workers)


def storm_costs():
    """Redis's time in scripts so far (µs, INFO commandstats: EVAL and EVALSHA) and the sends it
    refused as full on websocket.connect and websocket.disconnect (the layer's statistics keys,
    shared by every prefix: the e2e tests run one at a time)."""
    usec = 0
    for line in redis_cli("INFO", "commandstats").splitlines():
        if line.startswith(("cmdstat_evalsha:", "cmdstat_eval:")):
            usec += int(line.split("usec=", 1)[1].split(",", 1)[0])
    refused = sum(int(redis_cli("GET", "asgi-meta:%s:channel_full_count" % c) or 0)
                  for c in ("websocket.connect", "websocket.disconnect"))
    return usec, refused


@test
def a_reconnect_storm_over_two_servers_three_times_all_get_back():
    """The storm after a restart, three times: E2E_STORM sockets (the issue's 5,000 by default)
    over two servers with the default 5 s connect timeout and two workers all join one room at
    once, a message reaches every one, then all close and reconnect at once. Every socket gets
    back in each round (a 503 + Retry-After is retried, as clients do); the time until all are
    back is printed per round, with what the storm cost Redis: its time in scripts and the sends
    it refused as full, per socket, each bounded (see the assertions)."""
    count = int(os.environ.get("E2E_STORM", "5000"))
    # This client holds every socket: raise its descriptor limit (the servers raise their own).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < count + 500:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, count + 1000), hard))
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= count + 100, "RLIMIT_NOFILE hard limit %d" % hard
    (layer, procs, workers) = redis_stack("e2ereconnect%d:" % os.getpid(), servers=0)
    servers = [server("--noworker", "--layer", layer) for _ in range(2)]
    try:
        async def run():
            room = "reconnect%d" % os.getpid()
            took = []
            before = storm_costs()
            for round_ in range(3):
                retried = [0]
                started = time.time()
                members = await asyncio.gather(*(
                    join_with_retry(servers[i % 2][1], room, "r%d-%d" % (round_, i), retried) for i in range(count)))
                took.append((time.time() - started, retried[0]))
                await members[0].ws.send("round %d" % round_)
                missing = await wait_all(members, 1, 120)
                assert missing == 0, "round %d: %d of %d members missed the message" % (round_, missing, count)
                await close_all(members)
            after = storm_costs()
            script_ms, refused = (after[0] - before[0]) / 1000.0, after[1] - before[1]
            joins = 3 * count
            print("  %d sockets over 2 servers, 3 reconnect storms: all back after %s; every one got the round's "
                  "message; Redis spent %.0f ms in scripts (%.2f ms per join) and refused %d sends as full (%.2f per "
                  "connect or disconnect)" % (count, ", ".join("%.1f s (%d told 503)" % t for t in took), script_ms,
                                              script_ms / joins, refused, refused / (2.0 * joins)), flush=True)
            # The bounds (session 29's measurements at 5,000, release build): a presence list read
            # per joining socket cost Redis 3.5 ms per join (O(N) each, O(N^2) a storm); one read
            # for many, 0.4 ms. Each connection retrying a full websocket.connect on its own made
            # 3.2 refused sends per connect or disconnect; one prober per channel and server, 0.9.
            assert script_ms / joins < 1.5, "Redis spent %.2f ms in scripts per join" % (script_ms / joins)
            assert refused / (2.0 * joins) < 2.0, "%d refused sends for %d connects and disconnects" % (refused, 2 * joins)
        asyncio.run(run())
    finally:
        for p, _ in servers:
            if p.p.poll() is None:
                p.stop()
        stop_all(procs, workers)


@test
def a_room_of_1000_on_the_embedded_default():
    proc, port = server()
    try:
        asyncio.run(big_room([port], "big-mem", 1000))
    finally:
        assert proc.stop() == 0


async def busy_rooms(ports, rooms=4, per_room=10, rate=2.0, seconds=4.0):
    """`rooms` rooms of `per_room` sockets, each socket sending `rate` messages a second for
    `seconds`; every member must get every message of its room, each sender's in order."""
    by_room = {}
    for r in range(rooms):
        by_room["busy%d" % r] = await open_members(ports, "busy%d-%d" % (r, os.getpid()), per_room)
    sent = collections.defaultdict(list)

    async def talk(room, member):
        for i in range(int(rate * seconds)):
            text = "%s #%d" % (member.name, i)
            await member.ws.send(text)
            sent[room].append(text)
            await asyncio.sleep(1.0 / rate)

    await asyncio.gather(*(talk(room, m) for room, ms in by_room.items() for m in ms))
    expected_total = 0
    for room, ms in by_room.items():
        missing = await wait_all(ms, len(sent[room]), 30)
        expected_total += len(sent[room]) * len(ms)
        assert missing == 0, "%s: %d deliveries missing" % (room, missing)
        for m in ms:
            assert sorted(m.texts) == sorted(sent[room]), "%s got another room's message or a duplicate" % m.name
            for other in ms:
                mine = [t for t in m.texts if t.startswith(other.name + " ")]
                assert mine == [t for t in sent[room] if t.startswith(other.name + " ")], "out of order"
        assert all(m.closed_code is None for m in ms), "a socket was closed"
    print("  %d deliveries, all arrived, each sender's in order" % expected_total, flush=True)
    for ms in by_room.values():
        await close_all(ms)


@test
def forty_sockets_in_four_busy_rooms_on_redis_with_two_workers():
    (layer, procs, workers) = redis_stack("e2ebusy%d:" % os.getpid())
    try:
        asyncio.run(busy_rooms([procs[0][1]]))
    finally:
        stop_all(procs, workers)


@test
def forty_sockets_in_four_busy_rooms_on_the_embedded_default():
    proc, port = server()
    try:
        asyncio.run(busy_rooms([port]))
    finally:
        assert proc.stop() == 0


async def send_burst(port, room, count):
    """Three members of `room`; the first sends `count` texts ("burst 000", ...) back to back.
    Returns the members and the texts, in send order."""
    members = await open_members([port], room, 3)
    texts = ["burst %03d" % i for i in range(count)]
    for t in texts:
        await members[0].ws.send(t)
    return members, texts


async def ordered_burst(port, count=200):
    members, texts = await send_burst(port, "burst-%d-%d" % (port, os.getpid()), count)
    missing = await wait_all(members, count, 60)
    assert missing == 0, "%d deliveries missing" % missing
    for m in members:
        assert m.texts == texts, "out of order: %r" % [t for a, t in zip(m.texts, texts) if a != t][:5]
    assert all(m.closed_code is None for m in members), [m.closed_code for m in members]
    await close_all(members)


@test
def an_ordered_burst_of_200_on_redis_with_two_workers():
    (layer, procs, workers) = redis_stack("e2eburst%d:" % os.getpid())
    try:
        asyncio.run(ordered_burst(procs[0][1]))
        for w in workers:
            w.log.seek(0)
            log = w.log.read()
            assert "re-queue" not in log and "1013" not in log and "lost" not in log, log[-2000:]
    finally:
        stop_all(procs, workers)


def churn_rounds(lose_history_at=None, rounds=10, sockets=16, per_socket=4):
    """Ten rounds of 16 sockets over two servers, each sending 4 texts and closing at once, through
    two workers, while a listener stays in the room: each socket's texts pass two ordered stages
    (its frames, then the room's hand-off) and its disconnect ends both. Every text arrives once
    and in its socket's order, with no socket's texts held near a gap timeout (10 s: a stall
    found by the red team, where a worker's turn ran on a stale copy of the socket's session and
    left what was due parked until the gap watch's look), nothing dropped or skipped; once every
    socket is closed, the room's group is empty and no channel session, hand-off counter or
    receiver's order is left (a disconnect that never ran left them for 24 h). Before the fix:
    10.5 and 10.8 s with a 10 s gap timeout, where this build takes 3.4. It also found texts
    lost by the servers: a gap fill whose history read ran before the gap it was applied to
    skipped publications appended after the read (1 to 4 of 640, in 1 run of 6)."""
    prefix = "e2echurn%d%s:" % (os.getpid(), "h" if lose_history_at is not None else "")
    layer = redis_url(prefix)
    sports = [free_port(), free_port()]
    procs = [server("--noworker", "--layer", layer, "--websocket-connect-timeout", "30", "--metrics-port", str(sp))
             for sp in sports]
    mports = [free_port(), free_port()]
    # A gap timeout of 60 s: a socket whose texts wait for one shows as a run of a minute, far
    # from the few seconds the rounds take (no speed is judged here).
    workers = [Proc("runworker", "--layer", layer, "--threads", "32", "--metrics-port", str(mp),
                    "--ordering-gap-timeout", "60") for mp in mports]
    for w in workers:
        w.wait_line("worker ready")
    ports = [p[1] for p in procs]
    room = "churn-%d" % os.getpid()

    def metric(mport, name):
        with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % mport, timeout=10) as r:
            return sum(float(line.rpartition(" ")[2]) for line in r.read().decode().splitlines() if line.startswith(name))

    def leftovers():
        return [k for k in redis_cli("--scan", "--pattern", prefix + "session:*").split() if k]

    try:
        async def run():
            listener = (await open_members([ports[0]], room, 1))[0]
            sent = collections.defaultdict(list)
            started = time.time()
            for r in range(rounds):
                if r == lose_history_at:
                    # What a Redis that lost the room's history (evicted, flushed) does mid-stream.
                    redis_cli("del", prefix + "history:chat-" + room, prefix + "history-meta:chat-" + room)
                async def one(i):
                    ws = await websockets.connect("ws://127.0.0.1:%d/chat/%s/" % (ports[i % 2], room), max_queue=None,
                                                  open_timeout=30, ping_interval=None)
                    await asyncio.wait_for(ws.recv(), 30)  # the history
                    for k in range(per_socket):
                        text = "r%02ds%02d %d" % (r, i, k)
                        await ws.send(text)
                        sent[text.split()[0]].append(text)
                    await ws.close()
                await asyncio.gather(*(one(i) for i in range(sockets)))
            total = sum(len(v) for v in sent.values())
            missing = await wait_all([listener], total, 90)
            took = time.time() - started
            got = listener.texts
            print("  %d texts from %d sockets, %d received, all in %.1f s" % (total, len(sent), len(got), took), flush=True)
            if missing:
                waiting = [k for k in redis_cli("--scan", "--pattern", prefix + "__wait__*").split() if k]
                print("  missing: %r; parked: %r" % ([t for v in sent.values() for t in v if t not in got][:8],
                                                      sorted(k[len(prefix):] for k in waiting)[:8]), flush=True)
                db = sqlite3.connect(os.environ["CHAT_DATABASE"])
                lost = [t for v in sent.values() for t in v if t not in got]
                print("  stored: %r" % [(t, db.execute("select id from chat_message where text = ?", (t,)).fetchall()) for t in lost[:8]])
                for w in workers:
                    w.log.seek(0)
                    print("\n".join([line[:300] for line in w.log.read().splitlines() if "warning" in line or "error" in line][:10]))
            assert missing == 0, "%d of %d texts never arrived" % (missing, total)
            assert len(got) == len(set(got)), "a text arrived twice"
            for socket_name, texts in sent.items():
                assert [t for t in got if t.split()[0] == socket_name] == texts, "%s out of order" % socket_name
            # 640 (or 1,728) texts of short bursts: seconds for a debug build on 2 cores; a socket
            # whose texts waited for the gap timeout (60 s) pushes it past this.
            assert took < 40, "the rounds took %.1f s: a socket's texts waited for a gap timeout" % took
            dropped = [metric(mp, "channels_dropped_total") for mp in mports]
            skipped = [metric(mp, "channels_ordering_skipped_total") for mp in mports]
            assert sum(dropped) == 0 and sum(skipped) == 0, "dropped %r, skipped %r with no fault" % (dropped, skipped)
            # The servers' count of publications given up on (a gap the history could not fill):
            # nothing was lost, so nothing may be counted (an alarm that rings in ordinary churn
            # cannot tell real loss). With the history deleted mid-run, what the servers skipped
            # is what the deletion took.
            given_up = [metric(sp, 'channels_publications_total{outcome="skipped"}') for sp in sports]
            print("  publications the servers counted as skipped: %r" % (given_up,), flush=True)
            if lose_history_at is None:
                assert sum(given_up) == 0, "the servers counted %r publications as skipped, none lost" % (given_up,)
            await close_all([listener])
            until(lambda: not leftovers(), "every socket's sessions to go", timeout=15)
            group = redis_cli("zcard", prefix + ":group:chat-" + room)
            assert group in ("0", ""), "%s members left in the room's group" % group
        asyncio.run(run())
    finally:
        stop_all(procs, workers)


@test
def sockets_that_burst_and_close_in_rounds_leave_nothing_behind():
    churn_rounds()


@test
def a_rooms_history_lost_in_the_middle_of_the_rounds_loses_no_text():
    """The same rounds, with the room's history deleted from Redis after the fourth (evicted, or
    flushed by an operator): publications of the old history and the new one reach the servers
    interleaved. Before, a listener switched between the two epochs at each and dropped the new
    one's that came after a later one as duplicates (8-10 texts of 1,728 lost a run, counted
    nowhere)."""
    churn_rounds(lose_history_at=4, rounds=12, sockets=24, per_socket=6)


@test
def an_ordered_burst_of_200_on_the_embedded_default():
    proc, port = server()
    try:
        asyncio.run(ordered_burst(port))
    finally:
        assert proc.stop() == 0


@test
def a_worker_sigkilled_in_an_ordered_burst_loses_a_bounded_few_and_keeps_order():
    """One socket sends 300 messages back to back through three workers (both ordered stages
    park early messages on Redis) and one worker is SIGKILLed mid-burst: parked messages are in
    Redis, not in the dead worker, so the survivor runs them; what the dead worker held is lost
    (at most once), each gap is skipped after --ordering-gap-timeout, and every member still
    gets what arrives in send order, none twice; 20 messages sent afterwards all arrive."""
    gap = ("--ordering-gap-timeout", "2")
    (layer, procs, workers) = redis_stack("e2eburstkill%d:" % os.getpid(), workers=1, extra_worker=gap)
    port = procs[0][1]
    # Two survivors: they race each other for the turns the dead worker leaves.
    mports = [free_port() for _ in range(2)]
    for mport in mports:
        workers.append(Proc("runworker", "--layer", layer, "--threads", "32", *gap, "--metrics-port", str(mport)))

    def counted(name):
        total = 0.0
        for mport in mports:
            with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % mport, timeout=10) as r:
                total += sum(float(line.rpartition(" ")[2]) for line in r.read().decode().splitlines()
                             if line.startswith(name + " ") or line.startswith(name + "{"))
        return total
    try:
        for w in workers[1:]:
            w.wait_line("worker ready")
        async def run():
            members, texts = await send_burst(port, "burstkill-%d" % os.getpid(), 300)
            # Killed once the burst is flowing: some delivered, most still in the pipeline.
            deadline = time.time() + 60
            while len(members[1].texts) < 40 and time.time() < deadline:
                await asyncio.sleep(0.01)
            assert len(members[1].texts) >= 40, "the burst never started: %d delivered" % len(members[1].texts)
            in_flight = len(texts) - len(members[1].texts)
            await asyncio.to_thread(workers[0].stop, signal.SIGKILL)
            killed_at = time.time()
            # Until the last message arrives or nothing has moved for 3 gap timeouts.
            last_change, seen = time.time(), -1
            while time.time() - last_change < 6 and time.time() < killed_at + 120:
                now = sum(len(m.texts) for m in members)
                if now != seen:
                    seen, last_change = now, time.time()
                if all(m.texts and m.texts[-1] == texts[-1] for m in members):
                    break
                await asyncio.sleep(0.1)
            settled = last_change - killed_at
            after = ["after %02d" % i for i in range(20)]
            for t in after:
                await members[0].ws.send(t)
            deadline = time.time() + 30
            while time.time() < deadline and not all(m.texts[-20:] == after for m in members):
                await asyncio.sleep(0.1)
            for m in members:
                got = [t for t in m.texts if t.startswith("burst")]
                assert len(got) == len(set(got)), "%s got a message twice" % m.name
                assert got == sorted(got), "%s: out of order: %r" % (m.name, [t for a, t in zip(got, sorted(got)) if a != t][:5])
                assert m.texts[-20:] == after, "%s: messages sent after the kill missing: %r" % (m.name, m.texts[-20:])
            lost = [t for t in texts if not any(t in m.texts for m in members)]
            partial = [t for t in texts if t not in lost and not all(t in m.texts for m in members)]
            print("  %d in flight at the kill; %d of 300 lost with the killed worker, %d reached only some members;"
                  " the burst settled %.1f s after the kill" % (in_flight, len(lost), len(partial), settled), flush=True)
            # A liveness bound, not a speed figure: the dead worker leaves up to dozens of gaps
            # (every other message, with two workers); skipped one gap timeout (2 s) or two each,
            # the burst took 26-122 s to settle in 5 of 12 runs. The first gap waits its timeout;
            # the ones it proves lost (a later message seen waiting) go after an eighth of it each.
            assert settled < 15 * 2, "the burst took %.1f s to settle after the kill: gaps skipped one by one" % settled
            # The bound: what the killed worker held. Its slots (--threads 32, plus one reserved per
            # other channel it listens on, at most 32 / 4 = 8) hold one message each; behind the
            # running message of this socket, and behind the running one of its ordered hand-off
            # to `chat-messages`, a mailbox each holds up to 64 more without slots
            # (Mailboxes.freeWaiting). Parked messages are on Redis and survive. A room's send is
            # one script: a message reaches all three members or none.
            assert len(lost) <= 32 + 8 + 2 * 64, "%d messages lost: more than the killed worker could hold" % len(lost)
            assert not partial, partial[:5]
            assert all(m.closed_code is None for m in members), [m.closed_code for m in members]
            # Nothing lost silently: every lost message is a skipped order in one of the two
            # stages (more when the dead worker had done a message's work but not recorded it),
            # and no message was given up too early and then dropped when it came.
            skipped = counted("channels_ordering_skipped_total")
            late = counted('channels_dropped_total{reason="late"}')
            print("  the survivors counted %d skipped orders, %d late messages" % (skipped, late), flush=True)
            assert skipped >= len(lost), "%d lost, only %d counted as skipped" % (len(lost), skipped)
            assert late == 0, "%d messages came after their gap was skipped" % late
            await close_all(members)
        asyncio.run(run())
    finally:
        stop_all(procs, workers)


@test
def every_worker_sigkilled_in_an_ordered_burst_and_a_new_one_resumes_it_unprompted():
    """Both workers of a socket's ordered burst are SIGKILLed at once (an OOM kill of their
    container, a crashed host) while messages of the burst wait parked on Redis behind ones the
    dead workers held. Nothing of the socket is left in `websocket.receive`, and the client sends
    nothing more: no message would ever bring a gate back to that socket. A worker started
    afterwards (a restart) finds the dead workers' lapsed watch leases and resumes the socket:
    every parked message arrives, in order, with no new frame (before, they waited for the
    socket's next frame and expired unseen after 60 s)."""
    gap = ("--ordering-gap-timeout", "2")
    prefix = "e2eorphan%d:" % os.getpid()
    (layer, procs, workers) = redis_stack(prefix, workers=2, extra_worker=gap)
    port = procs[0][1]
    mport = free_port()
    try:
        async def run():
            members, texts = await send_burst(port, "orphan-%d" % os.getpid(), 300)
            # Killed once nothing of the socket is queued where a new worker would take it
            # (`websocket.receive`, and `chat-messages` between the two ordered stages): the
            # workers are frozen (SIGSTOP), the queues looked at, and killed if empty, let go on
            # for a moment if not. A new worker's only way back to the socket is then a sweep.
            queues = [prefix + "websocket.receive", prefix + "chat-messages"]
            def queued():
                return sum(int(redis_cli("llen", q) or 0) for q in queues)
            deadline = time.time() + 60
            killed = False
            while time.time() < deadline and not killed and len(members[1].texts) < 280:
                if len(members[1].texts) < 20 or queued():
                    await asyncio.sleep(0.005)
                    continue
                for w in workers:
                    w.p.send_signal(signal.SIGSTOP)
                await asyncio.sleep(0.05)  # what they wrote before the freeze reaches Redis
                if queued() == 0:
                    for w in workers:
                        w.p.send_signal(signal.SIGKILL)
                    killed = True
                else:
                    for w in workers:
                        w.p.send_signal(signal.SIGCONT)
                    await asyncio.sleep(0.01)
            if not killed:
                print("  SKIPPED the check: no moment with nothing queued before the burst was done", flush=True)
                return
            for w in workers:
                w.p.wait(10)
            killed_at = time.time()
            at_kill = len(members[1].texts)
            parked = sum(int(redis_cli("llen", k) or 0) for k in redis_cli("--scan", "--pattern", prefix + "*wait*").split())
            print("  %d of 300 delivered at the kill, %d messages parked on Redis" % (at_kill, parked), flush=True)
            if at_kill == 300 or parked == 0:
                print("  SKIPPED the check: the burst was done (or nothing parked) before the kill", flush=True)
                return
            workers.append(Proc("runworker", "--layer", layer, "--threads", "32", *gap, "--metrics-port", str(mport)))
            workers[-1].wait_line("worker ready")
            # The dead workers' leases lapse (2 x 2 s + 2 s), a sweep claims them, the new watch
            # waits a gap timeout, then what was parked runs: until it all has (bounded).
            deadline = killed_at + 60
            while min(len(m.texts) for m in members) < at_kill + parked and time.time() < deadline:
                await asyncio.sleep(0.1)
            # Then until nothing has moved for 10 s (the burst's last messages may have died with
            # the workers that held them: the end is not a given message).
            last_change, seen = time.time(), -1
            while time.time() - last_change < 10 and time.time() < killed_at + 120:
                now = sum(len(m.texts) for m in members)
                if now != seen:
                    seen, last_change = now, time.time()
                await asyncio.sleep(0.1)
            settled = last_change - killed_at
            for m in members:
                got = [t for t in m.texts if t.startswith("burst")]
                assert len(got) == len(set(got)), "%s got a message twice" % m.name
                assert got == sorted(got), "%s: out of order" % m.name
            delivered = min(len(m.texts) for m in members)
            lost = [t for t in texts if not any(t in m.texts for m in members)]
            print("  after the restart: %d of 300 delivered (%d lost with the killed workers), the last %.1f s after the kill"
                  % (delivered, len(lost), settled), flush=True)
            # Everything parked at the kill runs (and whatever waited between the two ordered
            # stages); before, the delivered count stayed at the kill's.
            assert delivered >= at_kill + parked, (
                "the parked messages never ran: %d delivered, %d at the kill + %d parked, no new frame sent"
                % (delivered, at_kill, parked))
            # Two workers' hands: 2 x (32 slots + 8 reserved + 64 in the socket's mailbox + 64 in
            # its hand-off's).
            assert len(lost) <= 2 * (32 + 8 + 2 * 64), "%d lost: more than the killed workers held" % len(lost)
            with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % mport, timeout=10) as r:
                metrics = r.read().decode()
            resumed = sum(float(line.rpartition(" ")[2]) for line in metrics.splitlines()
                          if line.startswith("channels_ordering_resumed_total"))
            assert resumed >= 1, "resumed without channels_ordering_resumed_total counting it"
            await close_all(members)
        asyncio.run(run())
    finally:
        stop_all(procs, workers)


@test
def an_ordered_burst_through_workers_30_s_ahead_and_30_s_behind():
    """Clocks: two workers whose wall clocks are a minute apart (one 30 s ahead under
    `faketime`, one 30 s behind) share a socket's ordered burst of 200, both stages parking
    early messages for each other: every message arrives, in order, none skipped as a gap or
    dropped as late (a gap's age is the seeing worker's own monotonic clock, never another
    worker's wall-clock stamp)."""
    assert shutil.which("faketime"), "this test needs faketime (Debian package faketime; scripts/test.sh installs it)"
    (layer, procs, workers) = redis_stack("e2eclock%d:" % os.getpid(), workers=0)
    for offset in ("+30s", "-30s"):
        workers.append(Proc("runworker", "--layer", layer, "--threads", "32", "--ordering-gap-timeout", "5",
                            wrapper=("faketime", "-f", offset)))
    try:
        for w in workers:
            w.wait_line("worker ready")
        # The clocks really are a minute apart: each log line carries its process's time.
        stamps = []
        for w in workers:
            w.log.seek(0)
            line = next(l for l in w.log.read().splitlines() if "worker ready" in l)
            stamps.append(time.mktime(time.strptime(line.split("+")[0], "%Y-%m-%dT%H:%M:%S")))
        assert 50 <= stamps[0] - stamps[1] <= 70, "the workers' clocks are not a minute apart: %r" % stamps
        asyncio.run(ordered_burst(procs[0][1]))
        for w in workers:
            w.log.seek(0)
            log = w.log.read()
            assert "skipped messages" not in log and "older than the next order" not in log, log[-2000:]
    finally:
        stop_all(procs, workers)


async def chat_through_a_fault(port, fault, seconds=8.0, rooms=4, per_room=10):
    """40 sockets chat at 2 messages/s each while `fault()` runs in a thread after 2 s.
    Returns (sent per room, members per room)."""
    by_room = {}
    for r in range(rooms):
        by_room[r] = await open_members([port], "fault%d-%d" % (r, os.getpid()), per_room)
    sent = collections.defaultdict(list)

    async def talk(room, member):
        for i in range(int(seconds * 2)):
            text = "%s #%d" % (member.name, i)
            await member.ws.send(text)
            sent[room].append(text)
            await asyncio.sleep(0.5)

    async def inject():
        await asyncio.sleep(2)
        await asyncio.to_thread(fault)

    await asyncio.gather(inject(), *(talk(room, m) for room, ms in by_room.items() for m in ms))
    return sent, by_room


@test
def redis_sigkilled_and_restarted_with_aof_while_40_sockets_chat():
    aof = ("--appendonly", "yes", "--appendfsync", "always")
    with own_redis(*aof) as (redis_port, workdir, layer):
        (_, procs, workers) = redis_stack(None, layer=layer)
        port = procs[0][1]

        def fault():
            kill_redis(workdir)
            time.sleep(1.0)
            start_redis(redis_port, workdir, *aof)

        try:
            async def run():
                sent, by_room = await chat_through_a_fault(port, fault)
                total = missing = 0
                for room, ms in by_room.items():
                    missing += await wait_all(ms, len(sent[room]), 45)
                    total += len(sent[room]) * len(ms)
                closed = [m.closed_code for ms in by_room.values() for m in ms if m.closed_code is not None]
                got = sum(len(set(m.texts)) for ms in by_room.values() for m in ms)
                dups = sum(len(m.texts) - len(set(m.texts)) for ms in by_room.values() for m in ms)
                print("  %d of %d deliveries after the restart (%d duplicates), %d sockets closed"
                      % (got, total, dups, len(closed)), flush=True)
                for room, ms in by_room.items():
                    lost = sorted(set(sent[room]) - set(ms[0].texts))
                    if lost:
                        print("  room %s: %d never arrived, e.g. %r" % (room, len(lost), lost[:8]), flush=True)
                assert not closed, "sockets closed: %r" % closed
                assert missing == 0, "%d deliveries missing" % missing
                for ms in by_room.values():
                    await close_all(ms)
            asyncio.run(run())
            assert all(p.p.poll() is None for p, _ in procs) and all(w.p.poll() is None for w in workers), "a crash"
        finally:
            stop_all(procs, workers)


async def thirty_ordered_bursts(port, tag, fault):
    """30 sockets in three rooms of 10 (on `port`) each send 100 texts back to back while
    `fault` runs in a thread; waits until every member has everything, or nothing moved for
    20 s (two gap timeouts: a lost text's gap is skipped after one), within 150 s. Returns the
    counts (lost texts, duplicate deliveries, sender/member pairs out of order, rooms whose
    members differ, close codes) and the members."""
    rooms = {}
    for r in range(3):
        rooms[r] = await open_members([port], "%s%d-%d" % (tag, r, os.getpid()), 10)
    members = [m for ms in rooms.values() for m in ms]
    sent = {m.name: ["%s #%03d" % (m.name, i) for i in range(100)] for m in members}

    async def burst(m):
        for t in sent[m.name]:
            await m.ws.send(t)

    await asyncio.gather(asyncio.to_thread(fault), *(burst(m) for m in members))
    deadline, last, still = time.time() + 150, None, time.time()
    while time.time() < deadline:
        counts = [len(m.texts) for m in members]
        if all(c >= 1000 for c in counts):
            break
        if counts != last:
            last, still = counts, time.time()
        elif time.time() - still > 20:
            break
        await asyncio.sleep(0.2)
    lost = dups = disorder = unequal = 0
    for ms in rooms.values():
        if len({tuple(m.texts) for m in ms}) != 1:
            unequal += 1
        for m in ms:
            dups += len(m.texts) - len(set(m.texts))
            for sender in ms:
                got = [t for t in m.texts if t.startswith(sender.name + " #")]
                if got != sorted(got):
                    disorder += 1
        got = set(ms[0].texts)
        lost += sum(1 for sender in ms for t in sent[sender.name] if t not in got)
    closed = [m.closed_code for m in members if m.closed_code is not None]
    return (lost, dups, disorder, unequal, closed), members


@test
def redis_sigkilled_and_restarted_with_aof_during_30_ordered_bursts():
    """30 sockets in three rooms each send 100 texts back to back (each socket's texts pass the
    chat's two ordered stages: its frames, then the room's hand-off) while Redis (AOF, fsync
    always) is SIGKILLed 0.3 s into the bursts and restarted a second later. No consumer fails
    on the restart (a room's publication is tried again under one id, so it is stored once) and
    no server skips a publication the restarted Redis kept (its history reads wait the restart
    out): before, both lost texts (5-10 of 3,000 in a red team's runs, 26 in this test's first).
    What is still lost is bounded: a pop that Redis ran and whose reply died with it (at most
    once, as documented), each skipped and counted by the ordering gates. Every member of a
    room gets the same texts in its socket's order, each once (a send whose reply died with
    Redis is tried again, marked `__resent`, and the ordering gates run it once)."""
    aof = ("--appendonly", "yes", "--appendfsync", "always")
    with own_redis(*aof) as (redis_port, workdir, layer):
        (_, procs, workers) = redis_stack(None, layer=layer)
        port = procs[0][1]
        marks = [(proc, os.path.getsize(proc.log.name)) for proc in [p for p, _ in procs] + workers]
        try:
            async def run():
                def fault():
                    time.sleep(0.3)
                    kill_redis(workdir)
                    time.sleep(1.0)
                    start_redis(redis_port, workdir, *aof)

                (lost, dups, disorder, unequal, closed), members = await thirty_ordered_bursts(port, "aofburst", fault)
                print("  %d of 3000 texts lost, %d duplicates, %d sender/member pairs out of order, %d rooms whose "
                      "members differ, %d sockets closed" % (lost, dups, disorder, unequal, len(closed)), flush=True)
                assert not closed, "sockets closed: %r" % closed
                # A send whose reply died with Redis is tried again, marked, and run once.
                assert dups == 0 and disorder == 0, "%d duplicates, %d pairs out of order" % (dups, disorder)
                assert unequal == 0, "members of a room got different texts"
                assert lost <= 60, "%d of 3000 texts lost" % lost
                await close_all(members)
            asyncio.run(run())
            assert all(p.p.poll() is None for p, _ in procs) and all(w.p.poll() is None for w in workers), "a crash"
            for proc, mark in marks:
                with open(proc.log.name) as f:
                    f.seek(mark)
                    log = f.read()
                assert "consumer failed" not in log, "a consumer failed on the restart: " + log[log.index("consumer failed") - 300:][:600]
                assert "publications missing from the history were skipped" not in log, "a server skipped publications"
        finally:
            stop_all(procs, workers)


class ReplyCuttingProxy:
    """A TCP proxy to Redis for one process. After arm(n), each of the next n writes a client
    makes is forwarded to Redis and then, before Redis's replies go back, the connection is
    reset: the commands ran and their replies are lost, as when Redis is SIGKILLed between
    writing its append-only file and answering, or a load balancer drops a connection."""

    def __init__(self, target_port):
        self.target = target_port
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(128)
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.armed = self.cuts = 0
        threading.Thread(target=self.accept_loop, daemon=True).start()

    def arm(self, writes):
        with self.lock:
            self.armed += writes

    def close(self):
        self.listener.close()

    def accept_loop(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            state = {"cut": False}
            threading.Thread(target=self.up, args=(client, upstream, state), daemon=True).start()
            threading.Thread(target=self.down, args=(upstream, client, state), daemon=True).start()

    def up(self, client, upstream, state):
        try:
            while True:
                data = client.recv(65536)
                if not data:
                    break
                with self.lock:
                    cut = self.armed > 0
                    if cut:
                        self.armed -= 1
                        self.cuts += 1
                if cut:
                    state["cut"] = True
                upstream.sendall(data)
                if cut:
                    time.sleep(0.05)  # Redis runs them; the down pump drops their replies
                    break
        except OSError:
            pass
        for s in (upstream, client):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        upstream.close()

    def down(self, upstream, client, state):
        try:
            while True:
                data = upstream.recv(65536)
                if not data or state["cut"]:
                    break
                client.sendall(data)
        except OSError:
            pass
        if not state["cut"]:
            for s in (client, upstream):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@test
def a_servers_redis_connection_cut_after_its_sends_ran_during_30_ordered_bursts():
    """The interface server reaches Redis through a proxy that, 16 times during the bursts,
    forwards a write and resets the connection before the replies come back: the sends ran
    and the server, which cannot tell, sends them again (marked `__resent`). Both copies of a
    frame reach the workers, which could run them at once in two workers on the same stored
    order: a text twice to the whole room (seen once in the Redis-restart test). Now the
    marked copy waits for the first copy's turn and is dropped as late: every member of a room
    gets every text once, in its socket's order; nothing is lost (no pop lost a reply here)."""
    with own_redis("--appendonly", "no") as (redis_port, workdir, layer):
        proxy = ReplyCuttingProxy(redis_port)
        proc, port = server("--noworker", "--layer", "redis://127.0.0.1:%d/0" % proxy.port,
                            "--websocket-connect-timeout", "30")
        workers = [Proc("runworker", "--layer", layer, "--threads", "32") for _ in range(2)]
        for w in workers:
            w.wait_line("worker ready")
        marks = [(p, os.path.getsize(p.log.name)) for p in [proc] + workers]
        try:
            async def run():
                # Each of 8 rounds: the workers paused (so both copies of a frame wait for them
                # together, as behind a Redis restart), two of the server's writes cut, the
                # workers resumed.
                def fault():
                    for _ in range(8):
                        time.sleep(0.1)
                        for w in workers:
                            w.p.send_signal(signal.SIGSTOP)
                        proxy.arm(2)
                        time.sleep(0.3)
                        for w in workers:
                            w.p.send_signal(signal.SIGCONT)

                (lost, dups, disorder, unequal, closed), members = await thirty_ordered_bursts(port, "cutburst", fault)
                with open(proc.log.name) as f:
                    f.seek(marks[0][1])
                    retried = f.read().count("holding and retrying")
                print("  %d connections cut after their writes ran (%d sends held and retried); %d of 3000 texts "
                      "lost, %d duplicates, %d sender/member pairs out of order, %d rooms whose members differ, "
                      "%d sockets closed" % (proxy.cuts, retried, lost, dups, disorder, unequal, len(closed)), flush=True)
                assert proxy.cuts >= 10, "the proxy cut %d connections" % proxy.cuts
                assert not closed, "sockets closed: %r" % closed
                assert dups == 0 and disorder == 0, "%d duplicates, %d pairs out of order" % (dups, disorder)
                assert unequal == 0, "members of a room got different texts"
                assert lost == 0, "%d of 3000 texts lost" % lost
                await close_all(members)
            asyncio.run(run())
            assert proc.p.poll() is None and all(w.p.poll() is None for w in workers), "a crash"
            for p, mark in marks:
                with open(p.log.name) as f:
                    f.seek(mark)
                    log = f.read()
                assert "consumer failed" not in log, "a consumer failed: " + log[log.index("consumer failed") - 300:][:600]
        finally:
            stop_all([(proc, port)], workers)
            proxy.close()


@test
def a_redis_that_comes_back_empty_closes_sockets_with_1012_and_clients_can_rejoin():
    with own_redis("--appendonly", "no") as (redis_port, workdir, layer):
        (_, procs, workers) = redis_stack(None, layer=layer, workers=1)
        port = procs[0][1]
        try:
            async def run():
                members = await open_members([port], "empty", 10)
                kill_redis(workdir)
                start_redis(redis_port, workdir, "--appendonly", "no")
                deadline = time.time() + 20
                while time.time() < deadline and any(m.closed_code is None for m in members):
                    await asyncio.sleep(0.1)
                assert [m.closed_code for m in members] == [1012] * 10, [m.closed_code for m in members]
                # They join again and the room works.
                again = await open_members([port], "empty", 10)
                await again[0].ws.send("after the restart")
                assert await wait_all(again, 1, 20) == 0
                await close_all(again)
            asyncio.run(run())
        finally:
            stop_all(procs, workers)


@test
def a_worker_sigkilled_while_40_sockets_chat():
    """At-most-once: what the killed worker held is lost, but no socket is closed or wedged:
    ordering skips the gap after --ordering-gap-timeout, and everything sent afterwards arrives."""
    (layer, procs, workers) = redis_stack("e2ekill%d:" % os.getpid(), extra_worker=("--ordering-gap-timeout", "2"))
    port = procs[0][1]

    def fault():
        workers[0].stop(signal.SIGKILL)

    try:
        async def run():
            sent, by_room = await chat_through_a_fault(port, fault, seconds=10)
            total = lost = 0
            lost_messages = 0
            for room, ms in by_room.items():
                await wait_all(ms, len(sent[room]), 20)
                total += len(sent[room]) * len(ms)
                lost += sum(len(sent[room]) - len(set(m.texts)) for m in ms)
                lost_messages += sum(1 for t in sent[room] if not any(t in m.texts for m in ms))
                # Everything each socket sent from 5 s on (well after the kill and the gap timeout) arrived.
                for m in ms:
                    for other in ms:
                        late = [t for t in sent[room] if t.startswith(other.name + " ") and int(t.split("#")[1]) >= 10]
                        assert set(late) <= set(m.texts), "%s missed %r" % (m.name, sorted(set(late) - set(m.texts))[:3])
            closed = [m.closed_code for ms in by_room.values() for m in ms if m.closed_code is not None]
            print("  %d of %d deliveries lost with the killed worker (%d messages nobody got); %d sockets closed"
                  % (lost, total, lost_messages, len(closed)), flush=True)
            if lost > lost_messages * 10:
                # Seen once in a full run (5 of 8,000 for messages others got) and not since:
                # what a failure needs to be explained, printed before the assertion below.
                for room, ms in by_room.items():
                    for t in sent[room]:
                        missed = [m.name for m in ms if t not in m.texts]
                        if missed and len(missed) < len(ms):
                            print("  %r: missed by %s of %d" % (t, missed, len(ms)), flush=True)
                for p, _ in procs:
                    p.log.seek(0)
                    for line in p.log.read().splitlines():
                        if "warning" in line or "error" in line:
                            print("  server: " + line[:300], flush=True)
            assert not closed, closed
            # The bound: the killed worker held at most --threads (32) running consumers plus its
            # reserved slots (one per other channel it listens on, at most 32 / 4 = 8), and what it
            # popped never exceeds its free slots, so 40 messages in hand; plus its mailboxes, where
            # a socket's frame waits while the socket's previous frame runs: these sockets send
            # every 0.5 s, far slower than a consumer runs, so one frame each (40). A group send is
            # one script, so a message is lost for its whole room (10 members) or for nobody.
            assert lost_messages <= 40 + 40, "%d messages lost: more than the killed worker could hold" % lost_messages
            assert lost <= lost_messages * 10, "%d deliveries lost for %d lost messages" % (lost, lost_messages)
            for ms in by_room.values():
                await close_all(ms)
        asyncio.run(run())
    finally:
        stop_all(procs, workers)


@test
def a_client_that_never_reads_is_closed_by_the_bound_and_the_others_get_everything():
    proc, port = server("--max-queued-bytes", "65536")
    try:
        async def run():
            room = "slow%d" % os.getpid()
            members = await open_members([port], room, 5)
            # A raw client: handshake, then never read again, with a tiny receive window.
            slow = socket.socket()
            slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            slow.connect(("127.0.0.1", port))
            slow.sendall(("GET /chat/%s/ HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                          "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n" % room).encode())
            assert b"101" in slow.recv(200)
            # The kernel's send buffer (up to tcp_wmem's maximum) takes bytes before the server's
            # own queue does: send that much and 2 MB more. (The example keeps the first 2,000
            # characters of a chat message.)
            wmem_max = int(open("/proc/sys/net/ipv4/tcp_wmem").read().split()[2])
            texts = ["%05d " % i + "x" * 1900 for i in range((wmem_max + (2 << 20)) // 1900)]
            for t in texts:
                await members[0].ws.send(t)
            missing = await wait_all(members, len(texts), 60)
            assert missing == 0, "%d deliveries missing for the readers" % missing
            assert all(m.texts == texts for m in members)
            proc.wait_line("does not read", timeout=20)
            slow.close()
            await close_all(members)
        asyncio.run(run())
    finally:
        assert proc.stop() == 0


@test
def reading_clients_are_not_closed_for_a_backlog_they_were_never_offered():
    """Server A is stopped (SIGSTOP) while 300 messages of 8 KB reach its room's members through
    Redis, then resumed: its reply reader takes the whole backlog in one hand-over, 2.4 MB per
    socket against a 1 MiB bound of unwritten bytes. The 3 reading clients on A must get all
    300, none closed: a hand-over flushes a socket's frames as they pile up, so the bound sees
    only what the client was offered and did not take."""
    # Room in the layer for the whole backlog (the worker checks the capacity of A's channel).
    (layer, procs, workers) = redis_stack(None, layer=redis_url("e2ebacklog%d:" % os.getpid(), "capacity=100000"))
    a, aport = server("--noworker", "--layer", layer, "--websocket-connect-timeout", "30",
                      "--max-queued-bytes", str(1024 * 1024))
    try:
        async def run():
            room = "backlog%d" % os.getpid()
            readers = await open_members([aport], room, 3)
            sender = (await open_members([procs[0][1]], room, 1))[0]
            # 8 KB each, within the example's limits (2,000 characters, 8,000 bytes).
            texts = ["%03d " % i + "\U0001F600" * 1990 for i in range(300)]
            os.kill(a.p.pid, signal.SIGSTOP)
            try:
                for text in texts:
                    await sender.ws.send(text)
                # The worker has sent them all once the sender (on the other server) has them.
                assert await wait_all([sender], len(texts), 60) == 0, "the sender did not get its own messages"
            finally:
                os.kill(a.p.pid, signal.SIGCONT)
            missing = await wait_all(readers, len(texts), 60)
            codes = [m.closed_code for m in readers]
            print("  300 x 8 KB held for a stopped server, then one hand-over: %d deliveries missing, close codes %s"
                  % (missing, codes), flush=True)
            assert codes == [None] * 3, "reading clients closed: %s" % codes
            assert missing == 0 and all(m.texts == texts for m in readers), "%d deliveries missing" % missing
            await close_all(readers + [sender])
        asyncio.run(run())
    finally:
        if a.p.poll() is None:
            a.stop()
        stop_all(procs, workers)


async def echoes_across_a_freeze(port, pid, what):
    """Six sockets echo 60 numbered frames each (every third one 256 KB, the rest small) through
    `port` while process `pid` is frozen (SIGSTOP) for 7 s, past the layer's 5 s command
    timeout, with frames in flight both ways. After it resumes, every socket must get every
    echo exactly once (in any order: /echo/ keeps none across two workers), or be closed (told)."""
    sockets = [await websockets.connect("ws://127.0.0.1:%d/echo/" % port, max_size=None) for _ in range(6)]
    frames = 60

    def text(n, i):
        return ("%d:%d:" % (n, i)) + ("x" * (256 * 1024) if i % 3 == 0 else "y")

    got = [[] for _ in sockets]
    closed = [None] * len(sockets)

    async def send(n, ws):
        for i in range(frames):
            await ws.send(text(n, i))
            await asyncio.sleep(0.05)

    async def read(n, ws):
        try:
            while len(set(got[n])) < frames:
                frame = await asyncio.wait_for(ws.recv(), 30)
                got[n].append(int(frame.split(":")[1]))
            # Anything repeated would come right after the last one.
            while True:
                frame = await asyncio.wait_for(ws.recv(), 2)
                got[n].append(int(frame.split(":")[1]))
        except websockets.exceptions.ConnectionClosed as e:
            closed[n] = e.code
        except asyncio.TimeoutError:
            if len(set(got[n])) < frames:
                closed[n] = "timeout"

    readers = [asyncio.ensure_future(read(n, ws)) for n, ws in enumerate(sockets)]
    senders = [asyncio.ensure_future(send(n, ws)) for n, ws in enumerate(sockets)]
    await asyncio.sleep(1.0)
    os.kill(pid, signal.SIGSTOP)
    try:
        await asyncio.sleep(7)
    finally:
        os.kill(pid, signal.SIGCONT)
    await asyncio.gather(*senders, return_exceptions=True)
    await asyncio.gather(*readers)
    bad = []
    for n in range(len(sockets)):
        if closed[n] is not None and closed[n] != "timeout":
            continue  # told: the client reconnects
        if sorted(got[n]) != list(range(frames)):
            dups = len(got[n]) - len(set(got[n]))
            missing = sorted(set(range(frames)) - set(got[n]))
            bad.append("socket %d: %d echoes, %d repeated, missing %s, closed %s"
                       % (n, len(got[n]), dups, missing[:10], closed[n]))
    print("  6 sockets x %d frames (every third 256 KB) across a 7 s freeze of %s: %d echoes, closes %s, %d sockets wrong"
          % (frames, what, sum(len(g) for g in got), closed, len(bad)), flush=True)
    assert not bad, "; ".join(bad)
    for ws in sockets:
        await ws.close()


@test
def a_server_frozen_mid_stream_of_large_frames_loses_and_repeats_nothing():
    """Server A frozen: a command whose reply was only waiting unread in a frozen process's
    socket must not be failed and run again (a send retried twice is an echo repeated; a take
    failed after it ran is an echo lost)."""
    (layer, procs, workers) = redis_stack("e2efreeze%d:" % os.getpid())
    a, aport = procs[0]
    try:
        asyncio.run(echoes_across_a_freeze(aport, a.p.pid, "the server"))
    finally:
        stop_all(procs, workers)


@test
def redis_frozen_past_the_command_timeout_loses_and_repeats_nothing():
    """Redis itself frozen (SIGSTOP) for 7 s, past the 5 s command timeout, while its host's
    kernel still acknowledges: the commands it holds (the servers' sends, the workers' and the
    server's blocking takes) run when it resumes. A connection given up at the timeout would
    throw away what a take took (an echo lost) and retry a send that then runs twice (an echo
    repeated): 4 repeated and 2 lost before the layer probed its peer instead."""
    with own_redis() as (redis_port, workdir, layer):
        (_, procs, workers) = redis_stack(None, layer=layer)
        try:
            pid = int(open(workdir + "/redis.pid").read())
            asyncio.run(echoes_across_a_freeze(procs[0][1], pid, "Redis"))
            assert all(p.p.poll() is None for p, _ in procs) and all(w.p.poll() is None for w in workers), "a crash"
        finally:
            stop_all(procs, workers)


@test
def a_socket_held_while_redis_is_frozen_is_not_closed_for_a_pong_it_could_not_read():
    """Redis frozen (SIGSTOP) 8 s while a socket sends large frames: the server holds them and
    stops reading the socket, so the client's pongs wait unread behind them. With pings every
    second and a 2 s pong timeout, the socket must not be closed as unresponsive (1011): the
    silence is the server's own. When Redis resumes, every frame is echoed once."""
    with own_redis() as (redis_port, workdir, layer):
        procs = [server("--noworker", "--layer", layer, "--ping-interval", "1", "--ping-timeout", "2",
                        "--layer-outage-timeout", "60")]
        workers = [Proc("runworker", "--layer", layer, "--threads", "8")]
        workers[0].wait_line("worker ready")
        try:
            pid = int(open(workdir + "/redis.pid").read())

            async def run():
                ws = await websockets.connect("ws://127.0.0.1:%d/echo/" % procs[0][1], max_size=None, ping_interval=None)
                await ws.send("warm")
                assert await asyncio.wait_for(ws.recv(), 10) == "warm"
                got, closed = [], []

                async def read():
                    try:
                        while len(got) < 6:
                            got.append((await asyncio.wait_for(ws.recv(), 30))[:8])
                    except websockets.exceptions.ConnectionClosed as e:
                        closed.append(e.code)
                reader = asyncio.ensure_future(read())
                os.kill(pid, signal.SIGSTOP)
                try:
                    for i in range(6):
                        await ws.send("%d:" % i + "x" * (512 * 1024))
                    await asyncio.sleep(8)
                finally:
                    os.kill(pid, signal.SIGCONT)
                await asyncio.wait_for(reader, 40)
                print("  6 frames of 512 KB held through an 8 s Redis freeze with 1 s pings: %d echoed, closes %s"
                      % (len(got), closed), flush=True)
                assert not closed, "closed while its frames were held: %s" % closed
                assert sorted(g.split(":")[0] for g in got) == [str(i) for i in range(6)], got
                await ws.close()
            asyncio.run(run())
        finally:
            stop_all(procs, workers)


@test
def a_websocket_receive_that_stays_full_closes_with_1013_only_after_the_bound():
    """The real asgi_redis plays an application that accepts but never reads websocket.receive
    (capacity 2): the server holds the third frame, retries for --channel-full-timeout with the
    client's reading paused, and only then closes with 1013; the retries and the close are counted."""
    from asgi_redis import RedisChannelLayer
    prefix = "e2efullws%d:" % os.getpid()
    app = RedisChannelLayer(hosts=[REDIS_URL.split("?")[0]], prefix=prefix)
    proc, port = server("--noworker", "--layer", redis_url(prefix, "capacity.websocket.receive=2"),
                        "--channel-full-timeout", "1.5")
    try:
        async def run():
            client = asyncio.ensure_future(websockets.connect("ws://127.0.0.1:%d/full/" % port))
            connect = None
            for _ in range(10):
                channel, connect = await asyncio.to_thread(app.receive, ["websocket.connect"], True)
                if channel:
                    break
            app.send(connect["reply_channel"], {"accept": True})
            ws = await client
            for i in range(3):
                await ws.send("frame %d" % i)
            full_at = time.time()
            try:
                await asyncio.wait_for(ws.recv(), 15)
                raise AssertionError("got a frame, expected a close")
            except websockets.exceptions.ConnectionClosed as e:
                closed_after = time.time() - full_at
                assert e.code == 1013, e.code
            assert 1.3 <= closed_after < 10, "closed %.2f s after the channel filled" % closed_after
            # The application that accepted the socket hears it went (a group would otherwise
            # keep it): its frames were given up, its disconnect was not.
            channel, disconnect = None, None
            for _ in range(10):
                channel, disconnect = await asyncio.to_thread(app.receive, ["websocket.disconnect"], True)
                if channel:
                    break
            assert disconnect and disconnect["reply_channel"] == connect["reply_channel"], disconnect
            assert disconnect["code"] == 1013, disconnect
        asyncio.run(run())
        proc.wait_line("holding and retrying")
        proc.wait_line("stayed full; closing with 1013")
    finally:
        assert proc.stop() == 0
        app.flush()


@test
def a_10_mib_response_arrives_whole_and_sse_events_arrive_as_sent():
    (layer, procs, workers) = redis_stack("e2ebody%d:" % os.getpid())
    ports = [procs[0][1]]
    try:
        proc_mem, port_mem = server()
        try:
            for port in ports + [port_mem]:
                status, body = get(port, "/download/10/")
                assert status == 200 and len(body) == 10 << 20, (status, len(body))
                assert body.startswith(b"0123456789abc") and body.count(b"\n") == len(body) // 129, "corrupted"
                sock = socket.create_connection(("127.0.0.1", port))
                sock.sendall(b"GET /events/ HTTP/1.1\r\nHost: localhost\r\n\r\n")
                started, first, data = time.time(), None, b""
                while b"event 3" not in data:
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                    if first is None and b"event 0" in data:
                        first = time.time() - started
                whole = time.time() - started
                sock.close()
                assert b"event 3" in data and b"text/event-stream" in data, data
                assert first is not None and first < whole - 2, "first event at %.2f s of %.2f s" % (first, whole)
        finally:
            assert proc_mem.stop() == 0
    finally:
        stop_all(procs, workers)


@test
def unrouted_websocket_receive_is_drained():
    """/private/ routes only websocket.connect: 300 frames (3x the channel capacity) must not
    fill websocket.receive or close the socket."""
    (layer, procs, workers) = redis_stack("e2eunrouted%d:" % os.getpid())
    port = procs[0][1]
    try:
        status, _, cookie = login(port, "unrouted", "pw-unrouted")
        assert status == 200

        async def run():
            async with websockets.connect("ws://127.0.0.1:%d/private/" % port,
                                          extra_headers={"Cookie": "sessionid=" + cookie}) as ws:
                welcome = json.loads(await asyncio.wait_for(ws.recv(), 10))
                assert welcome["type"] == "welcome", welcome
                for i in range(300):
                    await ws.send("ignored %d" % i)
                await ws.ping()
                await asyncio.sleep(1)
                assert ws.close_code is None
        asyncio.run(run())
        deadline = time.time() + 10
        pending = None
        while time.time() < deadline:
            out = subprocess.run([CHAT, "stats", "--layer", layer, "--json", "websocket.receive"],
                                 capture_output=True, text=True, timeout=30)
            pending = json.loads(out.stdout).get("channels", {}).get("websocket.receive", {}).get("messages_pending", 0)
            if pending == 0:
                break
            time.sleep(0.2)
        assert pending == 0, "websocket.receive holds %r" % pending
        for p, _ in procs:
            p.log.seek(0)
            assert "1013" not in p.log.read()
    finally:
        stop_all(procs, workers)


async def open_and_close(port, room, count):
    members = await open_members([port], room, count, batch=count)
    await close_all(members)
    return len(members)


@test
def workers_started_together_on_a_fresh_database_all_survive():
    """Four workers open a new chat database at the same moment (the first connects of a room):
    the migration race must not kill any of them, nor lose a connect."""
    saved = os.environ["CHAT_DATABASE"]
    os.environ["CHAT_DATABASE"] = os.path.join(tempfile.mkdtemp(prefix="chat-fresh-"), "chat.sqlite3")
    try:
        (layer, procs, workers) = redis_stack("e2efresh%d:" % os.getpid(), workers=4)
    finally:
        os.environ["CHAT_DATABASE"] = saved
    try:
        members = asyncio.run(open_and_close(procs[0][1], "fresh", 90))
        assert members == 90, "%d of 90 sockets joined" % members
        for w in workers:
            assert w.p.poll() is None, "a worker died: " + open(w.log.name).read()[-600:]
    finally:
        stop_all(procs, workers)


def group_size(room):
    keys = [k for k in redis_cli("--scan", "--pattern", "*group:chat-" + room).split() if k]
    return sum(int(redis_cli("zcard", k) or 0) for k in keys)


def start_event_streams(port, count):
    """`count` GET /events/ (four events a second apart) on raw sockets, each past its first
    event; returns (socket, what it has read so far) pairs."""
    socks = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.sendall(b"GET /events/ HTTP/1.1\r\nHost: localhost\r\n\r\n")
        socks.append(s)
    started = []
    for s in socks:
        head = b""
        while b"data: event 0" not in head:
            chunk = s.recv(4096)
            assert chunk, "connection closed before the first event"
            head += chunk
        started.append((s, head))
    return started


async def sigterm_under_load(port, proc, room, sockets=200, streams=10, talkers=20, after_exit=None):
    """`sockets` room members (`talkers` of them sending every 50 ms) and `streams` responses
    in flight when the server gets SIGTERM: every response must finish whole, every socket must
    be closed with 1001, and the application must get websocket.disconnect for every socket
    (the room's group is empty afterwards: each disconnect ran leaveRoom)."""
    members = await open_members([port], room, sockets)
    assert group_size(room) == sockets, "group holds %d of %d" % (group_size(room), sockets)
    loop = asyncio.get_running_loop()
    socks = await loop.run_in_executor(None, start_event_streams, port, streams)
    sent = [0]

    async def talk(m):
        try:
            while True:
                await m.ws.send("%s says %d" % (m.name, sent[0]))
                sent[0] += 1
                await asyncio.sleep(0.05)
        except (websockets.ConnectionClosed, asyncio.CancelledError):
            pass
    tasks = [asyncio.ensure_future(talk(m)) for m in members[:talkers]]
    await asyncio.sleep(0.5)
    started = time.time()
    proc.p.send_signal(signal.SIGTERM)
    rests = await asyncio.gather(*(loop.run_in_executor(None, read_all, s) for s, _ in socks))
    bodies = [head + rest for (_, head), rest in zip(socks, rests)]
    await asyncio.wait_for(asyncio.gather(*(m.task for m in members)), 30)
    for t in tasks:
        t.cancel()
    code = await loop.run_in_executor(None, proc.p.wait, 40)
    took = time.time() - started
    complete = [b for b in bodies if b"data: event 3" in b and b.endswith(b"0\r\n\r\n")]
    codes = {}
    for m in members:
        codes[m.closed_code] = codes.get(m.closed_code, 0) + 1
    left = group_size(room)
    if after_exit and left:
        left = await after_exit(room)
    print("  SIGTERM with %d sockets (%d talking, %d frames sent) and %d responses in flight: exit %s after %.1f s; "
          "%d of %d responses whole; close codes %s; %d of %d sockets' disconnects not seen by the application"
          % (sockets, talkers, sent[0], streams, code, took, len(complete), streams, codes, left, sockets), flush=True)
    assert code == 0, "exit code %s" % code
    assert len(complete) == streams, [b[-80:] for b in bodies if b not in complete][:2]
    assert codes == {1001: sockets}, codes
    assert left == 0, "%d members still in the group: their websocket.disconnect never ran" % left


@test
def sigterm_under_load_finishes_responses_and_disconnects_every_socket():
    """runserver with its in-process workers (the default) on Redis, then runserver --noworker
    with a runworker: SIGTERM while 200 sockets are open (20 of them talking) and 10 streamed
    responses are in flight."""
    layer = redis_url("e2eterm%d:" % os.getpid())
    proc, port = server("--layer", layer, "--websocket-connect-timeout", "30")
    try:
        asyncio.run(sigterm_under_load(port, proc, "term%d" % os.getpid()))
    finally:
        if proc.p.poll() is None:
            proc.stop(signal.SIGKILL)
    (layer, procs, workers) = redis_stack("e2eterm2%d:" % os.getpid(), workers=1)

    async def worker_catches_up(room):
        # The runworker still runs and takes the disconnects the server sent as it stopped.
        deadline = time.time() + 30
        while time.time() < deadline and group_size(room) > 0:
            await asyncio.sleep(0.2)
        return group_size(room)
    try:
        proc, port = procs[0]
        asyncio.run(sigterm_under_load(port, proc, "term2%d" % os.getpid(), after_exit=worker_catches_up))
    finally:
        stop_all(procs, workers)


summary()
