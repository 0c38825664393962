"""gpulab-jobs' scheduling policy (gpulab/services/jobs/policy.py), rule by rule, without a database or an
executor: jobs are plain objects with the scheduling columns."""

from datetime import datetime, timedelta
from types import SimpleNamespace

import pytest

from gpulab.services.jobs.cohorts import Cohorts
from gpulab.services.jobs.executors.base import PoolCapacity
from gpulab.services.jobs.fair_share import Shares
from gpulab.services.jobs.policy import BATCH, Ledger, Limits, Usage, blocker, gpu_ids, retry_delay, turn
from gpulab.services.jobs.views import pool_views, quota_view

T0 = datetime(2026, 12, 1, 12, 0)
CAPACITY = {"default": PoolCapacity(gpus=2, cpus=4.0, memory=8 * 2**30), "cpu": PoolCapacity(gpus=0, cpus=1.0)}
NO_QUOTA = Limits({"max_jobs": None, "max_gpus": None}, {})


def job(owner="alice", gpus=0, cpus=1.0, memory=None, pool="default", groups=(), global_priority=0, age=0, array=None):
    return SimpleNamespace(
        array_id=array[0] if array else None,
        array_max=array[1] if array else None,
        owner=owner,
        gpus=gpus,
        cpus=cpus,
        memory=memory,
        pool=pool,
        groups=list(groups),
        global_priority=global_priority,
        created_at=T0 + timedelta(seconds=age),
    )


def ledger_of(*jobs, gpu_ids_of=None) -> Ledger:
    ledger = Ledger()
    for j in jobs:
        ledger.charge(j, (gpu_ids_of or {}).get(id(j), ()))
    return ledger


def test_a_job_array_runs_at_most_max_concurrent_of_its_jobs_at_once():
    running = ledger_of(job(array=("a1", 2)), job(array=("a1", 2)), job(array=("b2", None)))
    assert blocker(job(array=("a1", 2)), CAPACITY, running, NO_QUOTA) == (
        "waiting: array max_concurrent=2 reached (2 running)"
    )
    assert running.full_arrays() == ["a1"]
    assert blocker(job(array=("b2", None)), CAPACITY, running, NO_QUOTA) is None  # no throttle: only capacity
    assert blocker(job(array=("c3", 1)), CAPACITY, running, NO_QUOTA) is None  # another array's count is its own


def test_nothing_new_starts_in_a_draining_pool():
    draining = {"default": PoolCapacity(gpus=2, cpus=4.0, draining=True)}
    assert blocker(job(), draining, Ledger(), NO_QUOTA) == (
        "waiting: pool 'default' is draining (an admin stopped new jobs there)"
    )


def test_a_job_that_fits_has_no_blocker():
    assert blocker(job(gpus=2, cpus=4.0, memory=8 * 2**30), CAPACITY, Ledger(), NO_QUOTA) is None


@pytest.mark.parametrize(
    "limits, running, candidate, reason",
    [
        (Limits({"max_jobs": 1, "max_gpus": None}, {}), [job()], job(), "waiting: quota max_jobs=1 reached"),
        (
            Limits({"max_jobs": None, "max_gpus": 1}, {}),
            [job(gpus=1)],
            job(gpus=1),
            "waiting: quota max_gpus=1 reached (1 in use, job needs 1)",
        ),
        (
            Limits({"max_jobs": None, "max_gpus": None}, {"ml": {"max_jobs": 1}}),
            [job("bob", groups=["ml"])],
            job(groups=["ml"]),
            "waiting: group 'ml' quota max_jobs=1 reached",
        ),
        (
            Limits({"max_jobs": None, "max_gpus": None}, {"ml": {"max_gpus": 2}}),
            [job("bob", gpus=1, groups=["ml"])],
            job(gpus=2, groups=["ml"]),
            "waiting: group 'ml' quota max_gpus=2 reached (1 in use, job needs 2)",
        ),
    ],
)
def test_quotas_block_with_a_reason_naming_the_limit(limits, running, candidate, reason):
    assert blocker(candidate, CAPACITY, ledger_of(*running), limits) == reason


def test_another_users_jobs_do_not_count_against_my_quota():
    limits = Limits({"max_jobs": 1, "max_gpus": 1}, {"ml": {"max_jobs": 1}})
    assert (
        blocker(job(gpus=1, groups=["other"]), CAPACITY, ledger_of(job("bob", gpus=1, groups=["ml"])), limits) is None
    )


@pytest.mark.parametrize(
    "running, candidate, reason",
    [
        ([], job(pool="gpu"), "waiting: no pool 'gpu' (pools: cpu, default)"),
        ([job(gpus=1)], job("bob", gpus=2), "waiting: no GPU capacity in pool 'default' (1 of 2 free)"),
        ([job(cpus=3.5)], job("bob", cpus=1.0), "waiting: no CPU capacity in pool 'default' (0.5 of 4 free)"),
        ([job(memory=6 * 2**30)], job("bob", memory=4 * 2**30), "waiting: not enough memory in pool 'default'"),
    ],
)
def test_capacity_blocks_with_what_is_free(running, candidate, reason):
    assert blocker(candidate, CAPACITY, ledger_of(*running), NO_QUOTA) == reason


def test_fractional_cpus_add_up_to_the_pool():
    running = [job(pool="cpu", cpus=0.1), job(pool="cpu", cpus=0.1), job(pool="cpu", cpus=0.1)]
    assert blocker(job(pool="cpu", cpus=0.7), CAPACITY, ledger_of(*running), NO_QUOTA) is None
    assert blocker(job(pool="cpu", cpus=0.71), CAPACITY, ledger_of(*running), NO_QUOTA) is not None


def test_turns_go_by_admin_priority_then_fewest_gpus_then_fewest_jobs_then_age():
    used = {"heavy": Usage(jobs=1, gpus=2), "busy": Usage(jobs=3), "idle": Usage(), "late": Usage()}
    heads = {
        "heavy": job("heavy", age=0),
        "busy": job("busy", age=1),
        "idle": job("idle", age=5),
        "late": job("late", age=9),
    }
    order = sorted(heads, key=lambda o: turn(heads[o], used[o]))
    assert order == ["idle", "late", "busy", "heavy"]
    heads["heavy"].global_priority = 10  # an admin's priority beats fair share
    assert min(heads, key=lambda o: turn(heads[o], used[o])) == "heavy"


def test_gpu_ids_are_the_lowest_free_ones_of_the_pool():
    first, second = job(gpus=1), job("bob", gpus=1)
    ledger = ledger_of(first, gpu_ids_of={id(first): [0]})
    assert gpu_ids(second, CAPACITY, ledger) == [1]
    ledger.charge(second, [1])
    assert gpu_ids(job("carol", gpus=1), CAPACITY, ledger) == []
    assert ledger.pools["default"] == Usage(jobs=2, gpus=2, cpus=2.0)


def test_the_ledger_charges_owner_groups_and_pool():
    ledger = ledger_of(job(gpus=1, memory=100, groups=["ml", "cv"]), job(cpus=0.5, groups=["ml"]))
    assert ledger.owners["alice"] == Usage(jobs=2, gpus=1, cpus=1.5, memory=100)
    assert (ledger.groups["ml"].jobs, ledger.groups["cv"].jobs, ledger.pools["default"].jobs) == (2, 1, 2)


def test_room_is_what_max_jobs_leaves_or_a_batch():
    assert Limits({"max_jobs": 3}, {}).room(Usage(jobs=1)) == 2
    assert Limits({"max_jobs": 3}, {}).room(Usage(jobs=5)) == 0
    assert Limits({"max_jobs": None}, {}).room(Usage(jobs=500)) == BATCH


def test_retries_back_off_doubling_to_the_cap_then_stop():
    assert [retry_delay(a, 5, 5.0, 30.0) for a in range(1, 7)] == [5.0, 10.0, 20.0, 30.0, 30.0, None]
    assert retry_delay(1, 0, 5.0, 30.0) is None


# the API's views of the queue (views.py), from what the store reports


def test_the_quota_view_shows_the_owners_limits_and_each_of_their_groups_with_a_quota():
    active = [job("alice", gpus=1, groups=["ml"]), job("bob", gpus=2, groups=["ml", "cv"]), job("carol")]
    quota = quota_view(
        Usage(jobs=1, gpus=1),
        {"max_jobs": 8, "max_gpus": None},
        ["ml", "hr"],  # hr has no quota: not shown
        {"ml": {"max_gpus": 4}, "cv": {"max_jobs": 1}},  # cv is not alice's
        active,
        Cohorts({}),
        Shares(),
        "alice",
    )
    assert quota.model_dump() == {
        "limits": {"max_jobs": 8, "max_gpus": None},
        "usage": {"jobs": 1, "gpus": 1},
        "groups": {"ml": {"limits": {"max_jobs": None, "max_gpus": 4}, "usage": {"jobs": 2, "gpus": 3}}},
        "cohorts": {},
        "cohort_group": None,
        "decayed_usage": 0.0,
    }


def test_the_pool_view_lists_the_executors_pools_with_their_use_and_queue():
    used = {"default": Usage(jobs=1, gpus=1, cpus=2.0), "gone": Usage(jobs=1, gpus=1)}  # a pool no longer offered
    pools = [p.model_dump() for p in pool_views(CAPACITY, used, {"cpu": 3})]
    assert [{k: v for k, v in p.items() if k != "draining"} for p in pools] == [
        {"name": "cpu", "capacity": {"gpus": 0, "cpus": 1.0}, "used": {"gpus": 0, "cpus": 0.0}, "queued": 3},
        {"name": "default", "capacity": {"gpus": 2, "cpus": 4.0}, "used": {"gpus": 1, "cpus": 2.0}, "queued": 0},
    ]
    assert {p["draining"] for p in pools} == {False}
