"""Quotas as cohorts (gpulab/services/jobs/cohorts.py), in Kueue's scenarios, without a database or an executor:
nominal quota, borrowing up to what the cohort's other groups leave idle and the borrower's borrowing_limit,
lending_limit keeping part of a group's quota its own, jobs within nominal before borrowers, and the numbers
GET /quota shows."""

from datetime import datetime, timedelta
from types import SimpleNamespace

import pytest

from gpulab.services.jobs.cohorts import CohortConfigError, Cohorts, CohortUse, Quota
from gpulab.services.jobs.executors.base import PoolCapacity
from gpulab.services.jobs.fair_share import Shares
from gpulab.services.jobs.policy import Ledger, Limits, Usage, blocker, turn
from gpulab.services.jobs.views import quota_view

T0 = datetime(2026, 12, 1, 12, 0)
BIG = {"default": PoolCapacity(gpus=64, cpus=256.0), "cpu": PoolCapacity(gpus=0, cpus=64.0)}
NO_QUOTA = Limits({"max_jobs": None, "max_gpus": None}, {})
RESEARCH = {
    "research": {
        "ml": {"default": {"gpus": 4}},
        "vision": {"default": {"gpus": {"nominal": 4, "borrowing_limit": 2}}},
        "nlp": {"default": {"gpus": {"nominal": 4, "lending_limit": 1}}},
    },
    "ops": {"infra": {"default": {"gpus": 2}}},
}


def job(group, gpus=1, owner="alice", asked=None, pool="default", age=0, cpus=1.0, memory=None):
    return SimpleNamespace(
        owner=owner,
        groups=[group] if group else [],
        asked_group=asked,
        gpus=gpus,
        cpus=cpus,
        memory=memory,
        pool=pool,
        global_priority=0,
        created_at=T0 + timedelta(seconds=age),
        array_id=None,
        array_max=None,
    )


def ledger(cohorts: Cohorts, *running) -> Ledger:
    out = Ledger(cohorts)
    for each in running:
        out.charge(each)
    return out


def why(candidate, *running, config=RESEARCH) -> str | None:
    return blocker(candidate, BIG, ledger(Cohorts(config), *running), NO_QUOTA)


def test_a_group_uses_its_nominal_quota_and_borrows_what_the_others_leave_idle():
    assert why(job("ml", gpus=4)) is None
    # ml borrows: vision's 4 and nlp's lendable 1 are idle (nlp keeps 3 with lending_limit 1)
    assert why(job("ml", gpus=5), job("ml", gpus=4)) is None
    assert why(job("ml", gpus=1), job("ml", gpus=9)) == (
        "waiting: cohort 'research' has no gpus left in pool 'default' for group 'ml' to borrow (nominal 4, 9 in use)"
    )
    # another cohort's idle quota is not lendable
    assert why(job("infra", gpus=3)) == (
        "waiting: cohort 'ops' has no gpus left in pool 'default' for group 'infra' to borrow (nominal 2, 0 in use)"
    )


def test_cohorts_lending_to_each_other_are_one_root_cohort():
    cohorts = Cohorts(RESEARCH, lend_between=True)
    ledger_now = ledger(cohorts)
    # infra's cohort ops has 2; with lending between cohorts it borrows research's idle quota (4 + 4 + 1)
    assert cohorts.blocker(job("infra", gpus=11), "infra", ledger_now.cohort_use) is None
    assert cohorts.blocker(job("infra", gpus=12), "infra", ledger_now.cohort_use) == (
        "waiting: no cohort has gpus left in pool 'default' for group 'infra' to borrow (nominal 2, 0 in use)"
    )
    assert cohorts.lend_to_each_other("infra", "ml") and not Cohorts(RESEARCH).lend_to_each_other("infra", "ml")
    assert cohorts.fit([job("infra", gpus=11)], "ops") and not Cohorts(RESEARCH).fit([job("infra", gpus=11)], "ops")


def test_a_borrowing_limit_caps_what_a_group_takes_beyond_its_nominal_quota():
    assert why(job("vision", gpus=6)) is None
    assert why(job("vision", gpus=1), job("vision", gpus=6)) == (
        "waiting: group 'vision' may use at most 6 gpus in pool 'default' "
        "(nominal 4 + borrowing_limit 2; 6 in use, job needs 1)"
    )


def test_a_lending_limit_keeps_the_rest_of_a_groups_quota_its_own():
    # ml and vision use all the cohort lends (4 + 4 of theirs and 1 of nlp's): nlp still gets its guaranteed 3
    running = [job("ml", gpus=5), job("vision", gpus=4)]
    assert why(job("nlp", gpus=3), *running) is None
    assert why(job("nlp", gpus=4), *running) == (
        "waiting: cohort 'research' has no gpus left in pool 'default' for group 'nlp' within its nominal quota "
        "(nominal 4, 0 in use)"
    )
    # without a lending limit, a borrower can take all of an idle group's quota, which it waits to get back
    assert why(job("ml", gpus=1), job("vision", gpus=6), job("nlp", gpus=3), job("ml", gpus=3)) == (
        "waiting: cohort 'research' has no gpus left in pool 'default' for group 'ml' within its nominal quota "
        "(nominal 4, 3 in use)"
    )


def test_jobs_within_nominal_quota_go_before_jobs_that_would_borrow():
    cohorts = Cohorts(RESEARCH)
    now = ledger(cohorts, job("ml", gpus=4, owner="bob"))
    borrower, owner_of_quota = job("ml", owner="carol", age=0), job("vision", owner="dave", age=60)
    assert now.borrows(borrower) and not now.borrows(owner_of_quota)
    heads = [borrower, owner_of_quota]
    first = min(heads, key=lambda head: turn(head, Usage(), now.borrows(head)))
    assert first is owner_of_quota  # younger, but within its group's quota
    assert not now.borrows(job(None))  # in no cohort: never borrowing


def test_what_a_group_does_not_list_is_not_limited_by_its_cohort():
    assert why(job("ml", gpus=0, cpus=200.0)) is None  # cpus not listed
    assert why(job("ml", gpus=0, pool="cpu", cpus=60.0)) is None  # pool not listed
    assert why(job(None, gpus=40)) is None  # in no cohort's group: pool capacity only


def test_cpus_and_memory_quotas_add_up_and_name_their_unit():
    config = {"c": {"a": {"default": {"cpus": 1.0, "memory": "4Gi"}}}}
    assert why(job("a", 0, cpus=0.3), job("a", 0, cpus=0.35), job("a", 0, cpus=0.35), config=config) is None
    assert why(job("a", 0, cpus=0.1, memory=2**30), job("a", 0, cpus=0.1, memory=4 * 2**30), config=config) == (
        "waiting: cohort 'c' has no memory left in pool 'default' for group 'a' to borrow (nominal 4Gi, 4Gi in use)"
    )


def test_the_group_a_job_uses():
    cohorts = Cohorts(RESEARCH, default_group="infra")
    multi = SimpleNamespace(groups=["zeta", "vision", "ml"], asked_group=None)
    assert cohorts.group_of(multi) == "ml"  # the first of the owner's groups in a cohort
    assert cohorts.group_of(SimpleNamespace(groups=["ml", "vision"], asked_group="vision")) == "vision"
    assert cohorts.group_of(SimpleNamespace(groups=["students"], asked_group=None)) == "infra"
    assert Cohorts(RESEARCH).group_of(SimpleNamespace(groups=["students"], asked_group=None)) is None
    # a group asked for that left the configuration: chosen as if none was asked for
    assert cohorts.group_of(SimpleNamespace(groups=["ml"], asked_group="gone")) == "ml"


def test_numbers_say_what_each_group_uses_borrows_and_lends():
    cohorts = Cohorts(RESEARCH)
    use = CohortUse()
    for group, gpus in (("ml", 7), ("vision", 1)):
        use.charge(group, job(group, gpus=gpus))
    numbers = {g: pools["default"]["gpus"] for g, pools in cohorts.numbers("research", use).items()}
    assert (numbers["ml"].used, numbers["ml"].borrowed, numbers["ml"].lent) == (7, 3, 0)
    # 3 borrowed out of the idle lendable quota: vision's 3, nlp's 1 (it keeps 3): lent 3/4 each
    assert (numbers["vision"].used, numbers["vision"].borrowed, numbers["vision"].lent) == (1, 0, 2.25)
    assert (numbers["nlp"].nominal, numbers["nlp"].lending_limit, numbers["nlp"].lent) == (4, 1, 0.75)
    assert sum(n.lent for n in numbers.values()) == sum(n.borrowed for n in numbers.values())
    assert numbers["vision"].borrowing_limit == 2 and numbers["ml"].borrowing_limit is None


def test_the_quota_view_shows_the_cohorts_of_the_owners_groups_or_every_cohort_to_admins():
    active = [job("ml", gpus=6, owner="bob"), job("infra", gpus=1, owner="carol"), job(None, gpus=1)]
    shares = Shares({"user:alice": 7.0, "group:ml": 30.0}, {"ml": 2.0})
    args = (
        Usage(),
        {"max_jobs": 8, "max_gpus": None},
        ["vision", "hr"],
        {},
        active,
        Cohorts(RESEARCH),
        shares,
        "alice",
    )
    quota = quota_view(*args)
    assert (list(quota.cohorts), quota.cohort_group) == (["research"], "vision")
    gpus = {g: pools["default"]["gpus"] for g, pools in quota.cohorts["research"].groups.items()}
    assert (gpus["ml"].used, gpus["ml"].borrowed, gpus["vision"].used, gpus["vision"].lent) == (6, 2, 0, 1.6)
    assert quota.decayed_usage == 7.0 and quota.cohorts["research"].decayed_usage["ml"] == 30.0
    assert quota.cohorts["research"].weights == {"ml": 2.0, "nlp": 1.0, "vision": 1.0}
    assert list(quota_view(*args, every_cohort=True).cohorts) == ["ops", "research"]
    assert quota_view(*args[:2], ["hr"], *args[3:]).cohorts == {}


def test_quota_limits():
    quota = Quota(nominal=4, borrowing_limit=2, lending_limit=1)
    assert (quota.guaranteed, quota.ceiling) == (3, 6)
    assert (Quota(nominal=4).guaranteed, Quota(nominal=4).ceiling) == (0, float("inf"))


@pytest.mark.parametrize(
    "config, message",
    [
        ([], "cohorts must be a dict"),
        ({"c": {}}, "cohorts['c'] must be a non-empty dict"),
        ({"c": {"a": {"default": {"gpu": 1}}}}, "cohorts['c']['a']['default']: 'gpu' is not a resource (give gpus,"),
        ({"c": {"a": {"default": {"gpus": -1}}}}, "cohorts['c']['a']['default']['gpus']['nominal'] must be a number"),
        ({"c": {"a": {"default": {"gpus": 1.5}}}}, "must be a whole number of GPUs"),
        ({"c": {"a": {"default": {"gpus": True}}}}, "['gpus']['nominal'] must be a number >= 0"),
        ({"c": {"a": {"default": {"gpus": {"borrowing_limit": 1}}}}}, "['gpus']: give its 'nominal' quota"),
        ({"c": {"a": {"default": {"gpus": {"nominal": 1, "lend": 1}}}}}, "'lend' is not a quota setting"),
        ({"c": {"a": {"default": {"gpus": {"nominal": 1, "lending_limit": 2}}}}}, "lending_limit 2 is more than"),
        ({"c": {"a": {"default": {"memory": "lots"}}}}, "['memory']['nominal']: must be a number of bytes or"),
        ({"c": {"a": {}}, "d": {"a": {}}}, "cohorts['d']['a']: group 'a' is in cohort 'c' already"),
        ({"c": {"a": []}}, "cohorts['c']['a'] must be a dict {pool: {resource: quota}}"),
        ({"": {"a": {}}}, "cohorts['']: names must be strings of 1 to 64 characters"),
    ],
)
def test_a_malformed_configuration_names_the_entry(config, message):
    with pytest.raises(CohortConfigError) as e:
        Cohorts(config)
    assert message in str(e.value)


def test_the_default_group_must_be_in_a_cohort():
    with pytest.raises(CohortConfigError, match="cohort_default_group 'students' is in no cohort"):
        Cohorts(RESEARCH, default_group="students")
