"""Small network helpers: free ports, port checks, the client address behind the hub's proxy."""

import errno
import functools
import ipaddress
import random
import socket
from pathlib import Path

LOWEST_PORT = 10000
_given: set[int] = set()  # ports this process handed out: not handed out twice


@functools.cache
def _candidates() -> tuple[int, ...]:
    """Ports outside the range the kernel hands out for port-0 binds and outgoing connections."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return (*range(LOWEST_PORT, low), *range(high + 1, 65536))


def free_port(host: str = "127.0.0.1") -> int:
    """A port on ``host`` that is free right now, outside the kernel's ephemeral range: a port picked now and bound
    later by another process (a service the hub starts) is then not taken meanwhile by some process's port-0 bind
    or outgoing connection."""
    ports = _candidates()
    for port in random.sample(ports, min(len(ports), 200)):
        if port in _given:
            continue
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        _given.add(port)
        return port
    with socket.socket() as sock:  # no room outside the ephemeral range
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
