"""Pipelines in the job service: the state rule (pure), the store on a real jobs database (every step at once or
none, a schedule's run once per due time, a pipeline counted as one run), and the API through a real hub, where
steps run as their owner's account and pass files through the pipeline's directory."""

import os
import shutil
import tempfile
from datetime import timedelta

import pytest

from gpulab.services.jobs.models import JobSpec, PipelineSpec, ScheduleSpec
from gpulab.services.jobs.openapi import SPEC_PATH
from gpulab.services.jobs.pipelines import PipelineStore, pipeline_state
from gpulab.services.jobs.queue import JobQueue
from gpulab.services.jobs.schedules import Scheduler, run_key
from gpulab.services.jobs.store import JobStore, QueueFull
from tests.support.jobs import Client
from tests.support.openapi import Spec

SPEC = Spec(SPEC_PATH)
UNMET = "dependency 1a2b3c4d ended failed: afterok cannot be met"


@pytest.mark.parametrize(
    ("steps", "state"),
    [
        ([("queued", "submitted"), ("queued", "waiting for job 1a2b3c4d to succeed")], "queued"),
        ([("running", ""), ("queued", "")], "running"),
        ([("succeeded", ""), ("succeeded", "")], "succeeded"),
        ([("succeeded", ""), ("cancelled", UNMET.replace("afterok", "afternotok"))], "succeeded"),  # skipped
        ([("failed", "exit 1"), ("cancelled", UNMET), ("succeeded", "")], "failed"),
        ([("timed_out", ""), ("succeeded", "")], "failed"),
        ([("cancelled", "cancelled by alice"), ("cancelled", UNMET)], "cancelled"),
        ([("succeeded", ""), (None, None)], "succeeded"),  # a step's job deleted
    ],
)
def test_a_pipelines_state_is_made_of_its_steps(steps, state):
    assert pipeline_state(steps) == state


def steps_body(directory="/srv/runs", **extra):
    job = {"entrypoint": ["true"]}
    return {
        "name": "nightly",
        "directory": directory,
        "steps": [
            {"name": "report", "needs": ["train", "prep"], "condition": "afterany", "job": {"name": "r", **job}},
            {"name": "train", "needs": ["prep"], "job": {"name": "t", **job, "labels": {"team": "ml"}}},
            {"name": "prep", "job": {"name": "p", **job, "env": {"ROWS": "10"}}},
        ],
        **extra,
    }


@pytest.fixture
def queue(tmp_path):
    return JobQueue(store=JobStore(url=f"sqlite:///{tmp_path / 'jobs.sqlite'}"), data_dir=str(tmp_path), max_queued=4)


def test_every_step_is_queued_at_once_waiting_for_what_it_needs(queue):
    pipelines = PipelineStore(queue.store)
    row, created = pipelines.create("alice", ["ml"], False, PipelineSpec(**steps_body()), queue.max_queued)
    assert created and row.directory == f"/srv/runs/nightly-{row.id[:8]}"
    jobs = {job.labels["gpulab.step"]: job for job in queue.store.list_jobs(owner="alice")[0]}
    assert {name: job.pipeline_id for name, job in jobs.items()} == dict.fromkeys(("prep", "train", "report"), row.id)
    specs = {name: JobSpec.model_validate(job.spec) for name, job in jobs.items()}
    assert [d.job for d in specs["prep"].depends_on] == []
    assert [(d.job, d.condition) for d in specs["train"].depends_on] == [(jobs["prep"].id, "afterok")]
    assert [d.job for d in specs["report"].depends_on] == [jobs["train"].id, jobs["prep"].id]
    assert {d.condition for d in specs["report"].depends_on} == {"afterany"}
    assert specs["prep"].env == {"ROWS": "10", "PIPELINE_DIR": row.directory}
    assert specs["train"].labels == {"team": "ml", "gpulab.pipeline": row.id, "gpulab.step": "train"}
    assert jobs["train"].state_reason == f"waiting for job {jobs['prep'].id[:8]} to succeed"
    (model,) = pipelines.models([row])
    assert model.state == "queued" and [s.name for s in model.steps] == ["report", "train", "prep"]
    assert [s.job_id for s in model.steps] == [jobs[n].id for n in ("report", "train", "prep")]


def test_a_pipeline_that_does_not_fit_the_queue_leaves_nothing_and_a_key_makes_one(queue):
    pipelines = PipelineStore(queue.store)
    queue.store.create_job("alice", [], JobSpec(name="before", entrypoint=["true"]))
    queue.store.create_job("alice", [], JobSpec(name="before", entrypoint=["true"]))
    with pytest.raises(QueueFull, match="alice has 4 queued jobs"):  # 2 queued + 3 steps > 4
        pipelines.create("alice", [], False, PipelineSpec(**steps_body()), queue.max_queued)
    assert len(queue.store.list_jobs(owner="alice")[0]) == 2 and pipelines.listed("alice") == []
    spec = PipelineSpec(**steps_body(idempotency_key="retry-1"))
    first, created = pipelines.create("bob", [], False, spec, queue.max_queued)
    again, created_again = pipelines.create("bob", [], False, spec, queue.max_queued)
    assert (created, created_again, again.id) == (True, False, first.id)
    assert len(queue.store.list_jobs(owner="bob")[0]) == 3


def test_a_scheduled_pipeline_runs_once_per_due_time_and_counts_as_one_run(queue):
    queue.max_queued = 100
    scheduler = Scheduler(queue)
    spec = ScheduleSpec(name="nightly", cron="*/10 * * * *", pipeline=PipelineSpec(**steps_body()), max_concurrent=2)
    made = scheduler.schedules.create("alice", ["ml"], False, spec, scheduler.max_per_user)
    due = made.next_run_at
    assert scheduler.fire_due(due + timedelta(seconds=1)) == 1
    (run,) = scheduler.pipelines.listed("alice", made.id)
    assert run.idempotency_key == run_key(made.id, due) and run.schedule_id == made.id
    assert scheduler.start_run(scheduler.schedules.get(made.id), due).id == run.id  # after a crash: the same run
    # three steps unfinished are one run: max_concurrent 2 lets the next due time start a second pipeline
    assert scheduler.schedules.active_runs([made.id]) == {made.id: 1}
    assert scheduler.fire_due(due + timedelta(minutes=10, seconds=1)) == 1
    assert scheduler.schedules.active_runs([made.id]) == {made.id: 2}
    assert scheduler.fire_due(due + timedelta(minutes=20, seconds=1)) == 0  # two running: this one is skipped
    after = scheduler.schedules.get(made.id)
    newest = scheduler.pipelines.listed("alice", made.id)[0]
    assert (after.runs, after.skipped, after.last_pipeline_id, after.last_job_id) == (2, 1, newest.id, None)
    assert {job.schedule_id for job in queue.store.list_jobs(owner="alice")[0]} == {made.id}


# --- the API through a real hub --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hub(gpulab_up):
    config = "c.Platform.mlflow_service = False\nc.JobQueue.tick_interval = 0.2\n"
    return gpulab_up(config, users={"alice": [], "bob": []})


@pytest.fixture(scope="module")
def alice(hub):
    return Client(hub, "alice")


@pytest.fixture(scope="module")
def shared():
    """A directory every account may make its own in (as /tmp), for the runs' directories."""
    path = tempfile.mkdtemp(prefix="gpulab-pipelines-", dir="/tmp")
    os.chmod(path, 0o1777)
    yield path
    shutil.rmtree(path)


def python(code: str) -> dict:
    return {"name": "step", "entrypoint": ["python", "-c", code]}


def wait_ended(client, pipeline_id, timeout=90):
    shown = client.request("GET", f"/pipelines/{pipeline_id}").json()
    for step in shown["steps"]:
        client.wait(step["job_id"], timeout=timeout)
    return client.request("GET", f"/pipelines/{pipeline_id}").json()


def test_steps_pass_files_a_failure_skips_what_needs_it_and_the_rest_runs(hub, alice, shared):
    write = "import os; open(os.path.join(os.environ['PIPELINE_DIR'], 'rows'), 'w').write('42')"
    read = "import os; print('read', open(os.path.join(os.environ['PIPELINE_DIR'], 'rows')).read())"
    body = {
        "name": "etl",
        "directory": shared,
        "steps": [
            {"name": "prep", "job": python(write)},
            {"name": "train", "needs": ["prep"], "job": python(read)},
            {"name": "lint", "job": python("raise SystemExit(3)")},
            {"name": "publish", "needs": ["train", "lint"], "job": python("print('never')")},
            {"name": "alert", "needs": ["lint"], "condition": "afternotok", "job": python("print('lint failed')")},
        ],
    }
    r = alice.request("POST", "/pipelines", json=body)
    assert r.status_code == 201, r.text
    made = r.json()
    SPEC.validate("/pipelines", "POST", 201, made)
    assert made["owner"] == "alice" and made["directory"] == f"{shared}/etl-{made['id'][:8]}"
    done = wait_ended(alice, made["id"])
    SPEC.validate("/pipelines/{pipeline_id}", "GET", 200, done)
    states = {s["name"]: (s["state"], s["state_reason"]) for s in done["steps"]}
    assert done["state"] == "failed", states
    assert [states[n][0] for n in ("prep", "train", "lint", "alert")] == [
        "succeeded",
        "succeeded",
        "failed",
        "succeeded",
    ]
    lint = next(s["job_id"] for s in done["steps"] if s["name"] == "lint")
    assert states["publish"] == ("cancelled", f"dependency {lint[:8]} ended failed: afterok cannot be met")
    train = next(s["job_id"] for s in done["steps"] if s["name"] == "train")
    assert "read 42" in alice.logs(train)
    listed = alice.request("GET", "/pipelines").json()
    SPEC.validate("/pipelines", "GET", 200, listed)
    assert made["id"] in [p["id"] for p in listed["pipelines"]]


def test_cancel_stops_every_step_and_another_users_pipeline_is_not_found(hub, alice, shared):
    body = {
        "name": "long",
        "directory": shared,
        "steps": [
            {"name": "sleep", "job": python("import time; time.sleep(120)")},
            {"name": "after", "needs": ["sleep"], "job": python("print('never')")},
        ],
    }
    made = alice.request("POST", "/pipelines", json=body).json()
    sleep = made["steps"][0]["job_id"]
    alice.wait(sleep, states={"running"})
    bob = Client(hub, "bob")
    for method, path in [("GET", ""), ("POST", "/cancel")]:
        r = bob.request(method, f"/pipelines/{made['id']}{path}")
        assert r.status_code == 404 and r.json()["error"]["field"] == "id", (method, r.text)
    assert made["id"] not in [p["id"] for p in bob.request("GET", "/pipelines").json()["pipelines"]]
    r = alice.request("POST", f"/pipelines/{made['id']}/cancel")
    assert r.status_code == 200, r.text
    SPEC.validate("/pipelines/{pipeline_id}/cancel", "POST", 200, r.json())
    assert r.json()["state"] == "cancelled"
    assert {s["state"] for s in r.json()["steps"]} == {"cancelled"}


def test_a_schedule_of_a_pipeline_runs_it_now(hub, alice, shared):
    pipeline = {"name": "hourly", "directory": shared, "steps": [{"name": "only", "job": python("print('ran')")}]}
    r = alice.request("POST", "/schedules", json={"name": "p", "cron": "@yearly", "pipeline": pipeline})
    assert r.status_code == 201, r.text
    made = r.json()
    SPEC.validate("/schedules", "POST", 201, made)
    assert made["job"] is None and made["pipeline"]["name"] == "hourly"
    r = alice.request("POST", f"/schedules/{made['id']}/run")
    assert r.status_code == 201, r.text
    SPEC.validate("/schedules/{schedule_id}/run", "POST", 201, r.json())
    run = wait_ended(alice, r.json()["id"])
    assert run["state"] == "succeeded" and run["schedule_id"] == made["id"]
    runs = alice.request("GET", "/pipelines", params={"schedule": made["id"]}).json()["pipelines"]
    assert [p["id"] for p in runs] == [run["id"]]
    assert alice.request("GET", f"/schedules/{made['id']}").json()["last_pipeline_id"] == run["id"]


@pytest.mark.parametrize(
    ("change", "field", "says"),
    [
        ({"steps": []}, "steps", "at least 1"),
        ({"directory": "runs"}, "directory", "absolute"),
        (
            {
                "steps": [
                    {"name": "a", "needs": ["b"], "job": python("pass")},
                    {"name": "b", "needs": ["a"], "job": python("pass")},
                ]
            },
            "steps",
            "a -> b -> a form a cycle",
        ),
        (
            {"steps": [{"name": "a", "needs": ["ghost"], "job": python("pass")}]},
            "steps.0.needs",
            "'ghost', which is not a step",
        ),
        (
            {"steps": [{"name": "a", "job": python("pass")}, {"name": "a", "job": python("pass")}]},
            "steps.1.name",
            "two steps named 'a'",
        ),
        (
            {"steps": [{"name": "a", "job": {**python("pass"), "depends_on": [{"job": "a" * 32}]}}]},
            "steps.0.job",
            "not for depends_on",
        ),
        ({"steps": [{"name": "a/b", "job": python("pass")}]}, "steps.0.name", ""),
        (
            {"steps": [{"name": "a", "job": {**python("pass"), "labels": {f"k{i}": "v" for i in range(31)}}}]},
            "steps.0.job",
            "at most 30 labels",
        ),
    ],
)
def test_bad_pipelines_are_refused_naming_the_field(hub, alice, change, field, says):
    r = alice.request("POST", "/pipelines", json={"name": "bad", "directory": "/tmp", **change})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["field"] == field and says in error["message"], error
    SPEC.validate("/pipelines", "POST", 422, r.json())
