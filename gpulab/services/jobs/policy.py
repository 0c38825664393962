"""Which queued job starts where: gpulab-jobs' scheduling policy, as pure functions of the jobs, the pools'
capacity and what active jobs hold, so that every rule is tested on its own (``tests/test_jobs_policy.py``).

Nothing here reads the database, the executor or the clock: :class:`~.queue.JobQueue` gathers those once per
scheduling pass, asks this module, and acts. Jobs are anything with the scheduling columns as attributes
(``owner``, ``groups``, ``pool``, ``gpus``, ``cpus``, ``memory``, ``global_priority``, ``created_at``,
``array_id``/``array_max`` for a job array's throttle, and ``asked_group`` for the cohort quota it uses, see
:mod:`.cohorts`).
"""

from collections import defaultdict
from dataclasses import dataclass, field

from .cohorts import SLACK, Cohorts, CohortUse
from .executors.base import PoolCapacity
from .fair_share import Shares

BATCH = 64  # queued jobs read per owner at a time when the user quota has no max_jobs
CPU_SLACK = SLACK  # float CPUs: 0.1 * 3 fits in 0.3


@dataclass
class Usage:
    """Resources held by running and dispatching jobs."""

    jobs: int = 0
    gpus: int = 0
    cpus: float = 0.0
    memory: int = 0

    def charge(self, job) -> None:
        self.jobs += 1
        self.gpus += job.gpus
        self.cpus += job.cpus
        self.memory += job.memory or 0


@dataclass
class Ledger:
    """What active jobs hold during one pass: per owner, group and pool, per cohort group (of ``cohorts``), and
    the GPU ids in use per pool. It only grows during a pass, so a job that does not fit early in a pass fits
    nowhere later in it."""

    cohorts: Cohorts = field(default_factory=lambda: Cohorts({}))
    cohort_use: CohortUse = field(default_factory=CohortUse)
    shares: Shares = field(default_factory=Shares)  # decayed usage from history (fair share)

    owners: defaultdict[str, Usage] = field(default_factory=lambda: defaultdict(Usage))
    groups: defaultdict[str, Usage] = field(default_factory=lambda: defaultdict(Usage))
    pools: defaultdict[str, Usage] = field(default_factory=lambda: defaultdict(Usage))
    busy_gpus: defaultdict[str, set[int]] = field(default_factory=lambda: defaultdict(set))
    arrays: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))  # active jobs per job array
    array_limits: dict[str, int] = field(default_factory=dict)  # max_concurrent of those arrays that have one

    def charge(self, job, gpu_ids=()) -> None:
        self.owners[job.owner].charge(job)
        self.pools[job.pool].charge(job)
        for group in job.groups:
            self.groups[group].charge(job)
        self.busy_gpus[job.pool].update(gpu_ids)
        if group := self.cohorts.group_of(job):
            self.cohort_use.charge(group, job)
        if job.array_id:
            self.arrays[job.array_id] += 1
            if job.array_max:
                self.array_limits[job.array_id] = job.array_max

    def borrows(self, job) -> bool:
        """Whether starting ``job`` would take its cohort group past its nominal quota."""
        group = self.cohorts.group_of(job)
        return bool(group) and self.cohorts.borrows(job, group, self.cohort_use)

    def share(self, job) -> tuple[float, float]:
        """``job``'s cohort group's weighted decayed usage, then its owner's (:mod:`.fair_share`)."""
        return self.shares.of(job.owner, self.cohorts.group_of(job))

    def full_arrays(self) -> list[str]:
        """The job arrays running as many jobs as their ``max_concurrent`` lets them."""
        return [array for array, limit in self.array_limits.items() if self.arrays[array] >= limit]


@dataclass(frozen=True)
class Limits:
    """The quotas in force: ``user`` (every user's ``max_jobs``/``max_gpus``, None = no limit) and
    ``groups`` (group name -> its limits over all its members' jobs)."""

    user: dict
    groups: dict

    def room(self, used: Usage) -> int:
        """How many more jobs an owner using ``used`` may start (:data:`BATCH` without a ``max_jobs``)."""
        max_jobs = self.user.get("max_jobs")
        return BATCH if max_jobs is None else max(max_jobs - used.jobs, 0)


def blocker(job, capacity: dict[str, PoolCapacity], ledger: Ledger, limits: Limits) -> str | None:
    """Why ``job`` cannot start now (its array's ``max_concurrent``, its owner's or a group's quota, its cohort's,
    or its pool's capacity), or None."""
    array, limit = job.array_id, job.array_max
    if array and limit and ledger.arrays[array] >= limit:
        return f"waiting: array max_concurrent={limit} reached ({ledger.arrays[array]} running)"
    scopes = [("", limits.user, ledger.owners[job.owner])]
    scopes += [(f"group '{g}' ", limits.groups[g], ledger.groups[g]) for g in job.groups if g in limits.groups]
    for scope, quota, used in scopes:
        max_jobs, max_gpus = quota.get("max_jobs"), quota.get("max_gpus")
        if max_jobs is not None and used.jobs + 1 > max_jobs:
            return f"waiting: {scope}quota max_jobs={max_jobs} reached"
        if max_gpus is not None and used.gpus + job.gpus > max_gpus:
            return f"waiting: {scope}quota max_gpus={max_gpus} reached ({used.gpus} in use, job needs {job.gpus})"
    if why := cohort_blocker(job, ledger):
        return why
    cap = capacity.get(job.pool)
    if cap is None:
        return f"waiting: no pool '{job.pool}' (pools: {', '.join(sorted(capacity))})"
    if cap.draining:
        return f"waiting: pool '{job.pool}' is draining (an admin stopped new jobs there)"
    return short_of(job, cap, ledger.pools[job.pool])


def cohort_blocker(job, ledger: Ledger) -> str | None:
    """Why ``job`` does not fit its cohort group's quota now (:meth:`.Cohorts.blocker`), or None."""
    group = ledger.cohorts.group_of(job)
    return ledger.cohorts.blocker(job, group, ledger.cohort_use) if group else None


def short_of(job, cap: PoolCapacity, used: Usage) -> str | None:
    """What of its pool's capacity ``job`` lacks while ``used`` is taken, or None."""
    if job.gpus > cap.gpus - used.gpus:
        return f"waiting: no GPU capacity in pool '{job.pool}' ({cap.gpus - used.gpus} of {cap.gpus} free)"
    free_cpus = cap.cpus - used.cpus
    if job.cpus > free_cpus + CPU_SLACK:
        return f"waiting: no CPU capacity in pool '{job.pool}' ({free_cpus:g} of {cap.cpus:g} free)"
    if cap.memory is not None and (job.memory or 0) > cap.memory - used.memory:
        return f"waiting: not enough memory in pool '{job.pool}'"
    return None


def turn(head, used: Usage, borrows: bool = False, share: tuple[float, float] = (0.0, 0.0)) -> tuple:
    """The order in which owners' head jobs are considered (smallest first): jobs within their cohort group's
    nominal quota before those that would borrow (Kueue's), then an admin's priority, then fair share (``share``:
    the least decayed usage of the job's cohort group, per its weight, then of its owner; then the fewest running
    GPUs, then jobs), then age."""
    return borrows, -head.global_priority, *share, used.gpus, used.jobs, head.created_at


def gpu_ids(job, capacity: dict[str, PoolCapacity], ledger: Ledger) -> list[int]:
    """The lowest free GPU ids of the job's pool, as many as it asks for."""
    free = [i for i in range(capacity[job.pool].gpus) if i not in ledger.busy_gpus[job.pool]]
    return free[: job.gpus]


def retry_delay(attempt: int, max_retries: int, backoff: float, backoff_max: float) -> float | None:
    """Seconds before retry ``attempt + 1`` after attempt ``attempt`` failed (``backoff * 2**(attempt-1)``, at
    most ``backoff_max``), or None when the retries are used up."""
    if attempt > max_retries:
        return None
    return min(backoff * 2 ** (attempt - 1), backoff_max)
