"""Backfill with a reservation, Slurm's: the job that has waited longest for its pool's capacity, or for its cohort's
quota (a large job behind a stream of small ones), gets a reservation there: the time by which the running jobs
it waits for end, by their ``max_runtime``. Other jobs start in that pool (or cohort) only if they cannot delay
it. Pure functions of the running jobs, what fits the scope and the clock (``tests/test_backfill.py``), and
:class:`Reservations`, which the queue keeps from pass to pass.

A job may start beside a reservation if it ends before the reserved start (``now + max_runtime <= start``) or
fits beside the reserved job in what will still be held at the reserved start (jobs started this way are then
counted as held). When a job the reservation waits for has no ``max_runtime``, the start cannot be estimated and
only the second rule lets jobs through, so the reserved job is never delayed either way.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from . import policy
from .cohorts import RESOURCES, SLACK, Cohorts, request
from .executors.base import PoolCapacity
from .policy import Ledger, Limits

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


def scope_of(job, why: str | None, capacity: dict[str, PoolCapacity], ledger: Ledger) -> tuple | None:
    """What ``job`` waits for when ``why`` (as of ``ledger``) says it waits for one thing a reservation can hold: its
    pool's capacity (``("pool", pool)``) or the quota its cohort group borrows from (``("cohort", cohort or "*" when
    cohorts lend to each other, pool)``); None for anything else (a user's quota, a draining pool, ...)."""
    cap = capacity.get(job.pool)
    if why is None or cap is None or cap.draining:
        return None
    if why == policy.short_of(job, cap, ledger.pools[job.pool]):
        return "pool", job.pool
    if why == policy.cohort_blocker(job, ledger):
        return "cohort", ledger.cohorts.lending_scope(ledger.cohorts.group_of(job)), job.pool
    return None


class Reservations:
    """The scheduling passes' reservations: which job holds each scope (kept from pass to pass until it starts,
    Slurm's: the longest waiting), and each pass's :class:`Reservation` of them."""

    def __init__(self):
        self._holders: dict[tuple, str] = {}  # scope -> the job that holds it
        self._by_scope: dict[tuple, Reservation] = {}
        self._by_job: dict[str, Reservation] = {}

    def holders(self) -> list[str]:
        """The ids of the jobs that hold a scope, for the pass to read."""
        return list(self._holders.values())

    def held_by(self, job_id: str) -> Reservation | None:
        """The reservation ``job_id`` holds as of the last pass (``GET /jobs/{id}``'s estimated start)."""
        return self._by_job.get(job_id)

    def begin(self, holders: list, capacity, ledger: Ledger, limits: Limits, active: list, now: datetime) -> None:
        """A pass's reservations, for the ``holders`` (as read, still queued) that still wait for their scope only."""
        held, self._holders, self._by_scope, self._by_job = self._holders, {}, {}, {}
        for job in holders:
            scope = scope_of(job, policy.blocker(job, capacity, ledger, limits), capacity, ledger)
            if scope is None or held.get(scope) != job.id:
                continue
            fits, members, where = _room(job, scope, capacity, ledger, active)
            if reservation := reserve(job, members, fits, where, now):
                self._by_scope[scope] = self._by_job[job.id] = reservation
                self._holders[scope] = job.id

    def delayed(self, job, ledger: Ledger, now: datetime, take: bool = True) -> str | None:
        """Why ``job``, which fits, would delay a reservation of its pool or of its cohort's quota there, or None;
        ``take``: it starts, and counts as held at the reserved start where it runs past it."""
        group = ledger.cohorts.group_of(job)
        scopes = [("pool", job.pool)] + ([("cohort", ledger.cohorts.lending_scope(group), job.pool)] if group else [])
        held = [r for scope in scopes if (r := self._by_scope.get(scope))]
        for reservation in held:
            if not reservation.admits(job, now, take=False):
                return reservation.reason()
        for reservation in held if take else ():
            reservation.admits(job, now)
        return None

    def choose(self, blocked: list, capacity, ledger: Ledger) -> None:
        """For each scope no job holds, the oldest of ``blocked`` (``(job, the scope it waits for)``, seen this
        pass) that the scope could ever hold holds it from the next pass on."""
        for job, scope in sorted(blocked, key=lambda item: (item[0].created_at, item[0].id)):
            if scope is not None and scope not in self._holders and _room(job, scope, capacity, ledger, [])[0]([job]):
                self._holders[scope] = job.id


def _room(job, scope: tuple, capacity, ledger: Ledger, active: list) -> tuple[Fits, list, str]:
    """What fits ``scope``, the active jobs holding its resources, and its name."""
    if scope[0] == "pool":
        return pool_fits(capacity[job.pool]), [r for r in active if r.pool == job.pool], f"pool '{job.pool}'"
    cohorts = ledger.cohorts
    cohort = cohorts.cohort_of[cohorts.group_of(job)]
    lenders = set(cohorts.lenders(cohort))
    members = [r for r in active if r.pool == job.pool and cohorts.group_of(r) in lenders]
    where = "the cohorts' quota" if cohorts.lend_between else f"cohort '{cohort}'"
    return cohort_fits(cohorts, cohort), members, f"{where} in pool '{job.pool}'"
