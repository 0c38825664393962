"""Backfill with a reservation (gpulab/services/jobs/backfill.py), Slurm's: the reserved start is when enough of
the running jobs end by their max_runtime; a job starts beside it only if it ends before or fits in what is spare
then; a start that cannot be estimated lets only the spare through; and, on random workloads, backfill never
delays a reserved job past the start it was first given."""

import random
from datetime import datetime, timedelta
from itertools import count
from types import SimpleNamespace

import pytest

from gpulab.services.jobs.backfill import Reservations, cohort_fits, pool_fits, reserve
from gpulab.services.jobs.cohorts import Cohorts
from gpulab.services.jobs.executors.base import PoolCapacity
from gpulab.services.jobs.policy import Ledger, Limits

NOW = datetime(2026, 12, 7, 12, 0)
POOL = PoolCapacity(gpus=8, cpus=64.0)
FITS = pool_fits(POOL)
ids = count()


def job(gpus, max_runtime=None, started=None, cpus=1.0, group=None):
    return SimpleNamespace(
        id=f"j{next(ids)}",
        owner="alice",
        priority=0,
        global_priority=0,
        created_at=NOW,
        array_id=None,
        array_max=None,
        groups=[group] if group else [],
        asked_group=None,
        pool="default",
        gpus=gpus,
        cpus=cpus,
        memory=None,
        max_runtime=max_runtime,
        started_at=None if started is None else NOW - timedelta(seconds=started),
    )


def test_the_reserved_start_is_when_enough_running_jobs_end():
    running = [job(4, max_runtime=200, started=100), job(3, max_runtime=400, started=100)]
    big = job(6)
    held = reserve(big, running, FITS, "pool 'default'", NOW)
    assert held.start == NOW + timedelta(seconds=300) and held.job_id == big.id  # both must end: 1 + 4 + 3 free
    assert held.held == []  # nothing runs then: 2 GPUs are spare beside the big job


def test_jobs_start_beside_a_reservation_only_if_they_cannot_delay_it():
    running = [job(4, max_runtime=200, started=100), job(3, max_runtime=400, started=100)]
    held = reserve(job(6), running, FITS, "pool 'default'", NOW)
    assert held.admits(job(1, max_runtime=300), NOW)  # ends by the reserved start
    assert held.held == []  # it took nothing of the spare
    assert held.admits(job(2, max_runtime=3600), NOW)  # runs past it, but fits in the spare, which it takes
    assert not held.admits(job(1), NOW)  # nothing spare left, and no max_runtime
    assert not held.admits(job(1, max_runtime=301), NOW)
    assert held.reason() == (
        f"waiting: backfill: pool 'default' is reserved for job {held.job_id} (reserved from 2026-12-07 12:05:00 "
        "UTC); this job would delay it (give it a max_runtime that ends before)"
    )


def test_a_start_that_cannot_be_estimated_lets_only_the_spare_through():
    held = reserve(job(6), [job(4, started=10), job(3, max_runtime=60, started=10)], FITS, "pool 'default'", NOW)
    assert held.start is None and held.held == []
    assert not held.admits(job(3, max_runtime=1), NOW)
    assert held.admits(job(2, max_runtime=1), NOW)
    assert "its start cannot be estimated: a job it waits for has no max_runtime" in held.reason()


def test_a_job_larger_than_its_pool_gets_no_reservation():
    assert reserve(job(9), [], FITS, "pool 'default'", NOW) is None
    assert reserve(job(0, cpus=65.0), [], FITS, "pool 'default'", NOW) is None


def test_a_cohort_is_reserved_for_a_job_that_waits_for_its_quota():
    cohorts = Cohorts({"lab": {"ml": {"default": {"gpus": 4}}, "cv": {"default": {"gpus": 4}}}})
    fits = cohort_fits(cohorts, "lab")
    running = [job(3, max_runtime=600, started=0, group="cv"), job(4, max_runtime=60, started=0, group="ml")]
    held = reserve(job(4, group="ml"), running, fits, "cohort 'lab' in pool 'default'", NOW)
    assert held.start == NOW + timedelta(seconds=60) and held.held == [running[0]]
    assert held.admits(job(1, max_runtime=30, group="cv"), NOW)  # ends before
    assert held.admits(job(1, max_runtime=3600, group="cv"), NOW)  # cv's 4th GPU: still fits beside it
    assert not held.admits(job(1, max_runtime=3600, group="ml"), NOW)
    assert "cohort 'lab' in pool 'default' is reserved for job" in held.reason()
    assert reserve(job(9, group="ml"), [], fits, "cohort", NOW) is None  # more than the cohort has


@pytest.mark.parametrize("seed", range(30))
def test_backfill_never_delays_the_reservation(seed):
    """Jobs arrive in FIFO order onto 8 GPUs; each pass starts the head if it fits, else reserves for it and backfills
    the rest by the rules. Jobs end at their runtime, at most their max_runtime. A reserved job starts no later than
    the first start it was given."""
    rng = random.Random(seed)
    queue = []
    for _ in range(40):
        runtime = rng.randint(1, 30)
        queue.append(
            SimpleNamespace(
                **vars(job(rng.choice([1, 1, 2, 8]), max_runtime=runtime + rng.randint(0, 10))), runtime=runtime
            )
        )
    running, promised, started = [], {}, {}
    for second in range(2000):
        now = NOW + timedelta(seconds=second)
        running = [r for r in running if r.started_at + timedelta(seconds=r.runtime) > now]
        held = None
        for candidate in list(queue):
            free = POOL.gpus - sum(r.gpus for r in running)
            if candidate.gpus > free:
                if held is None:
                    held = reserve(candidate, running, FITS, "pool 'default'", now)
                    promised.setdefault(candidate.id, held.start)
                continue
            if held is not None and not held.admits(candidate, now):
                continue
            candidate.started_at = now
            started[candidate.id] = now
            queue.remove(candidate)
            running.append(candidate)
        if not queue:
            break
    assert not queue, "every job ran"
    for job_id, start in promised.items():
        assert started[job_id] <= start, f"job {job_id} started {started[job_id]}, promised {start}"
    assert len(promised) > 3  # reservations were made, and kept


def test_the_longest_waiting_job_the_pool_could_hold_holds_it_until_it_starts():
    capacity = {"default": POOL}
    ledger = Ledger()
    too_big, older, newer = job(9), job(6), job(6)
    too_big.created_at, older.created_at, newer.created_at = NOW, NOW + timedelta(seconds=1), NOW + timedelta(seconds=2)
    reservations = Reservations()
    scope = ("pool", "default")
    reservations.choose([(newer, scope), (too_big, scope), (older, scope)], capacity, ledger)
    assert reservations.holders() == [older.id]  # the oldest could never fit: it holds nothing
    running = [job(4, max_runtime=100, started=0)]
    for r in running:
        ledger.charge(r)
    limits = Limits({"max_jobs": None, "max_gpus": None}, {})
    reservations.begin([older], capacity, ledger, limits, running, NOW)
    assert reservations.held_by(older.id).start == NOW + timedelta(seconds=100)
    assert reservations.delayed(job(3), ledger, NOW) is not None  # would run past the start, nothing spare
    assert reservations.delayed(job(2, max_runtime=50), ledger, NOW) is None
    reservations.begin([], capacity, ledger, limits, running, NOW)  # it started: nobody holds the pool
    assert reservations.holders() == [] and reservations.held_by(older.id) is None
