"""Quotas as cohorts, Kueue's model: each group has a nominal quota per pool and resource; the groups of a cohort
borrow one another's unused quota, up to a group's ``borrowing_limit``, out of what the others lend (all of
their nominal quota, or up to their ``lending_limit``). Pure functions of the configuration and what active jobs
hold, as :mod:`.policy` is; ``tests/test_cohorts.py`` holds Kueue's scenarios.

The configuration (``c.JobQueue.cohorts``) is ``{cohort: {group: {pool: {resource: quota}}}}``, where a resource is
``gpus``, ``cpus`` or ``memory`` and a quota is its nominal amount, or ``{"nominal": n, "borrowing_limit": b,
"lending_limit": l}`` (either limit left out: none). A (pool, resource) a group does not list is not limited by
its cohort, only by the pool's capacity and the user and group quotas.

Kueue's accounting, per cohort, pool and resource: a group's use up to its *guaranteed* amount (``nominal -
lending_limit``; 0 without a lending limit) is its own; the rest of every member's use draws on the cohort's
*lendable* total (the sum of ``nominal - guaranteed``), which it may never exceed. A group using more than its
nominal quota is *borrowing*; jobs that fit without borrowing start before jobs that would borrow.
"""

import math
from collections import defaultdict
from dataclasses import dataclass, field

from .models import CohortResource, memory_bytes

RESOURCES = ("gpus", "cpus", "memory")
LIMITS = ("nominal", "borrowing_limit", "lending_limit")
NAME_MAX = 64


class CohortConfigError(ValueError):
    """``c.JobQueue.cohorts`` is malformed; the message names the entry, e.g. ``cohorts['research']['ml']``."""


@dataclass(frozen=True)
class Quota:
    """One group's quota of one resource in one pool; a limit of None is no limit."""

    nominal: float
    borrowing_limit: float | None = None
    lending_limit: float | None = None

    @property
    def guaranteed(self) -> float:
        """What the group never lends: ``nominal - lending_limit`` (0 without a lending limit)."""
        return 0.0 if self.lending_limit is None else self.nominal - self.lending_limit

    @property
    def ceiling(self) -> float:
        """The most the group may use: ``nominal + borrowing_limit`` (without a borrowing limit: no bound)."""
        return math.inf if self.borrowing_limit is None else self.nominal + self.borrowing_limit


Key = tuple[str, str]  # (pool, resource)


def request(job, resource: str) -> float:
    """How much of ``resource`` the job asks for."""
    return getattr(job, resource) or 0


@dataclass
class CohortUse:
    """What active jobs hold per group, pool and resource during one scheduling pass."""

    held: defaultdict[str, defaultdict[Key, float]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(float))
    )
    drawn: dict = field(default_factory=dict)  # (lenders' scope, key) -> what they draw, until the next charge

    def charge(self, group: str, job) -> None:
        for resource in RESOURCES:
            self.held[group][job.pool, resource] += request(job, resource)
        self.drawn.clear()


class Cohorts:
    """The cohorts configured: which cohort a group is in, each group's quotas, and which group a job uses."""

    def __init__(self, config: dict, default_group: str = "", lend_between: bool = False):
        self.lend_between = lend_between  # cohorts lend one another what none of their groups use
        self.quotas: dict[str, dict[Key, Quota]] = {}
        self.cohort_of: dict[str, str] = {}
        self.members: dict[str, list[str]] = {}
        if not isinstance(config, dict):
            raise CohortConfigError("cohorts must be a dict {cohort: {group: {pool: {resource: quota}}}}")
        for cohort, groups in config.items():
            at = f"cohorts[{cohort!r}]"
            _name(cohort, at)
            if not isinstance(groups, dict) or not groups:
                raise CohortConfigError(f"{at} must be a non-empty dict {{group: {{pool: {{resource: quota}}}}}}")
            self.members[cohort] = sorted(groups)
            for group, pools in groups.items():
                here = f"{at}[{group!r}]"
                _name(group, here)
                if group in self.cohort_of:
                    raise CohortConfigError(f"{here}: group {group!r} is in cohort {self.cohort_of[group]!r} already")
                self.cohort_of[group] = cohort
                self.quotas[group] = _pools(pools, here)
        if default_group and default_group not in self.cohort_of:
            raise CohortConfigError(f"cohort_default_group {default_group!r} is in no cohort (JobQueue.cohorts)")
        self.default_group = default_group or None
        self._all_groups = sorted(self.cohort_of)
        self._lendables: dict = {}

    def group_of(self, job) -> str | None:
        """The group whose quota the job uses: the one it asked for (``asked_group``, one of its owner's groups),
        else the first of its owner's groups that is in a cohort, else ``cohort_default_group``; None: none."""
        if not self.cohort_of:
            return None
        if job.asked_group in self.cohort_of and job.asked_group in job.groups:
            return job.asked_group
        return next((g for g in sorted(job.groups) if g in self.cohort_of), self.default_group)

    def blocker(self, job, group: str, use: CohortUse) -> str | None:
        """Why ``job`` of ``group`` does not fit its cohort's quota now (its group's borrowing limit, or nothing
        left to lend in the cohort), or None."""
        cohort = self.cohort_of[group]
        for resource in RESOURCES:
            key = (job.pool, resource)
            quota, want = self.quotas[group].get(key), request(job, resource)
            if quota is None or not want:
                continue
            used = use.held[group][key]
            if used + want > quota.ceiling + SLACK:
                return (
                    f"waiting: group '{group}' may use at most {_amount(quota.ceiling, resource)} {resource} in "
                    f"pool '{job.pool}' (nominal {_amount(quota.nominal, resource)} + borrowing_limit "
                    f"{_amount(quota.borrowing_limit, resource)}; {_amount(used, resource)} in use, job needs "
                    f"{_amount(want, resource)})"
                )
            if self._drawn(cohort, key, use, group, want) > self._lendable(cohort, key) + SLACK:
                mine = "within its nominal quota" if used + want <= quota.nominal + SLACK else "to borrow"
                where = f"no cohort has {resource}" if self.lend_between else f"cohort '{cohort}' has no {resource}"
                return (
                    f"waiting: {where} left in pool '{job.pool}' for group "
                    f"'{group}' {mine} (nominal {_amount(quota.nominal, resource)}, {_amount(used, resource)} in use)"
                )
        return None

    def borrows(self, job, group: str, use: CohortUse) -> bool:
        """Whether starting ``job`` would take ``group`` past its nominal quota of some resource."""
        for resource in RESOURCES:
            quota = self.quotas[group].get((job.pool, resource))
            if quota is not None and use.held[group][job.pool, resource] + request(job, resource) > quota.nominal:
                return True
        return False

    def lenders(self, cohort: str) -> list[str]:
        """The groups whose unused quota ``cohort``'s groups may borrow: its own, or with ``lend_between`` every
        cohort's (as if all cohorts were children of one root cohort, Kueue's hierarchical cohorts)."""
        return self._all_groups if self.lend_between else self.members[cohort]

    def lending_scope(self, group: str) -> str:
        """The name of the quota ``group`` borrows from: its cohort's, or ``*`` (every cohort's) with
        ``lend_between``."""
        return "*" if self.lend_between else self.cohort_of[group]

    def lend_to_each_other(self, group: str, other: str) -> bool:
        """Whether ``group`` and ``other`` borrow from one another."""
        return self.lend_between or self.cohort_of[group] == self.cohort_of[other]

    def fit(self, jobs, cohort: str) -> bool:
        """Whether ``jobs`` (of the groups ``cohort`` borrows from) may all hold their resources at once: no group
        beyond its ``nominal + borrowing_limit``, no more drawn than those groups lend."""
        lenders = self.lenders(cohort)
        use = CohortUse()
        for job in jobs:
            if (group := self.group_of(job)) and group in lenders:
                use.charge(group, job)
        for key in {key for group in lenders for key in self.quotas[group]}:
            if any(use.held[g][key] > q.ceiling + SLACK for g in lenders if (q := self.quotas[g].get(key))):
                return False
            if self._total_drawn(cohort, key, use) > self._lendable(cohort, key) + SLACK:
                return False
        return True

    def numbers(self, cohort: str, use: CohortUse) -> dict[str, dict[str, dict[str, CohortResource]]]:
        """Each member's quota, use, borrowing and lending: group -> pool -> resource -> its numbers.

        What is borrowed in a (pool, resource) is counted as lent by the members with idle lendable quota there, in
        proportion to it (Kueue does not say which lender lends what; this splits it evenly by what each can)."""
        members, lenders = self.members[cohort], self.lenders(cohort)
        keys = {key for group in members for key in self.quotas[group]}
        out: dict = {group: defaultdict(dict) for group in members}
        for key in sorted(keys):
            quotas = {g: q for g in lenders if (q := self.quotas[g].get(key)) is not None}
            used = {g: use.held[g][key] for g in quotas}
            borrowed = {g: max(used[g] - q.nominal, 0.0) for g, q in quotas.items()}
            idle = {g: max(q.nominal - max(used[g], q.guaranteed), 0.0) for g, q in quotas.items()}
            total_borrowed, total_idle = sum(borrowed.values()), sum(idle.values())
            for group, quota in ((g, q) for g, q in quotas.items() if g in members):
                lent = total_borrowed * idle[group] / total_idle if total_idle else 0.0
                out[group][key[0]][key[1]] = CohortResource(
                    nominal=quota.nominal,
                    borrowing_limit=quota.borrowing_limit,
                    lending_limit=quota.lending_limit,
                    used=used[group],
                    borrowed=borrowed[group],
                    lent=min(lent, idle[group]),
                )
        return {group: dict(pools) for group, pools in out.items()}

    def _lendable(self, cohort: str, key: Key) -> float:
        scope = (self._scope(cohort), key)
        if scope not in self._lendables:
            lenders = self.lenders(cohort)
            self._lendables[scope] = sum(q.nominal - q.guaranteed for g in lenders if (q := self.quotas[g].get(key)))
        return self._lendables[scope]

    def _drawn(self, cohort: str, key: Key, use: CohortUse, group: str, want: float) -> float:
        """What the lenders' groups would draw on their lendable total once ``group`` uses ``want`` more (their
        total is kept in ``use`` until it changes: a pass asks this for every job it looks at)."""
        quota, used = self.quotas[group][key], use.held[group][key]
        drawn = self._total_drawn(cohort, key, use)
        return drawn - max(used - quota.guaranteed, 0.0) + max(used + want - quota.guaranteed, 0.0)

    def _total_drawn(self, cohort: str, key: Key, use: CohortUse) -> float:
        """What the groups ``cohort`` borrows from draw on their lendable total: each one's use beyond what it
        never lends (kept in ``use`` until it changes)."""
        scope = (self._scope(cohort), key)
        if scope not in use.drawn:
            use.drawn[scope] = sum(
                max(use.held[m][key] - q.guaranteed, 0.0)
                for m in self.lenders(cohort)
                if (q := self.quotas[m].get(key)) is not None
            )
        return use.drawn[scope]

    def _scope(self, cohort: str) -> str | None:
        """Whose quota ``cohort``'s groups share: the cohort's, or everyone's (None) with ``lend_between``."""
        return None if self.lend_between else cohort


SLACK = 1e-9  # float CPUs: 0.1 * 3 fits in 0.3


def _amount(value: float | None, resource: str) -> str:
    if value is None:
        return "none"
    if resource == "memory":
        return f"{value / 2**30:g}Gi"
    return f"{value:g}"


def _name(name, at: str) -> None:
    if not isinstance(name, str) or not 0 < len(name) <= NAME_MAX:
        raise CohortConfigError(f"{at}: names must be strings of 1 to {NAME_MAX} characters")


def _pools(pools, at: str) -> dict[Key, Quota]:
    if not isinstance(pools, dict):
        raise CohortConfigError(f"{at} must be a dict {{pool: {{resource: quota}}}}")
    quotas = {}
    for pool, resources in pools.items():
        here = f"{at}[{pool!r}]"
        _name(pool, here)
        if not isinstance(resources, dict):
            raise CohortConfigError(f"{here} must be a dict {{resource: quota}} of {', '.join(RESOURCES)}")
        for resource, quota in resources.items():
            if resource not in RESOURCES:
                raise CohortConfigError(f"{here}: {resource!r} is not a resource (give {', '.join(RESOURCES)})")
            quotas[pool, resource] = _quota(quota, resource, f"{here}[{resource!r}]")
    return quotas


def _quota(value, resource: str, at: str) -> Quota:
    limits = value if isinstance(value, dict) else {"nominal": value}
    if unknown := sorted(set(limits) - set(LIMITS)):
        raise CohortConfigError(f"{at}: {unknown[0]!r} is not a quota setting (give {', '.join(LIMITS)})")
    if "nominal" not in limits:
        raise CohortConfigError(f"{at}: give its 'nominal' quota")
    amounts = {name: _amount_of(amount, resource, f"{at}[{name!r}]") for name, amount in limits.items()}
    quota = Quota(**amounts)
    if quota.nominal is None:
        raise CohortConfigError(f"{at}['nominal'] must be a number, not None")
    if quota.lending_limit is not None and quota.lending_limit > quota.nominal:
        raise CohortConfigError(f"{at}: lending_limit {quota.lending_limit:g} is more than nominal {quota.nominal:g}")
    return quota


def _amount_of(value, resource: str, at: str) -> float | None:
    if value is None:
        return None
    if resource == "memory" and isinstance(value, str):
        try:  # the same "64Gi" as a job's resources.memory
            return float(memory_bytes(value))
        except ValueError as e:
            raise CohortConfigError(f"{at}: {e}") from None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise CohortConfigError(
            f"{at} must be a number >= 0" + (" or a size like '64Gi'" if resource == "memory" else "")
        )
    if resource == "gpus" and value != int(value):
        raise CohortConfigError(f"{at} must be a whole number of GPUs")
    return float(value)
