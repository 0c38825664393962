"""Small network helpers: free ports, port checks, private unix sockets, the client address behind the hub's proxy."""

import errno
import functools
import ipaddress
import os
import random
import socket
import stat
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from .errors import ConfigError

LOWEST_PORT = 10000
SOCKET_PATH_MAX = 100  # sun_path holds 108 bytes
_given: set[int] = set()  # ports this process handed out: not handed out twice
CLAIMS = Path(tempfile.gettempdir()) / "gpulab-ports"  # and other processes' on this machine (one file per port)
CLAIM_SECONDS = 900  # how long a port handed out stays claimed: time enough for its process to bind it


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
        if not _claim(port):
            continue
        _given.add(port)
        return port
    with socket.socket() as sock:  # no room outside the ephemeral range
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _claim(port: int) -> bool:
    """Claim ``port`` among this machine's gpulab processes for :data:`CLAIM_SECONDS`; False if another process
    holds it. Two processes picking ports for services that bind them later (a test and the hub it starts, say)
    would otherwise now and then pick the same one. Where the claims directory cannot be used (not a directory
    of root or this account, or not writable), this process's own memory has to do."""
    try:
        CLAIMS.mkdir(exist_ok=True)
        fd = os.open(CLAIMS, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return True
    try:
        st = os.fstat(fd)
        if st.st_uid not in (0, os.geteuid()):
            return True
        if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) != 0o1777:
            os.fchmod(fd, 0o1777)  # every account's processes claim here; sticky: none removes another's claims
        name = str(port)
        for _ in range(2):
            try:
                os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=fd))  # follows no link
                return True
            except FileExistsError:
                if time.time() - os.stat(name, dir_fd=fd, follow_symlinks=False).st_mtime < CLAIM_SECONDS:
                    return False
                os.unlink(name, dir_fd=fd)  # expired (another account's cannot be removed: OSError below)
            except PermissionError:
                return True  # the directory is not writable for us: no shared claims
        return False
    except OSError:
        return False  # raced with another process over this port, or an old claim of another's: take another
    finally:
        os.close(fd)


def port_in_use(host: str, port: int) -> bool:
    """Whether binding ``host:port`` fails because something already listens there. With ``SO_REUSEADDR``, as the
    proxy and tornado bind: connections of a platform just stopped (TIME_WAIT) do not keep the next one out."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            return e.errno == errno.EADDRINUSE
    return False


def socket_path(path: Path, setting: str) -> Path:
    """``path``, refused (naming ``setting``) where it is too long for a unix socket."""
    if len(os.fsencode(path)) > SOCKET_PATH_MAX:
        raise ConfigError(
            f"{setting}: {path} is too long for a unix socket (at most {SOCKET_PATH_MAX} bytes); use a shorter data dir"
        )
    return path


def private_sockets(directory: Path, names: Iterable[str], setting: str) -> list[Path]:
    """Paths for the unix sockets ``names`` in ``directory``, a directory of this account's alone (made 0700,
    refused where another account owns it), with no stale socket left. Whatever mode a server gives its socket,
    only this account (and root) can connect to it: the way to keep a service that has no authentication of its
    own (MLflow, Triton) from every other local account, which a loopback port cannot."""
    paths = [socket_path(directory / name, setting) for name in names]
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = directory.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise ConfigError(f"{setting}: {directory} must be a directory of this service's account")
    directory.chmod(0o700)
    for path in paths:
        path.unlink(missing_ok=True)
    return paths


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
