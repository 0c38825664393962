"""Fair share from history (gpulab/services/jobs/fair_share.py): usage decays with its half-life, is charged per
user and cohort group with the resource weights, orders turns before "fewest running GPUs" (which stays the
tie-break), counts per group weight, interleaves equal users through the entry penalty, and survives a restart
of the store."""

from datetime import datetime, timedelta
from types import SimpleNamespace

import pytest

from gpulab.services.jobs.fair_share import DEFAULT_WEIGHTS, Shares, charges, decayed, rate
from gpulab.services.jobs.policy import Usage, turn
from gpulab.services.jobs.store import JobStore

T0 = datetime(2026, 12, 7, 12, 0)
DAY = 24 * 3600.0


def job(owner, gpus=0, cpus=1.0, memory=None, age=0):
    return SimpleNamespace(
        owner=owner, gpus=gpus, cpus=cpus, memory=memory, global_priority=0, created_at=T0 + timedelta(seconds=age)
    )


def test_usage_halves_every_half_life():
    assert decayed(100.0, T0, T0 + timedelta(days=7), 7 * DAY) == pytest.approx(50.0)
    assert decayed(100.0, T0, T0 + timedelta(days=21), 7 * DAY) == pytest.approx(12.5)
    assert decayed(100.0, T0, T0, 7 * DAY) == 100.0


def test_charges_weigh_each_resource_per_user_and_cohort_group():
    jobs = [job("alice", gpus=2, cpus=8.0), job("bob", cpus=4.0, memory=2 * 2**30), job("carol", cpus=0.0)]
    assert rate(jobs[0], DEFAULT_WEIGHTS) == pytest.approx(2.8)
    weights = {"gpus": 1.0, "cpus": 0.1, "memory": 0.5}
    amounts = charges(jobs, lambda j: 3600.0, weights, lambda j: {"alice": "ml", "bob": "ml"}.get(j.owner))
    assert amounts == pytest.approx({"user:alice": 2.8 * 3600, "user:bob": 1.4 * 3600, "group:ml": 4.2 * 3600})


def test_a_heavy_user_of_last_week_goes_after_one_who_ran_nothing():
    shares = Shares({"user:heavy": 50_000.0})
    heavy, fresh = job("heavy", age=0), job("fresh", age=60)  # the heavy user's job is older, and runs no GPU now
    first = min(
        [heavy, fresh], key=lambda j: turn(j, Usage(gpus=0 if j is heavy else 2), False, shares.of(j.owner, None))
    )
    assert first is fresh
    # equal history: the fewest running GPUs break the tie, as before
    even = Shares()
    first = min(
        [heavy, fresh], key=lambda j: turn(j, Usage(gpus=0 if j is heavy else 2), False, even.of(j.owner, None))
    )
    assert first is heavy


def test_groups_go_by_usage_per_weight_then_users_within_them():
    shares = Shares({"group:ml": 300.0, "group:cv": 200.0, "user:alice": 0.0, "user:bob": 900.0}, {"ml": 2.0})
    assert shares.of("alice", "ml") == (150.0, 0.0)  # ml's weight 2 halves its usage
    assert shares.of("bob", "cv") == (200.0, 900.0)
    assert shares.of("bob", None) == (0.0, 900.0)  # outside cohorts: the user's own only
    assert shares.of("alice", "ml") < shares.of("bob", "cv")


def test_the_entry_penalty_lets_users_with_near_equal_usage_take_turns_in_one_pass():
    shares = Shares({"user:alice": 10.0, "user:bob": 11.0})
    heads = {"alice": job("alice"), "bob": job("bob")}
    started = []
    for _ in range(4):
        owner = min(heads, key=lambda o: turn(heads[o], Usage(), False, shares.of(o, None)))
        started.append(owner)
        shares.add(charges([heads[owner]], lambda j: 60.0, DEFAULT_WEIGHTS, lambda j: None))
    assert started == ["alice", "bob", "alice", "bob"]


def test_usage_is_kept_decayed_across_restarts(tmp_path):
    url = f"sqlite:///{tmp_path / 'jobs.sqlite'}"
    store = JobStore(url=url)
    store.charge_usage({"user:alice": 100.0, "group:ml": 40.0}, 7 * DAY)
    store.charge_usage({"user:alice": 50.0}, 7 * DAY)
    again = JobStore(url=url)  # a restarted service
    usage = again.fair_share_usage(7 * DAY)
    assert usage == pytest.approx({"user:alice": 150.0, "group:ml": 40.0}, rel=1e-4)
    assert again.fair_share_usage(7 * DAY, keys=["group:ml"]) == pytest.approx({"group:ml": 40.0}, rel=1e-4)
    assert again.fair_share_usage(1e-3)["user:alice"] < 150.0  # a tiny half-life: decayed already
