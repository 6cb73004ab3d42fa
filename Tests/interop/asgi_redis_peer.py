"""The Python side of the interop tests: drives the real asgi_redis 1.4.3 from PyPI.

Usage: asgi_redis_peer.py --hosts URL[,URL] [--prefix P] [--capacity N] COMMAND ARGS...
Values are printed as tagged JSON so that str and bytes stay distinct on the way to Swift.
"""
import argparse
import binascii
import json
import sys

import msgpack
from asgi_redis import RedisChannelLayer

# Messages both sides know by name; the Swift tests build the same ones.
CASES = {
    "nested": {
        "text": u"caf\u00e9 \u00a3",
        "raw": b"\xc2\xa3\x01\x00\x03!",
        "pound": u"\u00a3",
        "count": 300,
        "negative": -40,
        "big": 2 ** 40,
        "ratio": 1.5,
        "yes": True,
        "nothing": None,
        "list": [b"bytes", u"str", [1, u"two", b"three"]],
        "headers": [[b"host", b"example.com"], [b"x-dup", b"1"], [b"x-dup", b"2"]],
        "map": {"inner": b"\x00\xff", "deeper": {"s": u"x"}},
    },
    "small": {"text": u"hello"},
    "response": {"status": 200, "headers": [], "content": b"hi", "more_content": False},
    # The ASGI 1.0 messages as the interface server and the consumer helpers write them (key
    # order included): the Swift typed messages must encode to exactly these bytes.
    "http_request": {
        "reply_channel": u"daphne.response.abc!def", "http_version": u"1.1", "method": u"POST", "scheme": u"http",
        "path": u"/caf\u00e9/", "query_string": b"a=1&b=%20", "root_path": u"",
        "headers": [[b"host", b"example.com"], [b"cookie", b"sessionid=xyz"]], "body": b"x=1",
        "client": [u"127.0.0.1", 50000], "server": [u"127.0.0.1", 8000],
        "body_channel": u"http.request.body?abcdefghijkl",
    },
    "http_body_chunk": {"content": b"more", "closed": False, "more_content": True},
    "http_response_start": {"status": 404, "headers": [[b"content-type", b"text/plain"], [b"set-cookie", b"a=b"]],
                            "content": b"Not found", "more_content": True},
    "http_response_chunk": {"content": b"tail", "more_content": False},
    "http_disconnect": {"reply_channel": u"daphne.response.abc!def", "path": u"/x/"},
    "websocket_connect": {
        "reply_channel": u"daphne.response.abc!ws", "scheme": u"ws", "path": u"/chat/lobby/", "query_string": b"",
        "root_path": u"", "headers": [[b"origin", b"http://example.com"]], "client": [u"::1", 1234], "server": None,
        "order": 0,
    },
    "websocket_receive_text": {"reply_channel": u"daphne.response.abc!ws", "path": u"/chat/lobby/", "order": 1, "text": u"hi \u00a3"},
    "websocket_receive_bytes": {"reply_channel": u"daphne.response.abc!ws", "path": u"/chat/lobby/", "order": 2, "bytes": b"\x00\xff"},
    "websocket_disconnect": {"reply_channel": u"daphne.response.abc!ws", "code": 1001, "path": u"/chat/lobby/", "order": 3},
    "websocket_send_accept": {"accept": True},
    "websocket_send_text": {"text": u"hello"},
    "websocket_send_close": {"close": 4000},
}


def tag(value):
    if value is None:
        return {"n": None}
    if isinstance(value, bool):
        return {"t": value}
    if isinstance(value, int):
        return {"i": value}
    if isinstance(value, float):
        return {"d": value}
    if isinstance(value, str):
        return {"s": value}
    if isinstance(value, bytes):
        return {"b": binascii.hexlify(value).decode()}
    if isinstance(value, (list, tuple)):
        return {"a": [tag(v) for v in value]}
    if isinstance(value, dict):
        return {"m": {k: tag(v) for k, v in value.items()}}
    raise TypeError(type(value))


def emit(obj):
    print(json.dumps(obj, sort_keys=True, separators=(",", ":")))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--hosts", required=True)
    parser.add_argument("--prefix", default="asgi:")
    parser.add_argument("--capacity", type=int, default=100)
    parser.add_argument("--expiry", type=int, default=60)
    parser.add_argument("--keys", default="", help="symmetric_encryption_keys, comma-separated (needs cryptography)")
    parser.add_argument("command")
    parser.add_argument("args", nargs="*")
    opts = parser.parse_args()
    layer = RedisChannelLayer(
        hosts=opts.hosts.split(","),
        prefix=opts.prefix,
        stats_prefix=opts.prefix.rstrip(":") + "-meta:",
        capacity=opts.capacity,
        expiry=opts.expiry,
        symmetric_encryption_keys=[k for k in opts.keys.split(",") if k] or None,
    )
    cmd, args = opts.command, opts.args
    if cmd == "pack":
        print(binascii.hexlify(msgpack.packb(CASES[args[0]], use_bin_type=True)).decode())
    elif cmd == "pack_all":
        emit({name: binascii.hexlify(msgpack.packb(case, use_bin_type=True)).decode() for name, case in CASES.items()})
    elif cmd == "send":
        try:
            layer.send(args[1], dict(CASES[args[0]]))
            emit("ok")
        except layer.ChannelFull:
            emit("full")
    elif cmd == "fill":
        sent = 0
        try:
            for _ in range(int(args[1])):
                layer.send(args[0], dict(CASES["small"]))
                sent += 1
            emit({"sent": sent, "full": False})
        except layer.ChannelFull:
            emit({"sent": sent, "full": True})
    elif cmd == "receive":
        channels = args[0].split(",")
        for _ in range(10):
            channel, message = layer.receive(channels, block=True)
            if channel is not None:
                emit({"channel": channel, "message": tag(message)})
                return
        emit(None)
    elif cmd == "new_channel":
        emit(layer.new_channel(args[0]))
    elif cmd == "group_add":
        layer.group_add(args[0], args[1])
        emit("ok")
    elif cmd == "group_add_many":
        # group_add_many GROUP CHANNEL_PREFIX N: members CHANNEL_PREFIX + "m0" ... "m<N-1>"
        for i in range(int(args[2])):
            layer.group_add(args[0], "%sm%d" % (args[1], i))
        emit("ok")
    elif cmd == "receive_all":
        # receive_all CHANNEL N CASE: up to N messages (until 2 s pass with none); are they all CASE?
        channels, same = [], True
        while len(channels) < int(args[1]):
            channel, message = layer.receive([args[0]], block=True)
            if channel is None:
                break
            channels.append(channel)
            same = same and message == CASES[args[2]]
        emit({"channels": channels, "same": same})
    elif cmd == "group_channels":
        emit(sorted(layer.group_channels(args[0])))
    elif cmd == "send_group":
        layer.send_group(args[0], dict(CASES[args[1]]))
        emit("ok")
    elif cmd == "fernet_encrypt":
        # fernet_encrypt KEY HEX_PLAINTEXT UNIX_TIME HEX_IV: the token asgi_redis's key derivation
        # and cryptography's Fernet make of these exact parts.
        fernet = layer.make_fernet(args[0])
        emit(fernet._encrypt_from_parts(binascii.unhexlify(args[1]), int(args[2]), binascii.unhexlify(args[3])).decode())
    elif cmd == "fernet_decrypt":
        # fernet_decrypt KEY TOKEN TTL: the plaintext (hex), or "invalid".
        from cryptography.fernet import InvalidToken
        try:
            emit(binascii.hexlify(layer.make_fernet(args[0]).decrypt(args[1].encode(), int(args[2]))).decode())
        except InvalidToken:
            emit("invalid")
    elif cmd == "shard":
        emit([layer.consistent_hash(name) for name in args])
    elif cmd == "stats":
        emit({"global": layer.global_statistics(), "channel": layer.channel_statistics(args[0])})
    else:
        sys.exit("unknown command %s" % cmd)


if __name__ == "__main__":
    main()
