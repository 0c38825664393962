"""Which running jobs to preempt so that a blocked job can start: Kueue's two triggers and its victim order, as a
pure function of the jobs and the quotas (``tests/test_preemption.py``).

Only jobs submitted with ``preemptible: true`` are ever victims, and only once they have run ``min_runtime``
seconds. The triggers:

- **reclaim**: a job within its cohort group's nominal quota takes back what other groups of the cohort borrowed
  (victims: jobs of groups using more than their nominal quota, of any priority);
- **priority** (Kueue's ``LowerPriority``): a job preempts jobs of its own cohort group (or, outside cohorts, of
  its pool) with a lower priority: a lower admin priority (``global_priority``), or the same owner's lower
  ``priority``, so that no user can preempt another with a number they chose; and jobs of other groups of its
  cohort with a lower admin priority, from what those groups borrow (Kueue's ``borrowWithinCohort``), never
  from their nominal quota.

Victims are taken in Kueue's order, borrowers first, then the lowest priority, then the most recently started,
until the job fits; then each is given back, newest choice first, if the job still fits without it (a set none of
which can be spared). A preemption never loops: a reclaiming job is within its group's nominal quota, so it is
no borrower to reclaim from, and a victim of a priority preemption has the lower priority.
"""

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from .cohorts import RESOURCES, Cohorts, request
from .executors.base import PoolCapacity
from .policy import Ledger, Limits, blocker


@dataclass(frozen=True)
class Plan:
    """The victims to stop for ``job``, each with the reason its event gives."""

    job: object
    victims: list
    reasons: dict  # victim id -> "reclaim of group ml's quota in cohort lab" / "priority 10 over 0"


def plan(
    job,
    running: list,
    capacity: dict[str, PoolCapacity],
    limits: Limits,
    cohorts: Cohorts,
    now: datetime,
    min_runtime: float = 0.0,
    busy: Callable[[object], bool] = lambda victim: False,
) -> Plan | None:
    """The smallest set of preemptible ``running`` jobs whose stop lets ``job`` start, or None when there is none
    (``job`` fits already, or no allowed victims free enough). ``running``: every active job; ``busy(victim)``:
    a victim already being stopped, left out."""
    ledger = _ledger(cohorts, running)
    if blocker(job, capacity, ledger, limits) is None:
        return None
    group = cohorts.group_of(job)
    within_nominal = group is not None and _has_quota(cohorts, group, job) and not ledger.borrows(job)
    reasons, borrowed_from = {}, set()  # victims' reasons; those taken only from what their group borrows
    for victim in running:
        if not _may_preempt(victim, job, now, min_runtime, busy):
            continue
        victim_group = cohorts.group_of(victim)
        if (
            within_nominal
            and victim_group is not None
            and victim_group != group
            and cohorts.lend_to_each_other(victim_group, group)
            and _borrowing(cohorts, ledger, victim_group, job)
        ):
            reasons[victim.id] = f"reclaim of group {group}'s quota in cohort {cohorts.cohort_of[group]}"
        elif victim_group == group and _lower(victim, job):
            reasons[victim.id] = _priority_reason(job, victim)
        elif (
            group is not None
            and victim_group is not None
            and cohorts.lend_to_each_other(victim_group, group)
            and victim.global_priority < job.global_priority
            and _borrowing(cohorts, ledger, victim_group, job)
        ):  # Kueue's borrowWithinCohort: LowerPriority, of what other groups borrow
            reasons[victim.id] = f"{_priority_reason(job, victim)}, of what group {victim_group} borrows"
            borrowed_from.add(victim.id)
    if not reasons:
        return None
    borrowing = {g for g in {cohorts.group_of(v) for v in running} if g and _borrowing(cohorts, ledger, g, job)}
    order = sorted(
        (v for v in running if v.id in reasons),
        key=lambda v: (cohorts.group_of(v) not in borrowing, v.global_priority, v.priority, -v.started_at.timestamp()),
    )

    def fits(victims: Iterable) -> bool:
        gone = {v.id for v in victims}
        return blocker(job, capacity, _ledger(cohorts, [r for r in running if r.id not in gone]), limits) is None

    def keeps_nominal(victims: list) -> bool:
        """A borrowing group's job is only a victim of a higher priority from what its group borrows."""
        gone = {v.id for v in victims}
        after = _ledger(cohorts, [r for r in running if r.id not in gone])
        return all(_within_borrowed(cohorts, after, cohorts.group_of(v), job) for v in victims if v.id in borrowed_from)

    chosen = []
    for victim in order:
        if not keeps_nominal([*chosen, victim]):
            continue
        chosen.append(victim)
        if fits(chosen):
            break
    else:
        return None
    for victim in reversed(chosen[:-1]):  # the last one made it fit: it stays
        rest = [v for v in chosen if v is not victim]
        if fits(rest):
            chosen = rest
    return Plan(job, chosen, {v.id: reasons[v.id] for v in chosen})


def _ledger(cohorts: Cohorts, running: Iterable) -> Ledger:
    ledger = Ledger(cohorts)
    for row in running:
        ledger.charge(row)
    return ledger


def _may_preempt(victim, job, now: datetime, min_runtime: float, busy) -> bool:
    return (
        victim.preemptible
        and victim.state == "running"
        and victim.id != job.id
        and victim.pool == job.pool
        and victim.started_at is not None
        and now - victim.started_at >= timedelta(seconds=min_runtime)
        and not busy(victim)
    )


def _borrowing(cohorts: Cohorts, ledger: Ledger, group: str, job) -> bool:
    """Whether ``group`` uses more than its nominal quota of a resource ``job`` needs, in ``job``'s pool."""
    for resource in RESOURCES:
        quota = cohorts.quotas[group].get((job.pool, resource))
        if quota and request(job, resource) and ledger.cohort_use.held[group][job.pool, resource] > quota.nominal:
            return True
    return False


def _has_quota(cohorts: Cohorts, group: str, job) -> bool:
    """Whether ``group`` has a quota of a resource ``job`` needs in ``job``'s pool (else it reclaims nothing)."""
    return any(request(job, r) and (job.pool, r) in cohorts.quotas[group] for r in RESOURCES)


def _within_borrowed(cohorts: Cohorts, ledger: Ledger, group: str, job) -> bool:
    """Whether ``group`` still uses at least its nominal quota of each resource ``job`` needs, in ``job``'s pool."""
    for resource in RESOURCES:
        quota = cohorts.quotas[group].get((job.pool, resource))
        if quota and request(job, resource) and ledger.cohort_use.held[group][job.pool, resource] < quota.nominal:
            return False
    return True


def _lower(victim, job) -> bool:
    """A lower admin priority, or the same owner's lower priority among equal admin priorities."""
    if victim.global_priority != job.global_priority:
        return victim.global_priority < job.global_priority
    return victim.owner == job.owner and victim.priority < job.priority


def _priority_reason(job, victim) -> str:
    if victim.global_priority != job.global_priority:
        return f"priority {job.global_priority} over {victim.global_priority}"
    return f"{job.owner}'s priority {job.priority} over {victim.priority}"
