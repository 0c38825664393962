"""Schedules: the rule (pure, on a frozen clock), the scheduler on a real jobs database with the clock it is given,
and the API through a real hub, where a schedule runs while its owner has no server at all."""

import os
import time
from datetime import datetime, timedelta

import pytest
from sqlalchemy.orm import Session

from gpulab.service.storage import utcnow
from gpulab.services.jobs import cron
from gpulab.services.jobs.models import JobSpec, ScheduleSpec, ScheduleUpdate
from gpulab.services.jobs.openapi import SPEC_PATH
from gpulab.services.jobs.queue import JobQueue
from gpulab.services.jobs.schedules import Scheduler, TooManySchedules, plan, run_key
from gpulab.services.jobs.store import JobStore, ScheduleRow, iso
from tests.support.jobs import Client
from tests.support.openapi import Spec

SPEC = Spec(SPEC_PATH)
T0 = datetime(2026, 12, 4, 9, 0, 0)  # naive UTC, as the store keeps times


def row(**fields) -> ScheduleRow:
    values = {
        "id": "a" * 32,
        "cron": "*/10 * * * *",
        "timezone": "UTC",
        "max_concurrent": 1,
        "overlap": "skip",
        "catch_up": "once",
        "next_run_at": T0,
        "last_run_at": None,
        "pending_run": False,
    }
    return ScheduleRow(**{**values, **fields})


# --- cron and time zones ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "error"),
    [
        ("*/5 * * * *", None),
        ("0 9 * * 1-5", None),
        ("@daily", None),
        ("@often", "@often is not one of @hourly"),
        ("* * * *", "must have five fields"),
        ("0 0 * * * *", "must have five fields"),
        ("61 * * * *", "'61 * * * *' is not a valid cron expression"),
    ],
)
def test_cron_expressions(expression, error):
    found = cron.cron_error(expression)
    assert found is None if error is None else error in found, found


def test_times_are_read_in_the_schedules_zone_summer_and_winter():
    assert cron.timezone_error("Mars/Olympus") and cron.timezone_error("Europe/Berlin") is None
    nine = "0 9 * * *"
    assert cron.next_run(nine, "Europe/Berlin", datetime(2026, 7, 1)) == datetime(2026, 7, 1, 7)  # CEST, UTC+2
    assert cron.next_run(nine, "Europe/Berlin", datetime(2026, 12, 1)) == datetime(2026, 12, 1, 8)  # CET, UTC+1
    assert cron.next_run(nine, "UTC", datetime(2026, 12, 1, 9)) == datetime(2026, 12, 2, 9)  # strictly after


# --- the rule --------------------------------------------------------------------------------------------------


def test_a_due_run_starts_when_there_is_room_and_the_next_time_is_after_now():
    outcome = plan(row(), active_runs=0, now=T0 + timedelta(seconds=3), misfire_grace=300)
    assert (outcome.action, outcome.due, outcome.skipped, outcome.pending) == ("start", T0, 0, False)
    assert outcome.next_run_at == T0 + timedelta(minutes=10)


def test_over_max_concurrent_a_run_is_skipped_or_with_queue_waits_once():
    now = T0 + timedelta(seconds=1)
    skip = plan(row(), active_runs=1, now=now, misfire_grace=300)
    assert (skip.action, skip.skipped, skip.pending) == ("skip", 1, False)
    wait = plan(row(overlap="queue"), active_runs=1, now=now, misfire_grace=300)
    assert (wait.action, wait.due, wait.skipped, wait.pending) == ("wait", T0, 0, True)
    # the next time comes while the waiting run still waits: that one is skipped, the waiting one stays
    later = T0 + timedelta(minutes=10)
    waiting = row(overlap="queue", pending_run=True, last_run_at=T0, next_run_at=later)
    again = plan(waiting, active_runs=1, now=later, misfire_grace=300)
    assert (again.action, again.skipped, again.pending) == ("skip", 1, True)
    # room: the waiting run starts, named by its own due time
    room = plan(row(overlap="queue", pending_run=True, last_run_at=T0, next_run_at=later), 0, now, 300)
    assert (room.action, room.due, room.pending, room.next_run_at) == ("start", T0, False, later)


def test_missed_runs_are_run_once_or_skipped_never_one_by_one():
    back = T0 + timedelta(hours=5, minutes=7)  # down for five hours: 31 due times passed, the latest 7 min ago
    once = plan(row(), active_runs=0, now=back, misfire_grace=300)
    assert (once.action, once.due, once.skipped) == ("start", T0 + timedelta(hours=5), 30)
    assert once.next_run_at == T0 + timedelta(hours=5, minutes=10)
    skipped = plan(row(catch_up="skip"), active_runs=0, now=back, misfire_grace=300)
    assert (skipped.action, skipped.skipped, skipped.next_run_at) == ("skip", 31, once.next_run_at)
    on_time = plan(row(catch_up="skip"), active_runs=0, now=T0 + timedelta(seconds=30), misfire_grace=300)
    assert on_time.action == "start"  # within the grace a run is on time, whatever catch_up says


# --- the scheduler on a real database --------------------------------------------------------------------------


@pytest.fixture
def scheduler(tmp_path):
    store = JobStore(url=f"sqlite:///{tmp_path / 'jobs.sqlite'}")
    return Scheduler(JobQueue(store=store, data_dir=str(tmp_path), max_queued=3), max_per_user=2)


def make(scheduler, **fields):
    """A schedule of alice's every ten minutes, next due at its first time after now."""
    spec = ScheduleSpec(name="nightly", cron="*/10 * * * *", job=JobSpec(name="etl", entrypoint=["true"]), **fields)
    return scheduler.schedules.create("alice", ["ml"], False, spec, scheduler.max_per_user)


def test_runs_are_jobs_of_the_owner_started_once_per_due_time(scheduler):
    made = make(scheduler)
    due = made.next_run_at
    assert scheduler.fire_due(due - timedelta(seconds=1)) == 0
    assert scheduler.fire_due(due + timedelta(seconds=2)) == 1
    assert scheduler.fire_due(due + timedelta(seconds=4)) == 0  # not due again until the next time
    jobs, _ = scheduler.queue.store.list_jobs(schedule_id=made.id)
    assert [(j.owner, j.groups, j.state, j.schedule_id) for j in jobs] == [("alice", ["ml"], "queued", made.id)]
    assert jobs[0].idempotency_key == run_key(made.id, due)
    # a run started, then the service died before the schedule was updated: the same due time gives the same job
    assert scheduler.start_run(scheduler.schedules.get(made.id), due).id == jobs[0].id
    after = scheduler.schedules.get(made.id)
    assert (after.runs, after.last_job_id, after.last_run_at) == (1, jobs[0].id, due)
    assert after.next_run_at == due + timedelta(minutes=10)


def test_a_run_still_queued_makes_the_next_one_skip(scheduler):
    made = make(scheduler)
    first = made.next_run_at
    scheduler.fire_due(first)
    scheduler.fire_due(first + timedelta(minutes=10))  # the first is still queued: max_concurrent 1
    after = scheduler.schedules.get(made.id)
    assert (after.runs, after.skipped) == (1, 1)


def test_a_paused_schedule_does_not_run_and_resumes_from_now(scheduler):
    made = make(scheduler)
    paused = scheduler.schedules.update(made.id, ScheduleUpdate(paused=True))
    assert (paused.state, paused.next_run_at) == ("paused", None)
    assert scheduler.fire_due(made.next_run_at + timedelta(days=1)) == 0
    resumed = scheduler.schedules.update(made.id, ScheduleUpdate(paused=False))
    assert resumed.state == "active" and utcnow() < resumed.next_run_at <= utcnow() + timedelta(minutes=10)


def test_a_full_queue_is_told_on_the_schedule_and_the_owner_limit_holds(scheduler):
    made = make(scheduler, max_concurrent=10)
    due = made.next_run_at
    for i in range(4):  # max_queued 3: the fourth run cannot be queued
        scheduler.fire_due(due + timedelta(minutes=10 * i))
    after = scheduler.schedules.get(made.id)
    assert after.runs == 3 and "was not started" in after.last_error and "max_queued" in after.last_error
    make(scheduler)
    with pytest.raises(TooManySchedules, match=r"alice has 2 schedules.*Scheduler.max_per_user"):
        make(scheduler)


# --- the API through a real hub --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hub(gpulab_up):
    config = "c.Platform.mlflow_service = False\nc.JobQueue.tick_interval = 0.2\nc.Scheduler.interval = 0.5\n"
    return gpulab_up(config, users={"alice": [], "bob": []})


@pytest.fixture(scope="module")
def alice(hub):
    return Client(hub, "alice")


def schedule_body(hub, **fields):
    job = {"name": "tick", "entrypoint": ["python", "-c", "print('scheduled run')"]}
    return {"name": "every-minute", "cron": "* * * * *", "job": job, **fields}


def test_a_schedule_runs_while_its_owner_has_no_server(hub, alice):
    assert hub.api("GET", "/users/alice").json()["servers"] == {}  # alice never started one
    r = alice.request("POST", "/schedules", json=schedule_body(hub))
    assert r.status_code == 201, r.text
    made = r.json()
    SPEC.validate("/schedules", "POST", 201, made)
    assert made["state"] == "active" and made["next_run_at"].endswith(":00.000000Z")
    deadline = time.monotonic() + 75  # the next minute, and the run
    runs = []
    while time.monotonic() < deadline and not runs:
        runs = alice.request("GET", "/jobs", params={"schedule": made["id"]}).json()["jobs"]
        time.sleep(0.5)
    assert len(runs) == 1, runs
    done = alice.wait(runs[0]["id"])
    assert done["state"] == "succeeded" and done["schedule_id"] == made["id"]
    assert "scheduled run" in alice.logs(done["id"])
    shown = alice.request("GET", f"/schedules/{made['id']}").json()
    SPEC.validate("/schedules/{schedule_id}", "GET", 200, shown)
    assert shown["runs"] == 1 and shown["last_job_id"] == done["id"] and shown["next_run_at"] > made["next_run_at"]


def test_pause_resume_run_now_and_delete(hub, alice):
    made = alice.request("POST", "/schedules", json=schedule_body(hub, cron="0 3 * * *", timezone="Asia/Tokyo")).json()
    assert made["next_run_at"].endswith("T18:00:00.000000Z")  # 03:00 in Tokyo
    paused = alice.request("PATCH", f"/schedules/{made['id']}", json={"paused": True}).json()
    SPEC.validate("/schedules/{schedule_id}", "PATCH", 200, paused)
    assert (paused["state"], paused["next_run_at"]) == ("paused", None)
    resumed = alice.request("PATCH", f"/schedules/{made['id']}", json={"paused": False}).json()
    assert resumed["state"] == "active" and resumed["next_run_at"] == made["next_run_at"]
    r = alice.request("POST", f"/schedules/{made['id']}/run")
    assert r.status_code == 201, r.text
    SPEC.validate("/schedules/{schedule_id}/run", "POST", 201, r.json())
    run = alice.wait(r.json()["id"])
    assert run["state"] == "succeeded" and run["schedule_id"] == made["id"]
    listed = alice.request("GET", "/schedules").json()
    SPEC.validate("/schedules", "GET", 200, listed)
    assert made["id"] in [s["id"] for s in listed["schedules"]]
    assert alice.request("DELETE", f"/schedules/{made['id']}").status_code == 204
    assert alice.request("GET", f"/schedules/{made['id']}").status_code == 404
    assert alice.request("GET", f"/jobs/{run['id']}").json()["schedule_id"] == made["id"]  # its runs stay


def test_another_users_schedule_is_not_found(hub, alice):
    made = alice.request("POST", "/schedules", json=schedule_body(hub, cron="@yearly")).json()
    bob = Client(hub, "bob")
    for method, path in [("GET", ""), ("PATCH", ""), ("DELETE", ""), ("POST", "/run")]:
        r = bob.request(method, f"/schedules/{made['id']}{path}", json={"paused": True} if method == "PATCH" else None)
        assert r.status_code == 404 and r.json()["error"]["field"] == "id", (method, path, r.text)
    assert made["id"] not in [s["id"] for s in bob.request("GET", "/schedules").json()["schedules"]]
    assert alice.request("GET", f"/schedules/{made['id']}").json()["state"] == "active"


@pytest.mark.parametrize(
    ("fields", "field", "says"),
    [
        ({"cron": "every day"}, "cron", "five fields"),
        ({"cron": "0 25 * * *"}, "cron", "not a valid cron expression"),
        ({"timezone": "Mars/Olympus"}, "timezone", "IANA time zone"),
        ({"max_concurrent": 0}, "max_concurrent", ""),
        ({"overlap": "replace"}, "overlap", ""),
        ({"job": {"name": "x"}}, "job", "exactly one of"),
    ],
)
def test_bad_schedules_are_refused_naming_the_field(hub, alice, fields, field, says):
    r = alice.request("POST", "/schedules", json=schedule_body(hub, **fields))
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["field"].startswith(field) and says in error["message"], error


def test_a_platform_restart_runs_missed_runs_once(gpulab_up):
    """Down for 22 minutes past a due time of a schedule every 5 minutes (the service's database is set back while
    it is stopped: the test cannot wait that long): on restart, one run, the other missed times counted skipped."""
    config = "c.Platform.mlflow_service = False\nc.JobQueue.tick_interval = 0.2\nc.Scheduler.interval = 0.5\n"
    hub = gpulab_up(config, users={"carol": []}, name="restart")
    carol = Client(hub, "carol")
    r = carol.request("POST", "/schedules", json=schedule_body(hub, cron="*/5 * * * *", catch_up="once"))
    assert r.status_code == 201, r.text
    made = r.json()
    hub.stop()

    database = hub.data_dir / "jobs" / "jobs.sqlite"
    owner = database.stat()
    store = JobStore(url=f"sqlite:///{database}")
    down_since = utcnow() - timedelta(minutes=22)

    def missed():  # the due times from down_since to now
        return len(cron.runs_until("*/5 * * * *", "UTC", down_since, utcnow(), 100))

    missed_before = missed()
    with Session(store.engine) as session, session.begin():
        session.get(ScheduleRow, made["id"]).next_run_at = down_since
    store.engine.dispose()
    for path in database.parent.glob("jobs.sqlite*"):  # the service's files stay the service's
        os.chown(path, owner.st_uid, owner.st_gid)

    hub.start(config)
    deadline = time.monotonic() + 60
    while (runs := carol.request("GET", "/jobs", params={"schedule": made["id"]}).json()["jobs"]) == []:
        assert time.monotonic() < deadline, hub.log_tail()
        time.sleep(0.5)
    assert carol.wait(runs[0]["id"])["state"] == "succeeded"
    time.sleep(2)  # a few more passes of the scheduler: still one run
    shown = carol.request("GET", f"/schedules/{made['id']}").json()
    assert len(carol.request("GET", "/jobs", params={"schedule": made["id"]}).json()["jobs"]) == 1
    assert shown["runs"] == 1 and missed_before - 1 <= shown["skipped"] <= missed() - 1, (missed_before, shown)
    assert shown["next_run_at"] > iso(utcnow())
