"""Backfill with a reservation, Slurm's: the first job in turn order that waits for its pool's capacity (a large
job behind a stream of small ones) gets a reservation, the time by which the running jobs it waits for end by
their ``max_runtime``; other jobs start in that pool only if they cannot delay it. Pure functions of the running
jobs, the pool's capacity and the clock (``tests/test_backfill.py``).

A job may start beside a reservation if it ends before the reserved start (``now + max_runtime <= start``) or
fits in what the pool has *spare* at the reserved start, beyond what the reserved job needs (jobs started this
way take from the spare). When a job the reservation waits for has no ``max_runtime``, the start cannot be
estimated and only the spare rule lets jobs through, so the reserved job is never delayed either way.
"""

from dataclasses import dataclass
from datetime import datetime, timedelta

from .executors.base import PoolCapacity
from .policy import CPU_SLACK

RESOURCES = ("gpus", "cpus", "memory")


@dataclass
class Reservation:
    """Pool capacity held for ``job_id`` from ``start`` (None: cannot be estimated); ``spare``: what the pool has
    beyond the job's needs at its start, per resource."""

    job_id: str
    pool: str
    start: datetime | None
    spare: dict[str, float]

    def admits(self, job, now: datetime, take: bool = True) -> bool:
        """Whether ``job`` may start now without delaying the reservation; if it fits only in the spare, it takes
        its share of it (``take``: a job that starts; not when only asking why a job waits)."""
        if self.start is not None and job.max_runtime and now + timedelta(seconds=job.max_runtime) <= self.start:
            return True
        if all(_amount(job, r) <= self.spare[r] + CPU_SLACK for r in RESOURCES):
            if take:
                for r in RESOURCES:
                    self.spare[r] -= _amount(job, r)
            return True
        return False

    def reason(self) -> str:
        when = (
            f"reserved from {self.start:%Y-%m-%d %H:%M:%S} UTC"
            if self.start
            else "its start cannot be estimated: a job it waits for has no max_runtime"
        )
        return (
            f"waiting: backfill: pool '{self.pool}' is reserved for job {self.job_id} ({when}); this job would "
            "delay it (give it a max_runtime that ends before)"
        )


def reserve(job, running: list, cap: PoolCapacity, now: datetime) -> Reservation | None:
    """The reservation of ``job`` in its pool, given the active jobs there (``running``: with ``started_at`` and
    ``max_runtime``), or None when the pool could never hold it."""
    need = {r: _amount(job, r) for r in RESOURCES}
    total = {"gpus": cap.gpus, "cpus": cap.cpus, "memory": cap.memory if cap.memory is not None else float("inf")}
    if any(need[r] > total[r] + CPU_SLACK for r in RESOURCES):
        return None
    holding = [r for r in running if r.pool == job.pool]
    free = {r: total[r] - sum(_amount(h, r) for h in holding) for r in RESOURCES}
    start: datetime | None = now
    by_end = sorted(holding, key=lambda h: (_end(h) is None, _end(h) or now, h.id))
    ended = 0
    while not all(need[r] <= free[r] + CPU_SLACK for r in RESOURCES):
        gone = by_end[ended]
        ended += 1
        for r in RESOURCES:
            free[r] += _amount(gone, r)
        end = _end(gone)
        start = None if start is None or end is None else max(start, end)
    return Reservation(job.id, job.pool, start, {r: free[r] - need[r] for r in RESOURCES})


def _end(row) -> datetime | None:
    """When an active job ends at the latest (its start plus ``max_runtime``), or None without one."""
    if row.max_runtime is None or row.started_at is None:
        return None
    return row.started_at + timedelta(seconds=row.max_runtime)


def _amount(job, resource: str) -> float:
    return getattr(job, resource) or 0
