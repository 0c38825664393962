"""Run attempts as local subprocesses, each in its own session (process group).

Each attempt runs under a small supervisor (the group leader, :mod:`.supervisor`) that
enforces the attempt's ``cpus`` and ``memory`` (a cgroup), waits for the job and writes its exit
status to ``<state_dir>/<pid>-<start time>.exit``, so the outcome is known even when the
attempt ends while the service is down. The handle's ref is ``"<pid>:<start time>"``, so a
recycled pid is never taken for the attempt.

Supervisors are started, signalled and cleaned up by a :mod:`.launcher`: with isolation 'accounts'
the root launcher the job service split off (:func:`.launcher.split_privileges`), whose supervisors
stay root (the job cannot signal them or write the state dir) and start each job as its owner's
system account (:mod:`gpulab.accounts`), with a work dir owned by that account; otherwise one in
this process.
"""

import asyncio
import json
import os
import signal
import socket
import time
from dataclasses import asdict
from pathlib import Path

import psutil
from traitlets import Float, Integer, Unicode, default

from gpulab import cgroups
from gpulab.data_dir import configured_data_dir
from gpulab.gpus import list_gpus

from .base import Executor, Handle, Launch, Outcome, PoolCapacity
from .launcher import Launcher, LauncherClient, ref_of


def handle_file(log_path: Path) -> Path:
    """Where an executor records an attempt's handle before ``start`` returns (next to its log).

    The queue re-attaches a ``dispatching`` job from it after a restart instead of starting
    the attempt twice.
    """
    return log_path.with_suffix(".handle")


def _alive(ref: str) -> bool:
    """Whether the process named by ``ref`` still runs (a zombie does not)."""
    try:
        proc = psutil.Process(int(ref.split(":")[0]))
        return ref_of(proc) == ref and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _group_alive(pgid: int) -> bool:
    """Whether any non-zombie process is left in process group ``pgid`` (of any account)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # there, of another account
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return False


def _describe(rc: int) -> str:
    return f"killed by signal {signal.Signals(-rc).name}" if rc < 0 else f"exit code {rc}"


class LocalExecutor(Executor):
    """Subprocesses on this machine: one pool, GPUs assigned by the queue via ``CUDA_VISIBLE_DEVICES``."""

    name = "local"
    owns_gpu_ids = True

    pool = Unicode("default", help="Name of the one pool this machine forms.").tag(config=True)
    gpus = Integer(None, allow_none=True, help="GPUs to offer (default: counted with NVML or nvidia-smi, else 0).").tag(
        config=True
    )
    cpus = Float(help="CPUs to offer (default: os.cpu_count()).").tag(config=True)
    state_dir = Unicode(
        help="Directory for the attempts' exit-status files (default <data_dir>/jobs/.local-executor)."
    ).tag(config=True)
    gpu_devices = Unicode(
        cgroups.GPU_DEVICES,
        help="GPU device nodes: a job may open only its own GPUs' (none without GPUs), where the "
        "cgroup can be made (v1's devices controller, an eBPF device program on v2).",
    ).tag(config=True)
    node_name = Unicode(help="This machine's node name for attestation gating (default: its hostname).").tag(
        config=True
    )

    @default("cpus")
    def _default_cpus(self):
        return float(os.cpu_count() or 1)

    @default("node_name")
    def _default_node_name(self):
        return socket.gethostname()

    @default("state_dir")
    def _default_state_dir(self):
        data_dir = getattr(self.parent, "data_dir", "") or configured_data_dir(self.config)
        return str(Path(data_dir) / "jobs" / ".local-executor")

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._gpus: int | None = None
        self._launcher: Launcher | LauncherClient | None = None

    @property
    def launcher(self) -> Launcher | LauncherClient:
        """Who starts the supervisors: the root launcher where the job service split one off, else this process."""
        if self._launcher is None:
            self._launcher = Launcher(self.state_dir)
        return self._launcher

    @launcher.setter
    def launcher(self, launcher: LauncherClient) -> None:
        self._launcher = launcher
        self.state_dir = launcher.state_dir

    async def capacity(self) -> dict[str, PoolCapacity]:
        if self._gpus is None:
            self._gpus = self.gpus if self.gpus is not None else len(await asyncio.to_thread(list_gpus))
        return {self.pool: PoolCapacity(self._gpus, self.cpus, psutil.virtual_memory().total)}

    async def start(self, launch: Launch) -> Handle:
        request = {
            "owner": launch.owner,
            "argv": launch.argv,
            "cwd": launch.working_dir,
            "env": {**launch.env, "CUDA_VISIBLE_DEVICES": ",".join(map(str, launch.gpu_ids))},
            "cpus": launch.cpus,
            "memory": launch.memory,
            "deny_devices": cgroups.gpu_devices_denied(self.gpu_devices, launch.gpu_ids),
        }
        ref = await asyncio.to_thread(self._start, launch, request)
        handle = Handle(executor=self.name, ref=ref, gpu_ids=list(launch.gpu_ids))
        handle_file(launch.log_path).write_text(json.dumps(asdict(handle)))
        return handle

    def _start(self, launch: Launch, request: dict) -> str:
        """The launcher starts the supervisor with the log, and the work dir and source to hand to the job's
        account, opened here without following links (a work dir an earlier attempt handed over stays as it is)."""
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        fds = [os.open(launch.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)]
        try:
            work = source = None
            if launch.work_dir is not None and os.lstat(launch.work_dir).st_uid == os.geteuid():
                work = os.open(launch.work_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
                fds.append(work)
            if launch.source is not None:
                source = os.open(launch.source, os.O_RDONLY | os.O_NOFOLLOW)
                fds.append(source)
            return self.launcher.start(request, fds[0], work, source)
        finally:
            for fd in fds:
                os.close(fd)

    async def _remove_cgroup(self, ref: str) -> None:
        """The supervisor removes its cgroup; one killed before it could (SIGKILL to the group) leaves it to us."""
        await asyncio.to_thread(self.launcher.remove_cgroup, ref)

    def _exit_file(self, ref: str) -> Path:
        return Path(self.state_dir) / f"{ref.replace(':', '-')}.exit"

    async def poll(self, handle: Handle) -> Outcome:
        if _alive(handle.ref):
            return Outcome("running")
        await self._remove_cgroup(handle.ref)
        reason = ""
        try:
            rc, _, reason = self._exit_file(handle.ref).read_text().partition("\n")
            rc, reason = int(rc), reason.strip()
        except FileNotFoundError:  # the supervisor itself was killed: its status, if the launcher started it
            rc = await asyncio.to_thread(self.launcher.returncode, handle.ref)
        if rc is None:
            return Outcome("lost", reason="process gone", retryable=True)
        return Outcome("succeeded" if rc == 0 else "failed", exit_code=rc, reason=reason or _describe(rc))

    async def cancel(self, handle: Handle, grace: float) -> None:
        pid = int(handle.ref.split(":")[0])
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            # a recycled leader pid means the group is gone; with the leader gone, members may remain, and the
            # group id is not reused while they do
            if not await asyncio.to_thread(self.launcher.signal, handle.ref, sig):
                break
            if await self._wait_group(pid, wait):
                break
        else:
            self.log.warning("process group %d survived SIGKILL", pid)
        await self._remove_cgroup(handle.ref)

    async def _wait_group(self, pgid: int, timeout: float) -> bool:
        """Wait until process group ``pgid`` is gone; False on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            if not await asyncio.to_thread(_group_alive, pgid):
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
