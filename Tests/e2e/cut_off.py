"""A server cut off from Redis, as its clients see it. Shared by test_realtime.py (the server
reaches Redis through a proxy that stops forwarding) and cluster_client.py (nft drops the
server host's packets to and from the Redis hosts, in a network namespace).

Needs only `websockets`: cluster_client.py runs it on a bare client host.
"""
import asyncio
import json
import time

import websockets


class Follower:
    """A room socket of the example that keeps every frame (messages carry offset and epoch)."""

    def __init__(self, ws):
        self.ws = ws
        # support.py (when loaded) hides the server's own frames from older tests; these want them.
        ws.server_frames = True
        self.frames = []
        # When the server's close frame arrived and when the connection was closed (wall clock).
        self.close_frame_at = None
        self.closed_at = None
        self.task = asyncio.ensure_future(self.read())
        self.watcher = asyncio.ensure_future(self.watch_close())

    async def read(self):
        try:
            async for frame in self.ws:
                self.record(json.loads(frame))
        except websockets.ConnectionClosed:
            pass

    async def watch_close(self):
        # The library tells the close frame (close_rcvd) apart from the connection's end
        # (close_code is set once TCP is closed) but has no callback for either.
        while self.closed_at is None:
            if self.close_frame_at is None and getattr(self.ws, "close_rcvd", None) is not None:
                self.close_frame_at = time.time()
            if self.ws.close_code is not None:
                self.closed_at = time.time()
                if self.close_frame_at is None and getattr(self.ws, "close_rcvd", None) is not None:
                    self.close_frame_at = self.closed_at
            await asyncio.sleep(0.02)

    def record(self, event):
        self.frames.append(event)

    def messages(self):
        return [f for f in self.frames if f.get("type") == "message"]

    def marker(self):
        return next((f for f in self.frames if f.get("type") in ("recovered", "position")), None)


async def follow(base, room, query=""):
    """A socket on the example's room page: `base` is "ws://host:port"."""
    ws = await websockets.connect("%s/chat/%s/%s" % (base, room, query), open_timeout=30, max_queue=None,
                                  ping_interval=None)
    return Follower(ws)


async def until(check, what, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("timed out after %.0f s waiting for %s" % (timeout, what))


async def cut_off_and_recover(a, b, room, count, cut, heal, seconds, closed_within):
    """`count` sockets on server `a` and on server `b` (bases "ws://host:port") follow `room`
    while a socket on `b` posts every 100 ms. `cut()` cuts `a` off from Redis for `seconds` of
    posting. `a`'s sockets must then be closed with 1012 within `closed_within` seconds (the
    close completes when the server reads the client's answer, well before its 5 s fallback); `heal()`
    ends the cut, and they come back through `a` with their last position and recover every
    message, complete. `b`'s sockets must lose nothing. Every message is counted. Returns the
    number of messages sent."""
    on_a = [await follow(a, room) for _ in range(count)]
    on_b = [await follow(b, room) for _ in range(count)]
    poster = await follow(b, room)
    for f in on_a + on_b + [poster]:
        await until(lambda: f.marker() is not None, "every socket's position", 30)
    sent = []

    async def posting(duration):
        deadline = time.time() + duration
        while time.time() < deadline:
            text = "tick %d" % len(sent)
            await poster.ws.send(json.dumps({"text": text}))
            sent.append(text)
            await asyncio.sleep(0.1)

    await posting(1)
    cut()
    try:
        await posting(seconds)
        await until(lambda: all(f.ws.close_code is not None for f in on_a), "A's sockets to be closed", closed_within)
    finally:
        heal()
    codes = [f.ws.close_code for f in on_a]
    assert codes == [1012] * count, "A's sockets after %.0f s cut off: %s" % (seconds, codes)
    # The client answers the server's close at once (it reads every frame); the server must
    # read that answer and close, though the socket's own sends are still held by the cut (not
    # wait out its 5 s fallback with reading paused).
    await until(lambda: all(f.closed_at is not None for f in on_a), "A's close times", 5)
    lags = [f.closed_at - f.close_frame_at for f in on_a if f.close_frame_at is not None]
    assert len(lags) == count, "%d of A's sockets saw no close frame" % (count - len(lags))
    assert max(lags) < 2.5, "A's sockets closed %.1f s (max) after the server's close frame: the answer was not read" % max(lags)
    back = []
    for f in on_a:
        last = f.messages()[-1]
        back.append(await follow(a, room, "?offset=%d&epoch=%s" % (last["offset"], last["epoch"])))
    await posting(2)
    await until(lambda: all(len(f.messages()) >= len(sent) for f in on_b + [poster]), "B's sockets to get all", 30)
    for f in on_b + [poster]:
        assert [m["text"] for m in f.messages()] == sent, "a socket on B lost messages"
    for old, new in zip(on_a, back):
        await until(lambda: new.marker() is not None, "the recovered marker", 30)
        assert new.marker()["type"] == "recovered" and new.marker()["complete"] is True, new.marker()
        await until(lambda: len(old.messages()) + len(new.messages()) >= len(sent), "A's socket to catch up", 30)
        texts = [m["text"] for m in old.messages()] + [m["text"] for m in new.messages()]
        assert texts == sent, "a socket on A got %d of %d (or out of order)" % (len(texts), len(sent))
    for f in back + on_b + [poster]:
        await f.ws.close()
    return len(sent)
