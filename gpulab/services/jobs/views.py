"""The job API's views of the queue (its pools and quotas, as the pydantic bodies of :mod:`.models`), built from
what the store and the executor report; no database or executor calls here. A job's own view is
:meth:`~.store.JobRow.to_model`."""

from collections.abc import Iterable, Mapping
from types import SimpleNamespace

from .cohorts import Cohorts, CohortUse
from .executors.base import PoolCapacity
from .fair_share import Shares, group_key, user_key
from .models import (
    CohortStatus,
    PoolResources,
    PoolStatus,
    Quota,
    QuotaLimits,
    QuotaStatus,
    QuotaUsage,
)
from .policy import Usage
from .store import JobRow


def pool_views(capacity: Mapping[str, PoolCapacity], used: Mapping[str, Usage], queued: Mapping[str, int]):
    """Capacity, use and queue length of each pool the executor offers, by name."""
    return [
        PoolStatus(
            name=name,
            capacity=PoolResources(gpus=cap.gpus, cpus=cap.cpus),
            used=PoolResources(gpus=used.get(name, Usage()).gpus, cpus=used.get(name, Usage()).cpus),
            queued=queued.get(name, 0),
            draining=cap.draining,
        )
        for name, cap in sorted(capacity.items())
    ]


def quota_view(
    mine: Usage,
    user_limits: dict,
    groups: Iterable[str],
    group_quotas: Mapping[str, dict],
    active: list[JobRow],
    cohorts: Cohorts,
    shares: Shares,
    owner: str,
    every_cohort: bool = False,
) -> Quota:
    """An owner's limits and usage (``mine``), those of each of their ``groups`` with a quota, and the ``cohorts``
    of their groups (``every_cohort``: all of them), from the ``active`` jobs; ``shares``: fair-share usage."""
    groups = set(groups)
    group_status = {}
    for group in sorted(groups & set(group_quotas)):
        rows = [r for r in active if group in r.groups]
        group_status[group] = QuotaStatus(
            limits=limits_view(group_quotas[group]), usage=QuotaUsage(jobs=len(rows), gpus=sum(r.gpus for r in rows))
        )
    use = CohortUse()
    for row in active:
        if group := cohorts.group_of(row):
            use.charge(group, row)
    mine_default = default_group(cohorts, groups)
    shown = shown_cohorts(cohorts, groups, every_cohort)
    cohort_status = {
        cohort: CohortStatus(
            groups=cohorts.numbers(cohort, use),
            decayed_usage={g: shares.usage.get(group_key(g), 0.0) for g in cohorts.members[cohort]},
            weights={g: shares.group_weights.get(g, 1.0) for g in cohorts.members[cohort]},
        )
        for cohort in sorted(shown)
    }
    return Quota(
        limits=limits_view(user_limits),
        usage=QuotaUsage(jobs=mine.jobs, gpus=mine.gpus),
        groups=group_status,
        cohorts=cohort_status,
        cohort_group=mine_default,
        decayed_usage=shares.usage.get(user_key(owner), 0.0),
    )


def default_group(cohorts: Cohorts, groups: Iterable[str]) -> str | None:
    """The cohort group whose quota jobs of an owner in ``groups`` use unless they ask for another."""
    return cohorts.group_of(SimpleNamespace(asked_group=None, groups=sorted(groups)))


def shown_cohorts(cohorts: Cohorts, groups: Iterable[str], every_cohort: bool = False) -> set[str]:
    """The cohorts ``GET /quota`` shows an owner in ``groups``: those of their groups and of their default group
    (``every_cohort``, an admin's: all)."""
    if every_cohort:
        return set(cohorts.members)
    shown = {cohorts.cohort_of[g] for g in groups if g in cohorts.cohort_of}
    if mine := default_group(cohorts, groups):
        shown.add(cohorts.cohort_of[mine])
    return shown


def limits_view(quota: dict) -> QuotaLimits:
    return QuotaLimits(max_jobs=quota.get("max_jobs"), max_gpus=quota.get("max_gpus"))
