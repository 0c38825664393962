"""Fair share from history: each user's and each cohort group's use of the cluster, decayed with a half-life, as
Slurm's fair-share factor and Kueue's admission fair sharing keep it. Pure arithmetic; the store keeps the
accumulators (``fair_share_usage``), the queue charges them (:meth:`~.queue.JobQueue.tick`) and orders turns by
them (:func:`~.policy.turn`).

Usage is in weighted resource-seconds: a job holding 2 GPUs and 8 CPUs for an hour with the default weights
(``{"gpus": 1, "cpus": 0.1, "memory": 0}``, memory per GiB) adds ``(2 + 0.8) * 3600``. Stored as
``(value, updated_at)`` and decayed when read: ``value * 2 ** (-age / half_life)``. A job that starts is charged at
once for ``entry_penalty`` seconds of its size (Kueue's entry penalty), so that two users with equal history
take turns within one scheduling pass rather than the first taking everything.
"""

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

DEFAULT_WEIGHTS = {"gpus": 1.0, "cpus": 0.1, "memory": 0.0}


def user_key(owner: str) -> str:
    return f"user:{owner}"


def group_key(group: str) -> str:
    return f"group:{group}"


def decayed(value: float, since: datetime, now: datetime, half_life: float) -> float:
    """``value`` recorded at ``since``, decayed to ``now``."""
    age = max((now - since).total_seconds(), 0.0)
    return value * 0.5 ** (age / half_life) if half_life > 0 else value


def rate(job, weights: Mapping[str, float]) -> float:
    """The weighted resources ``job`` holds: what a second of it adds to its owner's and group's usage."""
    return (
        job.gpus * weights.get("gpus", 0.0)
        + job.cpus * weights.get("cpus", 0.0)
        + (job.memory or 0) / 2**30 * weights.get("memory", 0.0)
    )


def charges(jobs: Iterable, seconds_of, weights: Mapping[str, float], group_of) -> dict[str, float]:
    """What the ``jobs`` add, per user and cohort group key, for ``seconds_of(job)`` seconds each
    (``group_of(job)``: its cohort group or None)."""
    out: dict[str, float] = {}
    for job in jobs:
        amount = rate(job, weights) * seconds_of(job)
        if not amount:
            continue
        keys = [user_key(job.owner)] + ([group_key(g)] if (g := group_of(job)) else [])
        for key in keys:
            out[key] = out.get(key, 0.0) + amount
    return out


@dataclass
class Shares:
    """Decayed usage per key as of one scheduling pass, divided by the group's weight for groups; grows by the entry
    penalty of each job the pass starts."""

    usage: dict[str, float] = field(default_factory=dict)
    group_weights: Mapping[str, float] = field(default_factory=dict)

    def of(self, owner: str, group: str | None) -> tuple[float, float]:
        """The turn key: the group's weighted share (0 outside cohorts), then the user's."""
        group_share = self.usage.get(group_key(group), 0.0) / self.group_weights.get(group, 1.0) if group else 0.0
        return group_share, self.usage.get(user_key(owner), 0.0)

    def add(self, amounts: Mapping[str, float]) -> None:
        for key, amount in amounts.items():
            self.usage[key] = self.usage.get(key, 0.0) + amount
