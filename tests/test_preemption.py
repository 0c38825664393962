"""Preemption (gpulab/services/jobs/preemption.py) in Kueue's scenarios, without a database or an executor: reclaim
takes only borrowed quota back, LowerPriority stays within a group, victims come borrowers first, then lowest
priority, then most recently started, in the smallest set that frees enough; young and non-preemptible jobs are
exempt; and, as Kueue proves for its rules, two jobs never preempt each other back and forth."""

import random
from datetime import datetime, timedelta
from itertools import count
from types import SimpleNamespace

import pytest

from gpulab.services.jobs.cohorts import Cohorts
from gpulab.services.jobs.executors.base import PoolCapacity
from gpulab.services.jobs.policy import Ledger, Limits, Usage, blocker, turn
from gpulab.services.jobs.preemption import plan

NOW = datetime(2026, 12, 7, 12, 0)
NO_QUOTA = Limits({"max_jobs": None, "max_gpus": None}, {})
LAB = {"lab": {"ml": {"default": {"gpus": 4}}, "cv": {"default": {"gpus": 4}}}}
ids = count()


def job(group, gpus=1, owner="alice", priority=0, admin_priority=0, preemptible=True, started=None, state="running"):
    return SimpleNamespace(
        id=f"j{next(ids)}",
        owner=owner,
        groups=[group] if group else [],
        asked_group=None,
        gpus=gpus,
        cpus=0.0,
        memory=None,
        pool="default",
        priority=priority,
        global_priority=admin_priority,
        created_at=NOW,
        array_id=None,
        array_max=None,
        preemptible=preemptible,
        state=state,
        started_at=NOW - timedelta(seconds=3600 if started is None else started),
        preemptions=0,
    )


def victims(candidate, running, gpus=8, config=LAB, min_runtime=0.0):
    capacity = {"default": PoolCapacity(gpus=gpus, cpus=64.0)}
    found = plan(candidate, running, capacity, NO_QUOTA, Cohorts(config), NOW, min_runtime)
    return (found.victims, found.reasons) if found else ([], {})


def test_a_group_reclaims_what_another_group_borrowed_and_only_that():
    own = [job("ml", owner="bob", started=9000) for _ in range(4)]  # ml's own quota
    borrowed = [job("ml", owner="bob", started=600 - i) for i in range(4)]  # cv's
    chosen, reasons = victims(job("cv", gpus=2, owner="carol"), own + borrowed)
    assert chosen == [borrowed[3], borrowed[2]]  # the most recently started of the borrower's jobs first
    assert set(reasons.values()) == {"reclaim of group cv's quota in cohort lab"}
    # a job that would itself borrow reclaims nothing
    assert victims(job("cv", gpus=5, owner="carol"), own + borrowed) == ([], {})


def test_with_lending_between_cohorts_a_group_reclaims_from_another_cohort():
    two = {"a": {"ml": {"default": {"gpus": 4}}}, "b": {"cv": {"default": {"gpus": 4}}}}
    borrowed = [job("ml", gpus=4, started=9000), job("ml", gpus=2, started=60)]  # 2 of cohort b's
    capacity = {"default": PoolCapacity(gpus=8, cpus=64.0)}
    found = plan(job("cv", gpus=4, owner="carol"), borrowed, capacity, NO_QUOTA, Cohorts(two, lend_between=True), NOW)
    assert found.victims == [borrowed[1]] and found.reasons[borrowed[1].id] == "reclaim of group cv's quota in cohort b"
    assert plan(job("cv", gpus=4, owner="carol"), borrowed, capacity, NO_QUOTA, Cohorts(two), NOW) is None


def test_nothing_is_reclaimed_from_a_group_within_its_nominal_quota():
    running = [job("ml", gpus=4), job("cv", gpus=4)]
    assert victims(job("cv", owner="carol"), running) == ([], {})  # cv is at its own quota: it waits


def test_victims_are_the_smallest_set_that_frees_enough():
    # the order picks the newest one-GPU job first, then the 3-GPU one, which alone is enough: the first is given back
    small, big = job("ml", gpus=1, started=10), job("ml", gpus=3, started=20)
    running = [job("ml", gpus=4, started=9000), big, small]
    chosen, _ = victims(job("cv", gpus=3, owner="carol"), running)
    assert chosen == [big]


def test_lower_priority_within_a_group():
    low, mine_low = job("ml", owner="bob"), job("ml", owner="alice", priority=-5)
    running = [low, mine_low, *(job("ml", owner="bob", preemptible=False) for _ in range(6))]
    # alice's own lower-priority job is the only one her priority outranks: bob's needs an admin's priority
    chosen, reasons = victims(job("ml", owner="alice", priority=10), running)
    assert chosen == [mine_low] and reasons[mine_low.id] == "alice's priority 10 over -5"
    chosen, reasons = victims(job("ml", owner="dave", admin_priority=50), running)
    assert len(chosen) == 1 and reasons[chosen[0].id] == "priority 50 over 0"
    # equal priority: no victim
    assert victims(job("ml", owner="dave"), running) == ([], {})
    # another group's jobs within its quota are not a lower priority's victims
    cv = [job("cv", gpus=4, owner="carol")]
    assert victims(job("ml", owner="dave", admin_priority=50), [job("ml", gpus=4, preemptible=False), *cv]) == (
        [],
        {},
    )


def test_a_higher_priority_takes_what_other_groups_borrow_not_their_nominal_quota():
    three = {"lab": {g: {"default": {"gpus": 4}} for g in ("ml", "cv", "nlp")}}  # nlp idle: the others borrow
    ml = [job("ml", gpus=4, owner="bob", preemptible=False)]
    # cv borrows 2 of nlp's; its newest job (4 GPUs) would take cv below its nominal 4, so the older 2-GPU one goes
    cv = [job("cv", gpus=2, owner="carol", started=3600), job("cv", gpus=4, owner="carol", started=60)]
    urgent = job("ml", gpus=2, owner="dave", admin_priority=50)  # would borrow nlp's other 2; the pool is full
    chosen, reasons = victims(urgent, ml + cv, gpus=10, config=three)
    assert chosen == [cv[0]] and reasons[cv[0].id] == "priority 50 over 0, of what group cv borrows"
    assert victims(job("ml", gpus=2, owner="dave"), ml + cv, gpus=10, config=three) == ([], {})  # same priority
    within = [job("cv", gpus=4, owner="carol"), *ml]  # cv within its nominal quota: not a victim
    assert victims(job("ml", gpus=2, owner="dave", admin_priority=50), within, gpus=8, config=three) == ([], {})


def test_equal_priority_victims_go_most_recently_started_first():
    older, newer = job("ml", started=500), job("ml", started=100)
    running = [job("ml", gpus=6, preemptible=False), older, newer]
    chosen, _ = victims(job("ml", owner="dave", admin_priority=1), running)
    assert chosen == [newer]


def test_borrowers_go_before_lower_priority_jobs_of_the_own_group():
    # cv (within nominal) needs 2: ml borrows 2 of cv's; cv's own low-priority job is also a candidate
    cv_low = job("cv", owner="carol", priority=-10, started=10)
    running = [job("ml", gpus=4, started=9000), job("ml", gpus=2, started=900), cv_low, job("cv", gpus=1)]
    chosen, reasons = victims(job("cv", gpus=2, owner="carol", priority=5), running, gpus=8)
    assert [reasons[v.id] for v in chosen] == ["reclaim of group cv's quota in cohort lab"]


def test_young_and_non_preemptible_jobs_are_exempt():
    running = [job("ml", gpus=4, started=9000, preemptible=False), job("ml", gpus=4, started=30)]
    assert victims(job("cv", owner="carol"), running, min_runtime=60) == ([], {})
    assert len(victims(job("cv", owner="carol"), running, min_runtime=10)[0]) == 1
    dispatching = [job("ml", gpus=4, started=9000, preemptible=False), job("ml", gpus=4, state="dispatching")]
    assert victims(job("cv", owner="carol"), dispatching) == ([], {})


def test_a_job_that_fits_or_cannot_be_helped_preempts_nothing():
    assert victims(job("cv"), [job("ml", gpus=2)]) == ([], {})  # fits
    outside = {"lab": {"ml": {"cpu": {"gpus": 1}}}}  # no cohort quota in the job's pool: pool capacity only
    assert victims(job(None, gpus=2), [job(None, gpus=8)], config=outside) == ([], {})


@pytest.mark.parametrize("seed", range(40))
def test_no_two_jobs_preempt_each_other_back_and_forth(seed):
    """A random cohort workload runs pass after pass: dispatch in turn order, else preempt for the first blocked
    job that preemption helps (victims requeue at once). Whoever preempted whom, the reverse never happens."""
    rng = random.Random(seed)
    groups = ["a", "b", "c"]
    config = {
        "lab": {
            g: {"default": {"gpus": {"nominal": rng.randint(1, 3), "lending_limit": rng.choice([None, 0, 1])}}}
            for g in groups
        }
    }
    for quota in config["lab"].values():
        gpus = quota["default"]["gpus"]
        if gpus["lending_limit"] is None or gpus["lending_limit"] > gpus["nominal"]:
            del gpus["lending_limit"]
    cohorts = Cohorts(config)
    capacity = {
        "default": PoolCapacity(gpus=sum(cohorts.quotas[g]["default", "gpus"].nominal for g in groups), cpus=64)
    }
    queued = [
        job(
            rng.choice(groups),
            gpus=rng.randint(1, 2),
            owner=rng.choice(["u1", "u2", "u3"]),
            priority=rng.randint(0, 2),
            admin_priority=rng.choice([0, 0, 5]),
            preemptible=rng.random() < 0.8,
            state="queued",
        )
        for _ in range(14)
    ]
    running, preempted = [], set()
    for step in range(60):
        now = NOW + timedelta(seconds=step)
        ledger = Ledger(cohorts)
        for r in running:
            ledger.charge(r)
        order = sorted(queued, key=lambda j: turn(j, Usage(), ledger.borrows(j)))
        fit = next((j for j in order if blocker(j, capacity, ledger, NO_QUOTA) is None), None)
        if fit is not None:
            fit.state, fit.started_at = "running", now
            queued.remove(fit)
            running.append(fit)
            continue
        found = next(
            (p for j in order if (p := plan(j, running, capacity, NO_QUOTA, cohorts, now + timedelta(hours=1)))), None
        )
        if found is None:
            if running and rng.random() < 0.5:  # a job ends now and then
                ended = rng.choice(running)
                running.remove(ended)
            continue
        for victim in found.victims:
            assert (victim.id, found.job.id) not in preempted, f"{found.job.id} and {victim.id} preempt each other"
            preempted.add((found.job.id, victim.id))
            victim.state = "queued"
            running.remove(victim)
            queued.append(victim)
