"""What the job queue needs from an executor."""

from dataclasses import dataclass, field
from pathlib import Path

from traitlets.config import LoggingConfigurable


@dataclass
class PoolCapacity:
    """Total resources a pool offers (free = total minus what the queue has dispatched)."""

    gpus: int
    cpus: float
    memory: int | None = None  # bytes; None = not limited
    draining: bool = False  # an admin drains it: nothing new starts there (the queue sets it, not the executor)


@dataclass
class Launch:
    """One dispatched attempt of a job, as the queue hands it to an executor."""

    job_id: str
    attempt: int
    owner: str
    argv: list[str]
    working_dir: str
    env: dict[str, str]
    gpus: int
    cpus: float
    memory: int | None
    pool: str
    log_path: Path  # the attempt's log file, in the job's directory
    gpu_ids: list[int] = field(default_factory=list)  # chosen by the queue where the executor owns GPUs
    work_dir: Path | None = None  # the job's own directory (GPULAB_JOB_DIR), to be owned by the job's account
    source: Path | None = None  # a cell job's source file, which the job's account must be able to read


@dataclass
class Handle:
    """How to find a running attempt again, also after a service restart (stored with the job)."""

    executor: str
    ref: str  # local: "<pid>:<process start time>"; ray: the submission id
    gpu_ids: list[int] = field(default_factory=list)


@dataclass
class Outcome:
    """Where an attempt stands."""

    state: str  # "starting" (accepted, not running yet) | "running" | "succeeded" | "failed" | "lost"
    exit_code: int | None = None
    reason: str = ""
    retryable: bool = False  # a failure of the platform (node lost, executor error), not of the job's code


def read_range(path: Path, offset: int, limit: int) -> bytes | None:
    """Up to ``limit`` bytes of ``path`` from ``offset``; None when the file does not exist."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(limit)
    except FileNotFoundError:
        return None


class ExecutorUnavailable(Exception):
    """The executor's backend cannot be reached; the queue keeps jobs queued and shows this message."""


class Executor(LoggingConfigurable):
    """Base class; subclasses are chosen by ``c.JobQueue.executor_class``."""

    name = "base"
    owns_gpu_ids = False  # True: the queue picks GPU ids (local); False: the backend does (Ray)
    start_pending = False  # True: start() returns once the backend accepted the attempt; poll() says when it runs
    # False where others may read an attempt's environment (Ray shows runtime_env on its dashboard): the queue
    # then gives the attempt a one-time ticket instead of its secrets, which the runner claims at start
    env_is_private = True
    node_name: str | None = None  # the node jobs run on, for attestation gating; None: not known (no gating)

    async def capacity(self) -> dict[str, PoolCapacity]:
        """Capacity per pool name."""
        raise NotImplementedError

    async def start(self, launch: Launch) -> Handle:
        """Start the attempt; return as soon as it is running, or accepted where ``start_pending``
        (or raise ExecutorUnavailable)."""
        raise NotImplementedError

    async def poll(self, handle: Handle) -> Outcome:
        """Current state of a started attempt (``lost`` if the executor no longer knows it)."""
        raise NotImplementedError

    async def cancel(self, handle: Handle, grace: float) -> None:
        """Stop it: SIGTERM (or equivalent), then kill after ``grace`` seconds."""
        raise NotImplementedError

    async def read_logs(self, handle: Handle, log_path: Path, offset: int, limit: int) -> bytes:
        """Up to ``limit`` bytes of the attempt's log from ``offset``: from ``log_path``, where the attempt
        writes it (or :meth:`save_logs` copied it); executors that keep logs elsewhere extend this."""
        data = read_range(log_path, offset, limit)
        return b"" if data is None else data

    async def save_logs(self, handle: Handle, log_path: Path) -> None:
        """Copy an ended attempt's log into ``log_path`` where the backend keeps it elsewhere (local: no-op)."""

    async def close(self) -> None:
        """Release connections; running attempts keep running."""
