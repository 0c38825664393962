"""Limits that hold: a job attempt's ``cpus`` and ``memory`` and a user server's ``cpu_limit`` and
``mem_limit`` (and, for both, the GPU device nodes they may not open), enforced by a cgroup of their own,
else rlimits.

cgroup v2 (one unified tree) where ``/sys/fs/cgroup/cgroup.controllers`` exists, v1 (the ``cpu`` and
``memory`` hierarchies, and ``devices`` for the GPU device nodes a job was not given) otherwise; both are in
use on hosts today. v2 has no devices file: there the denied nodes are refused by an eBPF program attached to
the group (:mod:`gpulab.device_filter`). The group is ``gpulab/<name>`` in each: an attempt's is made and
removed by its supervisor (root), which outlives the job and so also sees whether the kernel's OOM killer
ended it; a server's by the hub's spawner. Where no cgroup can be written (not root, nothing mounted, a v2
controller a limit needs not available), memory is capped with ``RLIMIT_AS`` and CPUs with the CPU affinity
mask.
"""

import glob
import math
import os
import resource
import signal
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from . import device_filter

ROOT = Path("/sys/fs/cgroup")
PARENT = "gpulab"
CFS_PERIOD_US = 100_000
GPU_DEVICES = "/dev/nvidia*"  # NVIDIA's device nodes (nvidia<N>, nvidiactl, nvidia-uvm, ...)
MiB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    cpus: float | None = None
    memory: int | None = None  # bytes
    deny_devices: tuple = ()  # ("c" or "b", major, minor) the job may not open

    def controllers(self) -> set[str]:
        """The controllers these limits need (devices are not one on v2)."""
        return {name for name, limit in (("cpu", self.cpus), ("memory", self.memory)) if limit}

    def reason_exceeded(self) -> str:
        return f"memory limit ({self.memory // MiB} MiB) exceeded"


def version(root: Path = ROOT) -> int | None:
    """2 or 1 where this process may make cgroups under ``root``; None where it cannot. (On v2, whether the
    controllers a group's limits need are there is :meth:`Cgroup.create`'s to say.)"""
    if (root / "cgroup.controllers").exists():
        return 2 if os.access(root, os.W_OK) else None
    if all(os.access(root / c, os.W_OK) for c in ("cpu", "memory")):
        return 1
    return None


def gpu_devices_denied(pattern: str, gpu_ids: list[int]) -> tuple:
    """(kind, major, minor) of the device nodes matching ``pattern`` (``/dev/nvidia*``) a job with ``gpu_ids``
    may not open: the other GPUs' ``nvidia<N>``, and with no GPU every NVIDIA node (control, UVM, caps too)."""
    allowed = {f"nvidia{i}" for i in gpu_ids}
    caps = os.path.join(os.path.dirname(pattern), "nvidia-caps", "*")
    out = []
    for path in sorted(glob.glob(pattern)) + sorted(glob.glob(caps)):
        name = os.path.basename(path)
        try:
            st = os.stat(path)
        except OSError:
            continue
        if not (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            continue
        is_gpu = name.removeprefix("nvidia").isdigit()
        if (is_gpu and name not in allowed) or not gpu_ids:
            out.append(("c" if stat.S_ISCHR(st.st_mode) else "b", os.major(st.st_rdev), os.minor(st.st_rdev)))
    return tuple(out)


def group_name(ref: str) -> str:
    """The cgroup name of the attempt whose handle ref (``"<pid>:<start time>"``) is ``ref``."""
    return ref.replace(":", "-").replace(".", "_")


def own_groups() -> dict[str, str]:
    """This process's cgroup path per controller (``""``: the v2 tree), from ``/proc/self/cgroup``."""
    out = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            out[controller] = path
    return out


class Cgroup:
    """The cgroup(s) of one attempt or server, ``gpulab/<name>`` below the calling process's own group in each
    hierarchy (so they stay inside whatever envelope a container or systemd gave the platform)."""

    def __init__(self, name: str, limits: Limits, root: Path = ROOT):
        self.limits = limits
        self.version = version(root)
        own = own_groups() if self.version else {}
        if self.version == 2:
            self._v2_parent = root / own.get("", "/").lstrip("/") / PARENT
            self.dirs = dict.fromkeys(("cpu", "memory", "devices"), self._v2_parent / name)
        elif self.version == 1:
            controllers = ("cpu", "memory", "devices") if os.access(root / "devices", os.W_OK) else ("cpu", "memory")
            self.dirs = {c: root / c / own.get(c, "/").lstrip("/") / PARENT / name for c in controllers}
        else:
            self.dirs = {}

    def create(self) -> None:
        """Make the group(s) and write the limits; without cgroups, nothing (rlimits apply in the child)."""
        if self.version == 2:
            _enable(self._v2_parent, self.limits.controllers())
        for d in set(self.dirs.values()):
            d.mkdir(parents=True, exist_ok=True)
        cpu, memory = self.dirs.get("cpu"), self.dirs.get("memory")
        if self.limits.cpus and cpu:
            quota = max(1000, int(self.limits.cpus * CFS_PERIOD_US))
            if self.version == 2:
                (cpu / "cpu.max").write_text(f"{quota} {CFS_PERIOD_US}")
            else:
                (cpu / "cpu.cfs_period_us").write_text(str(CFS_PERIOD_US))
                (cpu / "cpu.cfs_quota_us").write_text(str(quota))
        if self.limits.memory and memory:
            if self.version == 2:
                (memory / "memory.max").write_text(str(self.limits.memory))
                _write_if_present(memory / "memory.swap.max", "0")
            else:
                (memory / "memory.limit_in_bytes").write_text(str(self.limits.memory))
                _write_if_present(memory / "memory.memsw.limit_in_bytes", str(self.limits.memory))
        if (devices := self.dirs.get("devices")) and self.version == 2:
            if self.limits.deny_devices:
                device_filter.deny_devices(devices, self.limits.deny_devices)
        elif devices:
            for kind, major, minor in self.limits.deny_devices:
                (devices / "devices.deny").write_text(f"{kind} {major}:{minor} rwm")

    def create_or_fall_back(self) -> OSError | None:
        """:meth:`create`, or where the group(s) cannot be made, the rlimit fallback; returns the error, for the
        caller to report."""
        try:
            self.create()
        except OSError as e:
            self.dirs = {}
            return e
        return None

    def enter(self) -> None:
        """Put the calling process in the group(s), or apply the rlimit fallback (call it in the child, as root,
        before it drops to the job's account)."""
        if not self.dirs:
            if self.limits.memory:
                resource.setrlimit(resource.RLIMIT_AS, (self.limits.memory, self.limits.memory))
            if self.limits.cpus:
                cpus = sorted(os.sched_getaffinity(0))[: max(1, math.ceil(self.limits.cpus))]
                os.sched_setaffinity(0, cpus)
            return
        for d in set(self.dirs.values()):
            (d / "cgroup.procs").write_text(str(os.getpid()))

    def oom_killed(self) -> bool:
        """Whether the kernel's OOM killer killed a process of the group for its memory limit."""
        memory = self.dirs.get("memory")
        if memory is None or not self.limits.memory:
            return False
        events = memory / ("memory.events" if self.version == 2 else "memory.oom_control")
        try:
            fields = dict(line.split() for line in events.read_text().splitlines() if len(line.split()) == 2)
        except OSError:
            return False
        if "oom_kill" in fields:
            return int(fields["oom_kill"]) > 0
        try:  # v1 kernels before 4.13 count no kills: the limit was hit
            return int((memory / "memory.failcnt").read_text()) > 0
        except (OSError, ValueError):
            return False

    def remove(self) -> None:
        """Kill what is left in the group(s) (by PID) and remove them."""
        for d in set(self.dirs.values()):
            for _ in range(50):
                try:
                    pids = [int(p) for p in (d / "cgroup.procs").read_text().split()]
                except FileNotFoundError:
                    break
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:  # busy until the killed processes are gone
                    time.sleep(0.1)


def _enable(parent: Path, controllers: set[str]) -> None:
    """v2: ``controllers`` for ``parent``'s children (its own parent enables them for it).

    A controller the tree does not offer (bound to a v1 hierarchy, or not delegated), or a supervisor whose
    own group holds processes (v2 allows no internal processes): OSError, and the caller falls back to
    rlimits."""
    offered = set((parent.parent / "cgroup.controllers").read_text().split())
    if absent := controllers - offered:
        raise OSError(f"cgroup v2 controller {', '.join(sorted(absent))} not available in {parent.parent}")
    for level in (parent.parent, parent):
        level.mkdir(exist_ok=True)
        enabled = set((level / "cgroup.subtree_control").read_text().split())
        missing = controllers - enabled
        if missing:
            (level / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in sorted(missing)))


def _write_if_present(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError:
        pass  # swap accounting off: memory alone is limited
