"""Small network helpers: free ports and port checks."""

import errno
import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port on ``host`` that is free right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    """Whether binding ``host:port`` fails because something already listens there."""
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError as e:
            return e.errno == errno.EADDRINUSE
    return False
