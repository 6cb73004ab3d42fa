"""Free loopback ports for the processes a test starts, and a plain HTTP request to them (shared
by the e2e and browser tests; importing it has no side effects)."""
import http.client
import socket


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def get(port, path, method="GET", body=None, headers=None):
    """One request to 127.0.0.1:port on a connection of its own; (status, body bytes)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, data
