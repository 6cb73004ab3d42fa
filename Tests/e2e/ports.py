"""Free loopback ports for the processes a test starts (shared by the e2e and browser tests)."""
import socket


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port
