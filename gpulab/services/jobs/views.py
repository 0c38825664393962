"""The job API's views of the queue (its pools and quotas, as the pydantic bodies of :mod:`.models`), built from
what the store and the executor report; no database or executor calls here. A job's own view is
:meth:`~.store.JobRow.to_model`."""

from collections.abc import Iterable, Mapping

from .executors.base import PoolCapacity
from .models import PoolResources, PoolStatus, Quota, QuotaLimits, QuotaStatus, QuotaUsage
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
    mine: Usage, user_limits: dict, groups: Iterable[str], group_quotas: Mapping[str, dict], active: list[JobRow]
) -> Quota:
    """An owner's limits and usage (``mine``), and those of each of their ``groups`` with a quota (from the
    ``active`` jobs)."""
    group_status = {}
    for group in sorted(set(groups) & set(group_quotas)):
        rows = [r for r in active if group in r.groups]
        group_status[group] = QuotaStatus(
            limits=limits_view(group_quotas[group]), usage=QuotaUsage(jobs=len(rows), gpus=sum(r.gpus for r in rows))
        )
    return Quota(limits=limits_view(user_limits), usage=QuotaUsage(jobs=mine.jobs, gpus=mine.gpus), groups=group_status)


def limits_view(quota: dict) -> QuotaLimits:
    return QuotaLimits(max_jobs=quota.get("max_jobs"), max_gpus=quota.get("max_gpus"))
