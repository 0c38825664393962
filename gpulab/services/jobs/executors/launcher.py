"""What starting jobs needs root for, kept apart from the job service.

Under isolation 'accounts' the job service starts as root, starts this launcher
(``python -I -m gpulab.services.jobs.executors.launcher``) on one end of a socket pair and becomes the
service account (``Platform.service_account``) before it opens a database or serves a request
(:func:`split_privileges`). The launcher keeps root for three requests, each checked, so that whoever
takes over the job service gets its account and what its API grants, not root:

- **start** an attempt's supervisor (:mod:`.supervisor`, which makes the attempt's cgroup and becomes the
  owner's account). The account is made on first use and is always a user's (:func:`gpulab.accounts.ensure`
  refuses root and the service account). The work dir and the source file arrive as file descriptors the
  service opened, and must be the service account's (or already the owner's): root is never handed a path,
  so it follows no link the service could plant;
- **signal** an attempt's process group: one led by a supervisor with that ref, or, its leader gone, one
  with no root process in it;
- **remove** an attempt's cgroup, named from its ref.

It also tells the exit status of a supervisor it started that ended without writing one (killed).
Without isolation 'accounts' the local executor uses a :class:`Launcher` in its own process, the same code.
The launcher stops when the job service's end of the socket closes (and with SIGTERM when the service dies).

Messages are a 4-byte length and JSON, with any file descriptors (``SCM_RIGHTS``) on the first bytes; one
request at a time.
"""

import ctypes
import json
import os
import re
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading

import psutil

from gpulab import accounts, cgroups

from . import supervisor

REF = re.compile(r"^[1-9][0-9]{0,9}:[0-9]{1,12}\.[0-9]{2}$")  # "<pid>:<start time>", as ref_of() writes it
MAX_MESSAGE = 64 * 2**20
PR_SET_PDEATHSIG = 1


class LaunchError(Exception):
    """The launcher refused or could not do a request; the message says why."""


def ref_of(proc: psutil.Process) -> str:
    """A process's ``<pid>:<start time>``: a recycled pid is never taken for it."""
    return f"{proc.pid}:{proc.create_time():.2f}"


def _check_ref(ref: str) -> int:
    if not isinstance(ref, str) or not REF.match(ref):
        raise LaunchError(f"not an attempt's ref: {ref!r}")
    return int(ref.split(":")[0])


class Launcher:
    """Starts supervisors, signals their groups, removes their cgroups (here, or in the root launcher).

    ``policy``: jobs run as their owners' accounts (isolation 'accounts'); ``service_uid``: the job service's
    account, whose files (and the owner's) are the only ones handed over to an owner."""

    def __init__(self, state_dir: str, policy: accounts.AccountPolicy | None = None, service_uid: int | None = None):
        self.state_dir = state_dir
        self.policy = policy
        self.service_uid = os.geteuid() if service_uid is None else service_uid
        self._exited: dict[str, int] = {}  # supervisors that ended, by ref, until asked
        self._lock = threading.Lock()

    def start(self, request: dict, log_fd: int, work_fd: int | None = None, source_fd: int | None = None) -> str:
        """A supervisor for ``request`` (``owner``, ``argv``, ``cwd``, ``env``, ``cpus``, ``memory``,
        ``deny_devices``), writing to ``log_fd``; returns its ref."""
        env = dict(request["env"])
        spec = {
            "cpus": request.get("cpus"),
            "memory": request.get("memory"),
            "deny_devices": request.get("deny_devices", []),
        }
        cwd = request["cwd"]  # a missing one fails the start here; as the account, the job enters it itself
        if self.policy is not None:
            spec["cwd"], cwd = cwd, "/"
            known = accounts.lookup(self.policy, request["owner"])
            given = [(fd, directory) for fd, directory in ((work_fd, True), (source_fd, False)) if fd is not None]
            for fd, directory in given:  # before an account is made for the request
                self._check(fd, directory, known.uid if known else None)
            account = known or accounts.ensure(self.policy, request["owner"])
            for fd, directory in given:
                os.fchown(fd, account.uid if directory else -1, account.gid)
                os.fchmod(fd, 0o700 if directory else 0o640)
            env.update(account.env())
            spec["account"] = {"uid": account.uid, "gid": account.gid, "groups": list(account.groups)}
        argv = [sys.executable, "-I", "-m", supervisor.__name__, self.state_dir, json.dumps(spec), *request["argv"]]
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_fd,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        ref = ref_of(psutil.Process(proc.pid))
        threading.Thread(target=self._reap, args=(proc, ref), daemon=True).start()
        return ref

    def _reap(self, proc: subprocess.Popen, ref: str) -> None:
        rc = proc.wait()
        with self._lock:
            self._exited[ref] = rc

    def _check(self, fd: int, directory: bool, owner_uid: int | None) -> None:
        """The job's work dir (a directory) or source (a file with no other link) must be the job service's, or
        the owner's already: given to the owner (the work dir 0700, the source 0640 to its group), nothing else
        of root's or another account's can be."""
        st = os.fstat(fd)
        kind = stat.S_ISDIR(st.st_mode) if directory else stat.S_ISREG(st.st_mode) and st.st_nlink == 1
        if not kind or st.st_uid not in (self.service_uid, owner_uid):
            raise LaunchError(
                f"the job's {'work dir' if directory else 'source'} is not a "
                f"{'directory' if directory else 'file'} of the job service's account"
            )

    def signal(self, ref: str, sig: int) -> bool:
        """Send ``sig`` to the attempt's process group; False when the group is gone."""
        pgid = _check_ref(ref)
        try:
            leader = psutil.Process(pgid)
            if ref_of(leader) != ref:
                return False  # the pid was recycled, so no group with that id is left
            command = leader.cmdline()
        except psutil.Error:  # gone, or a zombie
            command = None
        if command is not None:
            if supervisor.__name__ not in command:
                raise LaunchError(f"process {pgid} is not an attempt's supervisor")
        elif any(uid == 0 for uid in _group_uids(pgid)):
            raise LaunchError(f"process group {pgid} has a root process and no attempt's supervisor")
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return False
        return True

    def remove_cgroup(self, ref: str) -> None:
        _check_ref(ref)
        cgroups.Cgroup(cgroups.group_name(ref), cgroups.Limits()).remove()

    def returncode(self, ref: str) -> int | None:
        """The exit status of the supervisor ``ref`` once it ended (asked once), else None."""
        with self._lock:
            return self._exited.pop(ref, None)


def _group_uids(pgid: int) -> set[int]:
    uids = set()
    for proc in psutil.process_iter(["uids", "status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                uids.add(proc.info["uids"].real)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return uids


def _send(sock: socket.socket, message: dict, fds: list[int] = ()) -> None:
    data = json.dumps(message).encode()
    data = struct.pack("!I", len(data)) + data
    sent = socket.send_fds(sock, [data], list(fds)) if fds else sock.send(data)
    if sent < len(data):
        sock.sendall(data[sent:])


def _receive(sock: socket.socket, max_fds: int = 0) -> tuple[dict | None, list[int]]:
    """A message and its file descriptors; (None, []) when the other end closed."""
    header, fds, _, _ = socket.recv_fds(sock, 4, max_fds) if max_fds else (sock.recv(4), [], 0, None)
    while header and len(header) < 4:
        header += sock.recv(4 - len(header))
    if len(header) < 4:
        return None, fds
    size = struct.unpack("!I", header)[0]
    if size > MAX_MESSAGE:
        raise LaunchError(f"a message of {size} bytes (at most {MAX_MESSAGE})")
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            return None, fds
        data += chunk
    return json.loads(data), fds


class LauncherClient:
    """The job service's side of the root launcher: :class:`Launcher`'s methods, asked over the socket.
    Blocking, one request at a time: call it from a thread in async code."""

    def __init__(self, sock: socket.socket, proc: subprocess.Popen, state_dir: str):
        self.sock, self.proc, self.state_dir = sock, proc, state_dir
        self._lock = threading.Lock()

    def _ask(self, op: str, args: dict, fds: list[int] = ()):
        with self._lock:
            _send(self.sock, {"op": op, **args}, fds)
            answer, _ = _receive(self.sock)
        if answer is None:
            raise LaunchError(f"the job launcher (pid {self.proc.pid}) is gone")
        if "error" in answer:
            raise LaunchError(answer["error"])
        return answer["result"]

    def start(self, request: dict, log_fd: int, work_fd: int | None = None, source_fd: int | None = None) -> str:
        fds = [log_fd, *(fd for fd in (work_fd, source_fd) if fd is not None)]
        return self._ask(
            "start", {"request": request, "work": work_fd is not None, "source": source_fd is not None}, fds
        )

    def signal(self, ref: str, sig: int) -> bool:
        return self._ask("signal", {"ref": ref, "sig": int(sig)})

    def remove_cgroup(self, ref: str) -> None:
        self._ask("remove_cgroup", {"ref": ref})

    def returncode(self, ref: str) -> int | None:
        return self._ask("returncode", {"ref": ref})

    def close(self) -> None:
        """The launcher stops once its end of the socket closes."""
        self.sock.close()
        self.proc.wait()


def serve(sock: socket.socket, launcher: Launcher) -> None:
    """Answer requests until the other end closes."""
    while True:
        message, fds = _receive(sock, max_fds=3)
        if message is None:
            return
        try:
            op = message.get("op")
            if op == "start":
                log_fd, rest = fds[0], iter(fds[1:])
                work_fd = next(rest) if message.get("work") else None
                source_fd = next(rest) if message.get("source") else None
                result = launcher.start(message["request"], log_fd, work_fd, source_fd)
            elif op == "signal":
                result = launcher.signal(message["ref"], signal.Signals(message["sig"]))
            elif op == "remove_cgroup":
                result = launcher.remove_cgroup(message["ref"])
            elif op == "returncode":
                result = launcher.returncode(message["ref"])
            else:
                raise LaunchError(f"no such request: {op!r}")
            answer = {"result": result}
        except (
            LaunchError,
            accounts.AccountError,
            OSError,
            psutil.Error,
            KeyError,
            ValueError,
            StopIteration,
            TypeError,
        ) as e:
            answer = {"error": str(e) or type(e).__name__}
        finally:
            for fd in fds:
                os.close(fd)
        _send(sock, answer)


def split_privileges(state_dir: str, policy: accounts.AccountPolicy, service: accounts.Account) -> LauncherClient:
    """Start the root launcher, then become ``service`` for good (uid, gid, groups, its login variables)."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    config = {"state_dir": state_dir, "service_uid": service.uid, "fd": theirs.fileno(), "policy": vars(policy)}
    # none of the service's environment (its hub token, the NRAS key): the launcher needs none of it
    proc = subprocess.Popen(
        [sys.executable, "-I", "-m", __name__, json.dumps(config)],
        pass_fds=[theirs.fileno()],
        env={"PATH": os.environ.get("PATH", os.defpath)},
        stdin=subprocess.DEVNULL,
        preexec_fn=_die_with_parent,
    )  # noqa: PLW1509 (no threads yet)
    theirs.close()
    os.setgroups([service.gid, *service.groups])
    os.setgid(service.gid)
    os.setuid(service.uid)
    os.environ.update(service.env())
    return LauncherClient(mine, proc, state_dir)


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def main(argv: list[str]) -> int:
    config = json.loads(argv[0])
    sock = socket.socket(fileno=config["fd"])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a ^C to gpulab up reaches the service, which closes the socket
    policy = accounts.AccountPolicy(**config["policy"])
    serve(sock, Launcher(config["state_dir"], policy, config["service_uid"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
