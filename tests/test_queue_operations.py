"""Queue operations. Job arrays (Slurm's ``--array``, with its ``%N`` throttle): the store queues every job at once
or none, and through a real hub the jobs run as their owner's account, each with its index, never more than
``max_concurrent`` at once; cancelling the array stops them all; another user's array is out of reach. Changing a
queued job (priority, resources) and holding it: each change an event, a held job never started until released."""

import time
from datetime import datetime

import pytest

from gpulab.kernels.client import Job, JobsClient
from gpulab.kernels.sweeps import Sweep
from gpulab.services.jobs.attempts import Attempts
from gpulab.services.jobs.models import JobSpec, JobUpdate, Resources
from gpulab.services.jobs.openapi import SPEC_PATH
from gpulab.services.jobs.queue import JobQueue
from gpulab.services.jobs.store import JobStateError, JobStore, QueueFull
from tests.support.jobs import Client
from tests.support.openapi import Spec

SPEC = Spec(SPEC_PATH)


@pytest.fixture
def store(tmp_path):
    return JobStore(url=f"sqlite:///{tmp_path / 'jobs.sqlite'}")


def test_an_array_is_its_jobs_queued_at_once_or_none(store):
    spec = JobSpec(name="sweep", entrypoint=["true"], array={"count": 3, "max_concurrent": 2}, idempotency_key="k")
    first, created = store.create_job("alice", [], spec, max_queued=5)
    assert created and (first.array_index, first.array_max) == (0, 2)
    rows, _ = store.list_jobs(array_id=first.array_id)
    assert sorted(r.array_index for r in rows) == [0, 1, 2] and {r.owner for r in rows} == {"alice"}
    assert [r.idempotency_key for r in sorted(rows, key=lambda r: r.array_index)] == ["k", None, None]
    again, created = store.create_job("alice", [], spec, max_queued=5)
    assert (again.id, created) == (first.id, False)  # the same submission: the same array
    model = rows[0].to_model()
    assert model.array.id == first.array_id and (model.array.count, model.array.max_concurrent) == (3, 2)
    with pytest.raises(QueueFull):  # 3 queued + 3 more > 5: none of them
        store.create_job("alice", [], JobSpec(name="more", entrypoint=["true"], array={"count": 3}), max_queued=5)
    assert len(store.list_jobs(owner="alice")[0]) == 3


def test_each_job_of_an_array_knows_its_index(store, tmp_path):
    first, _ = store.create_job("alice", [], JobSpec(name="a", entrypoint=["true"], array={"count": 2}))
    second = next(r for r in store.list_jobs(array_id=first.array_id)[0] if r.array_index == 1)
    builder = Attempts(JobQueue(store=store, data_dir=str(tmp_path)))
    env = builder.env(second, JobSpec.model_validate(second.spec))
    assert (env["GPULAB_ARRAY_ID"], env["GPULAB_ARRAY_INDEX"], env["GPULAB_ARRAY_COUNT"]) == (first.array_id, "1", "2")


def test_a_queued_job_changes_field_by_field_with_an_event_and_a_started_one_does_not(store):
    job, _ = store.create_job("alice", [], JobSpec(name="a", entrypoint=["true"], resources={"cpus": 2, "pool": "p"}))
    change = JobUpdate(priority=10, resources=Resources.model_validate({"gpus": 1}), held=True)
    changed = store.change_queued(job.id, "alice", False, change)
    assert (changed.priority, changed.global_priority, changed.gpus, changed.cpus, changed.pool) == (10, 0, 1, 2.0, "p")
    assert changed.on_hold and changed.state_reason == "held by alice"
    spec = JobSpec.model_validate(changed.spec)
    assert (spec.priority, spec.resources.gpus, spec.resources.cpus, spec.resources.pool) == (10, 1, 2.0, "p")
    [_, event] = store.events(job.id)
    assert (event.from_state, event.to_state) == ("queued", "queued")
    assert event.reason == "changed by alice: priority 0 -> 10, gpus 0 -> 1, held"
    assert store.change_queued(job.id, "bob", True, JobUpdate(priority=10)).global_priority == 0  # no change
    assert len(store.events(job.id)) == 2  # nothing changed: no event
    store.transition(job.id, "cancelled", "test")
    with pytest.raises(JobStateError, match="only a queued job can be changed"):
        store.change_queued(job.id, "alice", False, JobUpdate(priority=1))


# --- through a real hub ----------------------------------------------------------------------------------------


COHORTS = {
    "lab": {"ml": {"default": {"cpus": 0.2}}, "cv": {"default": {"cpus": {"nominal": 0.2, "lending_limit": 0.1}}}}
}


@pytest.fixture(scope="module")
def hub(gpulab_up):
    config = f"c.Platform.mlflow_service = False\nc.JobQueue.tick_interval = 0.2\nc.JobQueue.cohorts = {COHORTS!r}\n"
    return gpulab_up(config, users={"alice": [], "bob": [], "carol": ["ml", "hr"]})


def iso(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def test_an_array_never_runs_more_than_max_concurrent_and_each_sees_its_index(hub):
    alice = Client(hub, "alice")
    code = "import os, time; print('index', os.environ['GPULAB_ARRAY_INDEX'], 'of', os.environ['GPULAB_ARRAY_COUNT']); time.sleep(1.5)"
    first = alice.submit(
        name="sweep",
        entrypoint=["python", "-c", code],
        resources={"cpus": 0.1},
        array={"count": 5, "max_concurrent": 2},
    )
    SPEC.validate("/jobs", "POST", 201, first)
    array = first["array"]
    assert (array["index"], array["count"], array["max_concurrent"]) == (0, 5, 2)
    r = alice.request("GET", "/jobs", params={"array": array["id"]})
    SPEC.validate("/jobs", "GET", 200, r.json())
    members = r.json()["jobs"]
    assert sorted(j["array"]["index"] for j in members) == [0, 1, 2, 3, 4]
    done = [alice.wait(j["id"], timeout=90) for j in members]
    assert {j["state"] for j in done} == {"succeeded"}, [(j["state"], j["state_reason"]) for j in done]
    said = sorted(alice.logs(j["id"]).strip() for j in done)
    assert said == [f"index {i} of 5" for i in range(5)]
    events = sorted(
        [(iso(j["started_at"]), 1) for j in done] + [(iso(j["finished_at"]), -1) for j in done], key=lambda e: e
    )
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    assert peak <= 2, events


def test_a_queued_job_of_a_full_array_says_why_and_cancel_stops_the_array(hub):
    alice, bob = Client(hub, "alice"), Client(hub, "bob")
    first = alice.submit(
        name="long",
        source="import time; time.sleep(120)",
        resources={"cpus": 0.1},
        array={"count": 3, "max_concurrent": 1},
    )
    array = first["array"]["id"]
    alice.wait(first["id"], states={"running"})
    members = alice.request("GET", "/jobs", params={"array": array}).json()["jobs"]
    later = next(j for j in members if j["array"]["index"] == 2)
    assert alice.wait(later["id"], states={"queued"})["state_reason"].startswith("waiting: array max_concurrent=1")
    r = bob.request("POST", f"/arrays/{array}/cancel")
    assert r.status_code == 404 and r.json()["error"]["field"] == "id", r.text
    assert alice.request("GET", f"/jobs/{first['id']}").json()["state"] == "running"
    r = alice.request("POST", f"/arrays/{array}/cancel")
    assert r.status_code == 200, r.text
    SPEC.validate("/arrays/{array_id}/cancel", "POST", 200, r.json())
    jobs = r.json()["jobs"]
    assert [j["array"]["index"] for j in jobs] == [0, 1, 2] and {j["state"] for j in jobs} == {"cancelled"}


@pytest.mark.parametrize(
    ("array", "field"),
    [
        ({"count": 0}, "array.count"),
        ({"count": 501}, "array.count"),
        ({"count": 2, "max_concurrent": 3}, "array"),
        ({"count": 2, "max_concurrent": 0}, "array.max_concurrent"),
        ({"count": 2, "every": 1}, "array.every"),
    ],
)
def test_bad_arrays_are_refused_naming_the_field(hub, array, field):
    r = Client(hub, "alice").request("POST", "/jobs", json={"name": "x", "entrypoint": ["true"], "array": array})
    assert r.status_code == 422 and r.json()["error"]["field"] == field, r.text


def test_a_held_job_waits_until_released_and_a_change_needs_a_queued_job(hub):
    alice, bob = Client(hub, "alice"), Client(hub, "bob")
    # in a pool no executor offers, so that it is surely still queued when held; then moved to one that runs it
    holder = alice.submit(name="hold", source="import time; time.sleep(120)", resources={"cpus": 0.1, "pool": "later"})
    r = alice.request("PATCH", f"/jobs/{holder['id']}", json={"held": True, "priority": 5})
    assert r.status_code == 200, r.text
    SPEC.validate("/jobs/{job_id}", "PATCH", 200, r.json())
    assert r.json()["held"] is True and r.json()["priority"] == 5 and r.json()["state_reason"] == "held by alice"
    r = alice.request("PATCH", f"/jobs/{holder['id']}", json={"resources": {"pool": "default"}})
    assert r.json()["resources"] == {"gpus": 0, "cpus": 0.1, "memory": None, "pool": "default"}, r.text
    r = bob.request("PATCH", f"/jobs/{holder['id']}", json={"held": False})
    assert r.status_code == 404 and r.json()["error"]["field"] == "id", r.text
    time.sleep(1.5)  # several scheduling passes
    assert alice.request("GET", f"/jobs/{holder['id']}").json()["state"] == "queued"
    r = alice.request("PATCH", f"/jobs/{holder['id']}", json={"held": False})
    assert r.status_code == 200 and r.json()["held"] is False, r.text
    running = alice.wait(holder["id"], states={"running"})
    r = alice.request("PATCH", f"/jobs/{holder['id']}", json={"priority": 1})
    assert r.status_code == 409 and r.json()["error"]["field"] == "state", r.text
    SPEC.validate("/jobs/{job_id}", "PATCH", 409, r.json())
    for bad, field in [
        ({"priority": 101}, "priority"),
        ({"held": 1}, "held"),
        ({"resources": {"gpus": -1}}, "resources.gpus"),
    ]:
        r = alice.request("PATCH", f"/jobs/{holder['id']}", json=bad)
        assert r.status_code == 422 and r.json()["error"]["field"] == field, r.text
    events = alice.request("GET", f"/jobs/{holder['id']}/events").json()["events"]
    assert [e["reason"] for e in events if e["from_state"] == e["to_state"] == "queued"] == [
        "changed by alice: priority 0 -> 5, held",
        "changed by alice: pool later -> default",
        "changed by alice: released",
    ]
    alice.request("POST", f"/jobs/{running['id']}/cancel")


def test_an_admin_drains_a_pool_and_nothing_new_starts_there_until_undrained(hub):
    admin, alice = Client(hub, "admin"), Client(hub, "alice")
    r = alice.request("PUT", "/pools/default", json={"draining": True})
    assert r.status_code == 403 and r.json()["error"]["field"] == "name", r.text
    r = admin.request("PUT", "/pools/nowhere", json={"draining": True})
    assert r.status_code == 404 and r.json()["error"]["field"] == "name", r.text
    r = admin.request("PUT", "/pools/default", json={"draining": True})
    assert r.status_code == 200 and r.json()["draining"] is True, r.text
    SPEC.validate("/pools/{name}", "PUT", 200, r.json())
    try:
        job = alice.submit(name="waits", entrypoint=["true"], resources={"cpus": 0.1})
        queued = alice.wait(job["id"], states={"queued"})
        time.sleep(1)  # scheduling passes
        queued = alice.request("GET", f"/jobs/{job['id']}").json()
        assert (queued["state"], queued["state_reason"]) == (
            "queued",
            "waiting: pool 'default' is draining (an admin stopped new jobs there)",
        )
        pools = {p["name"]: p for p in alice.request("GET", "/pools").json()["pools"]}
        assert pools["default"]["draining"] is True
    finally:
        r = admin.request("PUT", "/pools/default", json={"draining": False})
        assert r.status_code == 200 and r.json()["draining"] is False, r.text
    assert alice.wait(job["id"])["state"] == "succeeded"


def test_a_group_borrows_its_cohorts_idle_quota_up_to_what_others_lend(hub):
    carol, alice, admin = Client(hub, "carol"), Client(hub, "alice"), Client(hub, "admin")
    job = {"name": "q", "source": "import time; time.sleep(120)", "resources": {"cpus": 0.1}}
    for group, status, why in [
        ("cv", 403, "you are not in group 'cv'"),
        ("hr", 400, "group 'hr' is in no cohort of JobQueue.cohorts (groups with a cohort quota: cv, ml)"),
    ]:
        r = carol.request("POST", "/jobs", json={**job, "group": group})
        assert r.status_code == status and r.json()["error"]["field"] == "group", r.text
        assert why in r.json()["error"]["message"]
    r = carol.request(
        "POST",
        "/pipelines",
        json={"name": "p", "directory": "/tmp", "steps": [{"name": "a", "job": {**job, "group": "cv"}}]},
    )
    assert r.status_code == 403 and r.json()["error"]["field"] == "steps.0.job.group", r.text
    # ml's own 0.2 CPUs, then 0.1 of cv's (which lends at most 0.1); a fourth job finds nothing left to borrow
    jobs = [carol.submit(**job, group="ml") for _ in range(3)] + [carol.submit(**job)]
    for started in jobs[:3]:
        carol.wait(started["id"], states={"running"})
    waiting = carol.wait(jobs[3]["id"], states={"queued"})
    deadline = time.monotonic() + 20
    while not waiting["state_reason"].startswith("waiting: cohort") and time.monotonic() < deadline:
        time.sleep(0.2)
        waiting = carol.request("GET", f"/jobs/{jobs[3]['id']}").json()
    assert waiting["state_reason"] == (
        "waiting: cohort 'lab' has no cpus left in pool 'default' for group 'ml' to borrow (nominal 0.2, 0.3 in use)"
    )
    r = carol.request("GET", "/quota")
    SPEC.validate("/quota", "GET", 200, r.json())
    quota = r.json()
    assert quota["cohort_group"] == "ml" and list(quota["cohorts"]) == ["lab"]
    cpus = {group: pools["default"]["cpus"] for group, pools in quota["cohorts"]["lab"]["groups"].items()}
    assert cpus["ml"]["used"] == pytest.approx(0.3) and cpus["ml"]["borrowed"] == pytest.approx(0.1)
    assert cpus["cv"]["lent"] == pytest.approx(0.1) and cpus["cv"]["lending_limit"] == 0.1
    assert alice.request("GET", "/quota").json()["cohorts"] == {}  # in no group of a cohort
    assert list(admin.request("GET", "/quota").json()["cohorts"]) == ["lab"]
    for each in jobs:
        carol.request("POST", f"/jobs/{each['id']}/cancel")


def test_a_sweep_runs_a_trial_per_combination_each_with_its_parameters(hub):
    alice = Client(hub, "alice")
    code = (
        "import gpulab; p = gpulab.trial_params(); print('trial', p['lr'], p['batch'])\n"
        "gpulab.progress(1, 1, loss=p['lr'] * p['batch'])"
    )
    sweep = {"parameters": {"lr": [0.1, 0.01], "batch": [16, 64]}, "max_concurrent": 2}
    first = alice.submit(name="sweep", source=code, resources={"cpus": 0.1}, sweep=sweep)
    SPEC.validate("/jobs", "POST", 201, first)
    assert (first["array"]["count"], first["array"]["max_concurrent"]) == (4, 2)
    members = alice.request("GET", "/jobs", params={"array": first["array"]["id"]}).json()["jobs"]
    assert [j["array"]["params"] for j in sorted(members, key=lambda j: j["array"]["index"])] == [
        {"lr": 0.1, "batch": 16},
        {"lr": 0.1, "batch": 64},
        {"lr": 0.01, "batch": 16},
        {"lr": 0.01, "batch": 64},
    ]
    done = [alice.wait(j["id"], timeout=90) for j in members]
    assert {j["state"] for j in done} == {"succeeded"}, [(j["state"], j["state_reason"]) for j in done]
    assert sorted(alice.logs(j["id"]).strip() for j in done) == sorted(
        f"trial {p['lr']} {p['batch']}" for p in (j["array"]["params"] for j in done)
    )
    # from a notebook: the kernel's Sweep over the same array
    client = JobsClient(alice.base, hub.token("alice"))
    handle = Sweep(client, Job(client, first))
    assert len(handle.wait(timeout=30)) == 4
    assert handle.best("loss").data["array"]["params"] == {"lr": 0.01, "batch": 16}
    assert handle.best("loss", "maximize").data["array"]["params"] == {"lr": 0.1, "batch": 64}
    r = alice.request("POST", "/jobs", json={"name": "x", "entrypoint": ["true"], "sweep": {"parameters": {"lr": []}}})
    assert r.status_code == 422 and r.json()["error"]["field"] == "sweep", r.text
    assert "parameters.lr: give 1 to 100 values" in r.json()["error"]["message"]
