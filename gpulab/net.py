"""Small network helpers: free ports, port checks, the client address behind the hub's proxy."""

import errno
import ipaddress
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


def client_ip(remote_ip: str, forwarded_for: str | None) -> str:
    """The address of the client behind a request that arrived from ``remote_ip``.

    From a local proxy (loopback: the hub's proxy, or a user's server forwarding), the last
    ``X-Forwarded-For`` entry, the address that proxy saw (earlier entries are the client's own
    and could be forged); otherwise, or if that entry is not an IP address, ``remote_ip``.
    """
    try:
        if not forwarded_for or not ipaddress.ip_address(remote_ip).is_loopback:
            return remote_ip
        hop = ipaddress.ip_address(forwarded_for.rsplit(",", 1)[-1].strip())
    except ValueError:
        return remote_ip
    return str(getattr(hop, "ipv4_mapped", None) or hop)
