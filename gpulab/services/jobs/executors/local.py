"""Run attempts as local subprocesses, each in its own session (process group).

Each attempt runs under a small supervisor (the group leader, :mod:`.supervisor`) that
enforces the attempt's ``cpus`` and ``memory`` (a cgroup), waits for the job and writes its exit
status to ``<state_dir>/<pid>-<start time>.exit``, so the outcome is known even when the
attempt ends while the service is down (it is then no longer the service's child). The
handle's ref is ``"<pid>:<start time>"``, so a recycled pid is never taken for the attempt.

With isolation 'accounts' the supervisor keeps the service's account (the job cannot signal
it or write the state dir) and starts the job as its owner's system account
(:mod:`gpulab.accounts`), with a work dir owned by that account.
"""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import psutil
from traitlets import Float, Integer, Unicode, default

from gpulab import accounts, cgroups
from gpulab.config import default_data_dir
from gpulab.gpus import list_gpus

from . import supervisor
from .base import Executor, Handle, Launch, Outcome, PoolCapacity


def handle_file(log_path: Path) -> Path:
    """Where an executor records an attempt's handle before ``start`` returns (next to its log).

    The queue re-attaches a ``dispatching`` job from it after a restart instead of starting
    the attempt twice.
    """
    return log_path.with_suffix(".handle")


def _ref(proc: psutil.Process) -> str:
    return f"{proc.pid}:{proc.create_time():.2f}"


def _alive(ref: str) -> bool:
    """Whether the process named by ``ref`` still runs (a zombie does not)."""
    try:
        proc = psutil.Process(int(ref.split(":")[0]))
        return _ref(proc) == ref and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _group_alive(pgid: int) -> bool:
    """Whether any non-zombie process is left in process group ``pgid``."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
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
    gpus = Integer(
        None, allow_none=True, help="GPUs to offer (default: counted with NVML or nvidia-smi, else 0)."
    ).tag(config=True)
    cpus = Float(help="CPUs to offer (default: os.cpu_count()).").tag(config=True)
    state_dir = Unicode(
        help="Directory for the attempts' exit-status files (default <data_dir>/jobs/.local-executor)."
    ).tag(config=True)
    gpu_devices = Unicode(
        cgroups.GPU_DEVICES, help="GPU device nodes: a job may open only its own GPUs' (none without GPUs), where the "
        "devices cgroup exists (v1)."
    ).tag(config=True)
    node_name = Unicode(
        help="This machine's node name for attestation gating (default: its hostname)."
    ).tag(config=True)

    @default("cpus")
    def _default_cpus(self):
        return float(os.cpu_count() or 1)

    @default("node_name")
    def _default_node_name(self):
        return socket.gethostname()

    @default("state_dir")
    def _default_state_dir(self):
        data_dir = getattr(self.parent, "data_dir", "") or default_data_dir()
        return str(Path(data_dir) / "jobs" / ".local-executor")

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._procs: dict[str, subprocess.Popen] = {}  # ref -> our child, to reap it
        self._gpus: int | None = None
        # isolation 'accounts': jobs run as their owner's account (set by the job service from Platform)
        self.account_policy: accounts.AccountPolicy | None = None

    async def capacity(self) -> dict[str, PoolCapacity]:
        if self._gpus is None:
            self._gpus = self.gpus if self.gpus is not None else len(await asyncio.to_thread(list_gpus))
        return {self.pool: PoolCapacity(self._gpus, self.cpus, psutil.virtual_memory().total)}

    async def start(self, launch: Launch) -> Handle:
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        env = {**launch.env, "CUDA_VISIBLE_DEVICES": ",".join(map(str, launch.gpu_ids))}
        spec = {"cpus": launch.cpus, "memory": launch.memory,
                "deny_devices": cgroups.gpu_devices_denied(self.gpu_devices, launch.gpu_ids)}
        if self.account_policy is not None:
            account = await asyncio.to_thread(self._prepare, launch)
            env.update(account.env())
            spec.update(cwd=launch.working_dir, account={"uid": account.uid, "gid": account.gid,
                                                         "groups": list(account.groups)})
        argv = [sys.executable, "-I", "-m", supervisor.__name__, self.state_dir, json.dumps(spec), *launch.argv]
        with open(launch.log_path, "ab") as log:
            proc = subprocess.Popen(
                argv,
                cwd=launch.working_dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        ref = _ref(psutil.Process(proc.pid))
        self._procs[ref] = proc
        handle = Handle(executor=self.name, ref=ref, gpu_ids=list(launch.gpu_ids))
        handle_file(launch.log_path).write_text(json.dumps(asdict(handle)))
        return handle

    def _prepare(self, launch: Launch) -> accounts.Account:
        """The owner's account (made on first use), given the job's work dir and read access to its source."""
        account = accounts.ensure(self.account_policy, launch.owner)
        if launch.work_dir is not None:
            fd = os.open(launch.work_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)  # never a link planted there
            try:
                os.fchown(fd, account.uid, account.gid)
                os.fchmod(fd, 0o700)
            finally:
                os.close(fd)
        if launch.source is not None:
            os.chown(launch.source, 0, account.gid, follow_symlinks=False)  # in the service's own dir
            os.chmod(launch.source, 0o640)
        return account

    async def _remove_cgroup(self, ref: str) -> None:
        """The supervisor removes its cgroup; one killed before it could (SIGKILL to the group) leaves it to us."""
        await asyncio.to_thread(cgroups.Cgroup(cgroups.group_name(ref), cgroups.Limits()).remove)

    def _exit_file(self, ref: str) -> Path:
        return Path(self.state_dir) / f"{ref.replace(':', '-')}.exit"

    async def poll(self, handle: Handle) -> Outcome:
        proc = self._procs.get(handle.ref)
        running = proc.poll() is None if proc is not None else _alive(handle.ref)
        if running:
            return Outcome("running")
        self._procs.pop(handle.ref, None)
        await self._remove_cgroup(handle.ref)
        reason = ""
        try:
            rc, _, reason = self._exit_file(handle.ref).read_text().partition("\n")
            rc, reason = int(rc), reason.strip()
        except FileNotFoundError:
            rc = None if proc is None else proc.returncode  # the supervisor itself was killed
        if rc is None:
            return Outcome("lost", reason="process gone", retryable=True)
        return Outcome("succeeded" if rc == 0 else "failed", exit_code=rc, reason=reason or _describe(rc))

    async def cancel(self, handle: Handle, grace: float) -> None:
        pid = int(handle.ref.split(":")[0])
        try:
            if _ref(psutil.Process(pid)) != handle.ref:
                return  # pid recycled: our group (whose id is that pid) is gone
        except psutil.NoSuchProcess:
            pass  # leader gone; members may remain, and the group id is not reused while they do
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                break
            if await self._wait_group(pid, handle.ref, wait):
                break
        else:
            self.log.warning("process group %d survived SIGKILL", pid)
        await self._remove_cgroup(handle.ref)

    async def _wait_group(self, pgid: int, ref: str, timeout: float) -> bool:
        """Wait until process group ``pgid`` is gone (reaping our child); False on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            if (proc := self._procs.get(ref)) is not None:
                proc.poll()
            if not _group_alive(pgid):
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)

