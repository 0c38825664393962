"""Backfill with a reservation, Slurm's: the job that has waited longest for its pool's capacity, or for its cohort's
quota (a large job behind a stream of small ones), gets a reservation there: the time by which the running jobs
it waits for end, by their ``max_runtime``. Other jobs start in that pool (or cohort) only if they
cannot delay it. Pure functions of the running jobs, what fits the scope and the clock (``tests/test_backfill.py``).

A job may start beside a reservation if it ends before the reserved start (``now + max_runtime <= start``) or
fits beside the reserved job in what will still be held at the reserved start (jobs started this way are then
counted as held). When a job the reservation waits for has no ``max_runtime``, the start cannot be estimated and
only the second rule lets jobs through, so the reserved job is never delayed either way.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from .cohorts import RESOURCES, SLACK, Cohorts, request
from .executors.base import PoolCapacity

Fits = Callable[[list], bool]  # whether these jobs may hold their resources at once in the scope


@dataclass
class Reservation:
    """``scope`` (a pool or a cohort) held for ``job`` from ``start`` (None: cannot be estimated); ``held``: the
    jobs that will hold resources there at ``start`` (running ones not ended by then, and those backfilled)."""

    job: object
    where: str
    start: datetime | None
    held: list
    fits: Fits
    _fit: dict = field(default_factory=dict)  # what fits beside it, by job shape, until ``held`` grows

    @property
    def job_id(self) -> str:
        return self.job.id

    def admits(self, job, now: datetime, take: bool = True) -> bool:
        """Whether ``job`` may start now without delaying the reservation; a job that will still run at the
        reserved start is counted as held from then on (``take``: a job that starts; not when only asking why a
        job waits)."""
        if self.start is not None and job.max_runtime and now + timedelta(seconds=job.max_runtime) <= self.start:
            return True
        shape = (job.pool, job.gpus, job.cpus, job.memory, tuple(job.groups), job.asked_group)
        if shape not in self._fit:
            self._fit[shape] = self.fits([*self.held, self.job, job])
        if self._fit[shape]:
            if take:
                self.held.append(job)
                self._fit.clear()
            return True
        return False

    def reason(self) -> str:
        when = (
            f"reserved from {self.start:%Y-%m-%d %H:%M:%S} UTC"
            if self.start
            else "its start cannot be estimated: a job it waits for has no max_runtime"
        )
        return (
            f"waiting: backfill: {self.where} is reserved for job {self.job_id} ({when}); this job would "
            "delay it (give it a max_runtime that ends before)"
        )


def reserve(job, holders: list, fits: Fits, where: str, now: datetime) -> Reservation | None:
    """The reservation of ``job`` in a pool or a cohort's quota (named ``where``, what ``fits`` it), given the
    active jobs there (``holders``: with ``started_at`` and ``max_runtime``), or None when it could never hold it."""
    if not fits([job]):
        return None
    by_end = sorted(holders, key=lambda h: (_end(h) is None, _end(h) or now, h.id))
    low, high = 0, len(by_end)  # the fewest first-ending jobs whose end lets it fit (a bisection: fewer never fit)
    while low < high:
        middle = (low + high) // 2
        if fits([*by_end[middle:], job]):
            high = middle
        else:
            low = middle + 1
    ends = [_end(h) for h in by_end[:low]]
    start = None if None in ends else max(ends, default=now)
    return Reservation(job, where, max(start, now) if start else start, by_end[low:], fits)


def pool_fits(cap: PoolCapacity) -> Fits:
    """What fits a pool: its capacity of each resource."""
    total = {"gpus": cap.gpus, "cpus": cap.cpus, "memory": cap.memory if cap.memory is not None else float("inf")}
    return lambda jobs: all(sum(request(j, r) for j in jobs) <= total[r] + SLACK for r in RESOURCES)


def cohort_fits(cohorts: Cohorts, cohort: str) -> Fits:
    """What fits a cohort: its groups' quotas, borrowing and lending limits (:meth:`.Cohorts.fit`)."""
    return lambda jobs: cohorts.fit(jobs, cohort)


def _end(row) -> datetime | None:
    """When an active job ends at the latest (its start plus ``max_runtime``), or None without one."""
    if row.max_runtime is None or row.started_at is None:
        return None
    return row.started_at + timedelta(seconds=row.max_runtime)
