"""JobQueue + LocalExecutor with real subprocesses (no runner): outcomes, logs, retries,
timeouts, cancellation of process groups, priority, fair share, quotas, GPU capacity,
and recovery after the service dies (a real service process, killed with SIGKILL)."""

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import psutil
import pytest
from traitlets.config import Config

from gpulab import cgroups
from gpulab.job_states import TERMINAL_STATES
from gpulab.services.jobs import dependencies
from gpulab.services.jobs.executors.base import ExecutorUnavailable, Handle, Launch, Outcome
from gpulab.services.jobs.executors.local import LocalExecutor
from gpulab.services.jobs.models import JobSpec
from gpulab.services.jobs.queue import ClaimRefused, JobQueue
from gpulab.services.jobs.store import BadDependency, JobStateError, JobStore

# A job that records each run, publishes its token and waits for a release file.
GATED = """
import os, sys, time
from pathlib import Path
d = Path(sys.argv[1])
with open(d / "runs", "a") as f:
    f.write(os.environ["GPULAB_JOB_ID"] + "\\n")
(d / ("token-" + os.environ["GPULAB_JOB_ID"])).write_text(os.environ["GPULAB_JOB_TOKEN"])
print("CVD=[%s]" % os.environ["CUDA_VISIBLE_DEVICES"], flush=True)
while not (d / "release").exists():
    time.sleep(0.02)
"""

# A job with a child process; both pids go to a file. IGNORE=1: both ignore SIGTERM.
FAMILY = """
import os, signal, subprocess, sys, time
if os.environ.get("IGNORE"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen(["sleep", "120"])
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write("%d %d" % (os.getpid(), child.pid))
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(120)
"""

# A preemptible job: counts steps until released, keeps the count in gpulab.checkpoint_dir() on SIGTERM, and
# starts from the count it finds there.
CHECKPOINTED = """
import os, signal, sys, time
from pathlib import Path
import gpulab
checkpoint = gpulab.checkpoint_dir() / "step"
step = int(checkpoint.read_text()) if checkpoint.exists() else 0
env = [os.environ[k] for k in ("GPULAB_JOB_ATTEMPT", "GPULAB_RESTART_COUNT", "GPULAB_PREEMPTED")]
print("attempt %s restart %s preempted %s from %d" % (*env, step), flush=True)
def save(*_):
    checkpoint.write_text(str(step))
    print("checkpoint", step, flush=True)
    sys.exit(143)
signal.signal(signal.SIGTERM, save)
while not (Path(sys.argv[1]) / "release").exists():
    step += 1
    time.sleep(0.02)
print("done", flush=True)
"""

# The service: a queue on the given DB, optionally submitting one job; runs until killed.
SERVICE = """
import asyncio, sys
from gpulab.services.jobs.models import JobSpec
from gpulab.services.jobs.queue import JobQueue
from gpulab.services.jobs.store import JobStore

async def main(db, data_dir, spec):
    queue = JobQueue(store=JobStore(url=db), data_dir=data_dir, wrap_with_runner=False, tick_interval=0.05)
    await queue.start()
    await queue.submit("alice", [], JobSpec.model_validate_json(spec))
    await asyncio.Event().wait()

asyncio.run(main(*sys.argv[1:]))
"""


def py(code: str, *args) -> list[str]:
    return [sys.executable, "-c", code, *map(str, args)]


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def until(predicate, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)
    return result


@pytest.fixture
def store(tmp_path):
    store = JobStore(url=f"sqlite:///{tmp_path / 'jobs' / 'jobs.sqlite'}")
    yield store
    store.engine.dispose()


@pytest.fixture
async def make_queue(tmp_path, store):
    """Queues on the test's store; ``start=False`` leaves scheduling to the test. Active jobs are
    cancelled at the end so no process outlives the test."""
    queues = []

    async def make(start=True, queue=None, executor=None, cls=JobQueue):
        cfg = Config(
            {
                "JobQueue": {
                    "tick_interval": 0.05,
                    "retry_backoff": 0.05,
                    "cancel_grace": 1.0,
                    **(queue or {}),
                },
                "LocalExecutor": {"cpus": 8.0, **(executor or {})},
            }
        )
        q = cls(config=cfg, store=store, data_dir=str(tmp_path), wrap_with_runner=False)
        queues.append(q)
        if start:
            await q.start()
        return q

    yield make
    for q in queues:
        await q.stop()
    for row in store.active_jobs():
        if row.state == "running":
            await queues[-1].executor.cancel(Handle(**row.handle), 0.5)


async def submit(q: JobQueue, owner="alice", groups=(), admin=False, **spec):
    spec.setdefault("name", "job")
    row, created = await q.submit(owner, list(groups), JobSpec.model_validate(spec), admin=admin)
    assert created
    return row.id


async def finished(store: JobStore, job_id: str, timeout=20.0):
    return await until(
        lambda: (r := store.get_job(job_id)).state in TERMINAL_STATES and r, timeout, f"job {job_id} to finish"
    )


async def state_is(store: JobStore, job_id: str, state: str, timeout=20.0):
    return await until(
        lambda: (r := store.get_job(job_id)).state == state and r, timeout, f"job {job_id} to be {state}"
    )


def events(store, job_id):
    return [(e.from_state, e.to_state, e.reason) for e in store.events(job_id)]


async def test_job_succeeds_with_log_env_and_token(make_queue, store, tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", "service-secret")
    q = await make_queue(queue={"mlflow_tracking_uri": "http://mlflow", "jobs_api_url": "http://jobs/api/v1"})
    code = """
import os, sys
print("hello from the job")
print("stderr line", file=sys.stderr)
keys = ["FOO", "GPULAB_JOB_OWNER", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "GPULAB_JOBS_URL",
        "WANDB_MODE", "CUDA_VISIBLE_DEVICES"]
print({k: os.environ.get(k) for k in keys})
print("leaked" if "JUPYTERHUB_API_TOKEN" in os.environ else "clean", os.getcwd())
"""
    job_id = await submit(q, entrypoint=py(code), env={"FOO": "bar"}, tracking={"experiment": "exp1"})
    row = await finished(store, job_id)
    assert (row.state, row.exit_code, row.attempt, row.state_reason) == ("succeeded", 0, 1, "exit code 0")
    log = q.attempts.log_path(row).read_text()
    assert "hello from the job" in log and "stderr line" in log
    env = {
        "FOO": "bar",
        "GPULAB_JOB_OWNER": "alice",
        "MLFLOW_TRACKING_URI": "http://mlflow",
        "MLFLOW_EXPERIMENT_NAME": "exp1",
        "GPULAB_JOBS_URL": "http://jobs/api/v1",
        "WANDB_MODE": "offline",
        "CUDA_VISIBLE_DEVICES": "",
    }
    assert repr(env) in log
    assert f"clean {q.attempts.work_dir(row)}" in log
    job = q.job_model(row)
    assert job.log_size == len(log.encode()) and job.finished_at and job.started_at
    assert await q.read_logs(row, 6, 4) == b"from"
    assert [e[1] for e in events(store, job_id)] == ["queued", "dispatching", "running", "succeeded"]

    gated = await submit(q, entrypoint=py(GATED, tmp_path))
    token_file = tmp_path / f"token-{gated}"
    await until(token_file.exists, what="the job's token")
    token = token_file.read_text()
    assert store.check_job_token(gated, token) and not store.check_job_token(gated, token + "x")
    assert not store.check_job_token(job_id, token)  # only for its own job
    (tmp_path / "release").touch()
    assert (await finished(store, gated)).state == "succeeded"
    assert not store.check_job_token(gated, token)


async def test_cell_job_runs_source_in_its_work_dir(make_queue, store):
    q = await make_queue()
    job_id = await submit(q, source="import os\nprint('cwd', os.getcwd())\nprint('file', __file__)\n")
    row = await finished(store, job_id)
    assert row.state == "succeeded"
    log = q.attempts.log_path(row).read_text()
    assert f"cwd {q.attempts.work_dir(row)}" in log and f"file {q.attempts.job_dir(row) / 'source.py'}" in log


async def test_failing_job_fails_with_exit_code(make_queue, store):
    q = await make_queue()
    job_id = await submit(q, entrypoint=py("import sys; print('boom'); sys.exit(3)"))
    row = await finished(store, job_id)
    assert (row.state, row.exit_code, row.state_reason, row.attempt) == ("failed", 3, "exit code 3", 1)
    assert "boom" in q.attempts.log_path(row).read_text()
    missing = await submit(q, entrypoint=["/nonexistent/train"])
    row = await finished(store, missing)
    assert (row.state, row.exit_code) == ("failed", 127)
    assert "cannot start '/nonexistent/train'" in q.attempts.log_path(row).read_text()


async def test_bad_working_dir_fails_to_start(make_queue, store, tmp_path):
    q = await make_queue()
    job_id = await submit(q, entrypoint=["true"], working_dir=str(tmp_path / "missing"))
    row = await finished(store, job_id)
    assert row.state == "failed" and row.state_reason.startswith("could not start:")


async def test_retries_with_backoff_then_fail(make_queue, store):
    q = await make_queue(queue={"retry_backoff": 0.3})
    job_id = await submit(q, entrypoint=py("import os, sys; print('attempt'); sys.exit(1)"), retries=2)
    row = await finished(store, job_id)
    assert (row.state, row.attempt, row.exit_code) == ("failed", 3, 1)
    evs = store.events(job_id)
    assert [e.to_state for e in evs] == ["queued"] + ["dispatching", "running", "queued"] * 2 + [
        "dispatching",
        "running",
        "failed",
    ]
    retries = [i for i, e in enumerate(evs) if e.from_state == "running" and e.to_state == "queued"]
    assert [evs[i].reason for i in retries] == [
        "retry 2/3 after: exit code 1",
        "retry 3/3 after: exit code 1",
    ]
    at = [datetime.fromisoformat(e.at.rstrip("Z")) for e in evs]
    gaps = [(at[i + 1] - at[i]).total_seconds() for i in retries]
    assert gaps[0] >= 0.3 and gaps[1] >= 0.6  # retry_backoff * 2**(n-1)
    assert all(q.attempts.log_path(row, n).read_text() == "attempt\n" for n in (1, 2, 3))


async def test_max_runtime_times_out_and_kills_the_group(make_queue, store, tmp_path):
    q = await make_queue()
    pids_file = tmp_path / "pids"
    job_id = await submit(q, entrypoint=py(FAMILY, pids_file), max_runtime=1)
    await until(pids_file.exists, what="the job's pids")
    pids = [int(p) for p in pids_file.read_text().split()]
    row = await finished(store, job_id, timeout=10)
    assert (row.state, row.state_reason) == ("timed_out", "max_runtime of 1s exceeded")
    assert 1 <= (row.finished_at - row.started_at).total_seconds() < 5
    assert all(gone(p) for p in pids)


async def test_cancel_kills_the_process_group(make_queue, store, tmp_path):
    q = await make_queue(queue={"cancel_grace": 1.5})
    stubborn = await submit(q, entrypoint=py(FAMILY, tmp_path / "stubborn"), env={"IGNORE": "1"})
    polite = await submit(q, entrypoint=py(FAMILY, tmp_path / "polite"))
    for name in ("stubborn", "polite"):
        await until((tmp_path / name).exists, what=f"{name} pids")
    for job_id, name, slow in ((stubborn, "stubborn", True), (polite, "polite", False)):
        pids = [int(p) for p in (tmp_path / name).read_text().split()]
        t0 = time.monotonic()
        row = await q.cancel(job_id, by="alice")
        elapsed = time.monotonic() - t0
        assert (row.state, row.state_reason) == ("cancelled", "cancelled by alice")
        assert all(gone(p) for p in pids), name
        assert elapsed >= 1.5 if slow else elapsed < 1.5, (name, elapsed)  # SIGKILL only after the grace
    with pytest.raises(JobStateError):
        await q.cancel(polite, by="alice")
    queued = await submit(q, entrypoint=["true"], resources={"gpus": 1})
    assert (await q.cancel(queued, by="admin")).state == "cancelled"


async def test_cancel_all_of_a_deleted_user(make_queue, store, tmp_path):
    q = await make_queue()
    running = await submit(q, "alice", entrypoint=py(GATED, tmp_path))
    bobs = await submit(q, "bob", entrypoint=py(GATED, tmp_path))
    await state_is(store, running, "running")
    queued = await submit(q, "alice", entrypoint=["true"], resources={"gpus": 1})
    await q.cancel_all_of("alice", reason="user alice was deleted")
    for job_id in (running, queued):
        row = store.get_job(job_id)
        assert (row.state, row.state_reason) == ("cancelled", "user alice was deleted")
    assert store.get_job(bobs).state == "running"


class EnvShownLocalExecutor(LocalExecutor):
    """The local executor, as if others could read its jobs' environments (Ray's dashboard shows them)."""

    env_is_private = False


async def test_an_executor_that_shows_environments_gets_a_ticket_instead_of_the_secrets(make_queue, store, tmp_path):
    q = await make_queue(
        start=False,
        queue={
            "executor_class": EnvShownLocalExecutor,
            "mlflow_tracking_uri": "http://mlflow",
            "jobs_api_url": "http://jobs/api/v1",
        },
    )
    q.mlflow_job_token = True  # as gpulab-jobs sets it for the platform's MLflow
    await q.start()
    code = """
import json, os, sys, time
from pathlib import Path
d = Path(sys.argv[1])
(d / "env.tmp").write_text(json.dumps(dict(os.environ)))
(d / "env.tmp").replace(d / "env.json")
while not (d / "release").exists():
    time.sleep(0.02)
"""
    job_id = await submit(q, entrypoint=py(code, tmp_path))
    env = json.loads(await until(lambda: (tmp_path / "env.json").exists() and (tmp_path / "env.json").read_text()))
    assert not {"GPULAB_JOB_TOKEN", "MLFLOW_TRACKING_TOKEN"} & env.keys() and env["GPULAB_JOBS_URL"], env
    ticket = env["GPULAB_CREDENTIALS_TICKET"]
    with pytest.raises(ClaimRefused) as made_up:
        await q.claim_credentials(job_id, "0" * 64)
    claimed = await q.claim_credentials(job_id, ticket)
    token = claimed["GPULAB_JOB_TOKEN"]
    assert claimed == {"GPULAB_JOB_TOKEN": token, "MLFLOW_TRACKING_TOKEN": f"job:{job_id}:{token}"}
    assert store.check_job_token(job_id, token)  # minted by the claim
    with pytest.raises(ClaimRefused) as again:
        await q.claim_credentials(job_id, ticket)
    (tmp_path / "release").touch()
    assert (await finished(store, job_id)).state == "succeeded" and not store.check_job_token(job_id, token)
    with pytest.raises(ClaimRefused) as over:
        await q.claim_credentials(job_id, ticket)
    assert (made_up.value.status, again.value.status, over.value.status) == (403, 409, 403)


async def test_priority_order(make_queue, store):
    q = await make_queue(start=False, executor={"cpus": 1.0})
    ids = {p: await submit(q, name=f"p{p}", entrypoint=["true"], priority=p) for p in (0, 10, -5, 5)}
    await q.start()
    rows = {p: await finished(store, i) for p, i in ids.items()}
    order = sorted(rows, key=lambda p: rows[p].started_at)
    assert order == [10, 5, 0, -5]


async def test_priority_orders_the_submitters_own_jobs_unless_an_admin_submits(make_queue, store):
    q = await make_queue(start=False, executor={"cpus": 1.0})
    ids = {
        "bob": await submit(q, "bob", entrypoint=["true"]),
        "alice low": await submit(q, "alice", entrypoint=["true"], priority=-10),
        "alice high": await submit(q, "alice", entrypoint=["true"], priority=100),
        "carol (admin)": await submit(q, "carol", admin=True, entrypoint=["true"], priority=50),
    }
    await q.start()
    rows = {name: await finished(store, job_id) for name, job_id in ids.items()}
    # alice's priority 100 puts her own jobs in order but does not jump bob's earlier one; an admin's does
    assert sorted(rows, key=lambda n: rows[n].started_at) == ["carol (admin)", "bob", "alice high", "alice low"]


async def test_fair_share_between_users(make_queue, store, tmp_path):
    q = await make_queue(start=False, executor={"cpus": 2.0})
    alice = [await submit(q, "alice", entrypoint=py(GATED, tmp_path)) for _ in range(3)]
    bob = [await submit(q, "bob", entrypoint=py(GATED, tmp_path)) for _ in range(2)]
    await q.start()
    await until(lambda: len(store.active_jobs()) == 2 and all(r.state == "running" for r in store.active_jobs()))
    await asyncio.sleep(0.2)
    assert {r.id for r in store.active_jobs()} == {alice[0], bob[0]}
    waiting = store.get_job(alice[1])
    assert (
        waiting.state == "queued" and waiting.state_reason == "waiting: no CPU capacity in pool 'default' (0 of 2 free)"
    )
    (tmp_path / "release").touch()
    for job_id in alice + bob:
        assert (await finished(store, job_id)).state == "succeeded"


async def test_user_and_group_quotas_keep_jobs_queued(make_queue, store, tmp_path):
    q = await make_queue(queue={"user_quota": {"max_jobs": 1}, "group_quotas": {"ml": {"max_jobs": 1}}})
    a1 = await submit(q, "alice", ["ml"], entrypoint=py(GATED, tmp_path))
    await state_is(store, a1, "running")
    a2 = await submit(q, "alice", ["ml"], entrypoint=py(GATED, tmp_path))
    c1 = await submit(q, "carol", ["ml"], entrypoint=py(GATED, tmp_path))
    b1 = await submit(q, "bob", entrypoint=py(GATED, tmp_path))
    await state_is(store, b1, "running")
    await until(lambda: store.get_job(c1).state_reason != "submitted")
    assert store.get_job(a2).state_reason == "waiting: quota max_jobs=1 reached"
    assert store.get_job(c1).state_reason == "waiting: group 'ml' quota max_jobs=1 reached"
    assert {store.get_job(i).state for i in (a2, c1)} == {"queued"}
    quota = await q.quota("alice", ["ml", "other"])
    assert (quota.limits.max_jobs, quota.limits.max_gpus, quota.usage.jobs) == (1, 4, 1)
    assert list(quota.groups) == ["ml"] and quota.groups["ml"].usage.jobs == 1
    (tmp_path / "release").touch()
    for job_id in (a1, a2, c1, b1):
        assert (await finished(store, job_id)).state == "succeeded"


async def test_a_group_borrows_idle_quota_of_its_cohort_and_the_lender_goes_first_once_it_frees(
    make_queue, store, tmp_path
):
    cohorts = {"lab": {"ml": {"default": {"gpus": 1}}, "cv": {"default": {"gpus": 3}}}}
    q = await make_queue(queue={"cohorts": cohorts, "user_quota": {"max_gpus": None}}, executor={"gpus": 4})
    gates = {name: tmp_path / name for name in ("held", "borrowed", "later")}
    for gate in gates.values():
        gate.mkdir()

    async def gated(owner, group, gate):
        return await submit(q, owner, [group], entrypoint=py(GATED, gates[gate]), resources={"gpus": 1})

    running = [
        await gated("carol", "cv", "held"),
        await gated("carol", "cv", "held"),
        await gated("alice", "ml", "held"),
    ]
    for job_id in running:
        await state_is(store, job_id, "running")
    borrowed = await gated("alice", "ml", "borrowed")
    await state_is(store, borrowed, "running")  # cv's third GPU, idle
    numbers = (await q.quota("carol", ["cv"])).cohorts["lab"].groups
    assert (numbers["ml"]["default"]["gpus"].borrowed, numbers["cv"]["default"]["gpus"].lent) == (1, 1)
    more = await gated("alice", "ml", "later")
    lender = await gated("carol", "cv", "later")
    await until(lambda: store.get_job(lender).state_reason != "submitted")
    assert store.get_job(lender).state_reason == (
        "waiting: cohort 'lab' has no gpus left in pool 'default' for group 'cv' within its nominal quota "
        "(nominal 3, 2 in use)"
    )
    assert store.get_job(more).state_reason.startswith("waiting: cohort 'lab' has no gpus left")
    (gates["borrowed"] / "release").touch()
    # alice now runs fewer GPUs than carol, and her job is older, but it would borrow: carol's, within cv's nominal
    # quota, goes first
    await state_is(store, lender, "running")
    assert store.get_job(more).state == "queued"
    for gate in gates.values():
        (gate / "release").touch()
    for job_id in (*running, borrowed, more, lender):
        assert (await finished(store, job_id)).state == "succeeded"


async def test_a_reclaimed_job_checkpoints_on_sigterm_and_resumes_without_using_a_retry(make_queue, store, tmp_path):
    cohorts = {"lab": {"ml": {"default": {"gpus": 1}}, "cv": {"default": {"gpus": 1}}}}
    q = await make_queue(
        queue={"cohorts": cohorts, "preemption_grace": 10.0, "user_quota": {"max_gpus": None}}, executor={"gpus": 2}
    )
    for gate in ("own", "borrower", "urgent"):
        (tmp_path / gate).mkdir()
    gpu = {"gpus": 1}
    own = await submit(q, "alice", ["ml"], entrypoint=py(GATED, tmp_path / "own"), resources=gpu, preemptible=True)
    await state_is(store, own, "running")
    borrower = await submit(
        q, "alice", ["ml"], entrypoint=py(CHECKPOINTED, tmp_path / "borrower"), resources=gpu, preemptible=True
    )
    await state_is(store, borrower, "running")
    await until(lambda: q.attempts.log_path(store.get_job(borrower)).exists())
    await asyncio.sleep(0.5)  # some steps
    urgent = await submit(q, "carol", ["cv"], entrypoint=py(GATED, tmp_path / "urgent"), resources=gpu)
    await state_is(store, urgent, "running")  # cv's GPU, taken back from ml's newest job
    preempted = store.get_job(borrower)
    assert (preempted.state, preempted.preemptions, preempted.preempted) == ("queued", 1, True)
    assert store.get_job(own).state == "running"  # the smallest set: one job
    assert events(store, borrower)[-1] == (
        "running",
        "queued",
        f"preempted by job {urgent}: reclaim of group cv's quota in cohort lab",
    )
    first_log = q.attempts.log_path(preempted, 1).read_text()
    assert first_log.startswith("attempt 1 restart 0 preempted 0 from 0") and "checkpoint " in first_log, first_log
    saved = int(first_log.split("checkpoint ")[1].split()[0])
    assert saved > 0
    (tmp_path / "urgent" / "release").touch()
    await state_is(store, borrower, "running")
    (tmp_path / "borrower" / "release").touch()
    done = await finished(store, borrower)
    assert (done.state, done.attempt, done.max_retries, done.preemptions) == ("succeeded", 2, 0, 1)
    second_log = q.attempts.log_path(done, 2).read_text()
    assert second_log.startswith(f"attempt 2 restart 1 preempted 1 from {saved}"), second_log
    assert q.job_model(done).preemptions == 1
    (tmp_path / "own" / "release").touch()
    assert (await finished(store, own)).state == "succeeded"


async def test_an_admins_urgent_job_preempts_a_lower_priority_one_within_the_grace(make_queue, store, tmp_path):
    q = await make_queue(queue={"preemption_grace": 0.5}, executor={"gpus": 1})
    low = await submit(q, "alice", entrypoint=py(GATED, tmp_path), resources={"gpus": 1}, preemptible=True)
    await state_is(store, low, "running")
    same = await submit(q, "bob", entrypoint=py(GATED, tmp_path), resources={"gpus": 1})
    await until(lambda: store.get_job(same).state_reason.startswith("waiting"))
    assert store.get_job(low).state == "running"  # an equal priority preempts nothing
    urgent = await submit(q, "admin", admin=True, entrypoint=py(GATED, tmp_path), resources={"gpus": 1}, priority=50)
    await state_is(store, urgent, "running")
    assert events(store, low)[-1] == ("running", "queued", f"preempted by job {urgent}: priority 50 over 0")
    (tmp_path / "release").touch()
    for job_id in (urgent, low, same):
        assert (await finished(store, job_id)).state == "succeeded"


async def test_past_usage_orders_users_and_running_jobs_are_charged_to_it(make_queue, store, tmp_path):
    store.charge_usage({"user:alice": 10_000.0}, 7 * 24 * 3600.0)  # alice ran a lot this week
    q = await make_queue(start=False, queue={"usage_sample_interval": 0.1})
    alice = await submit(q, "alice", entrypoint=py(GATED, tmp_path), resources={"cpus": 8.0})
    bob = await submit(q, "bob", entrypoint=py(GATED, tmp_path), resources={"cpus": 8.0})  # younger: one at a time
    await q.start()
    await state_is(store, bob, "running")
    assert store.get_job(alice).state == "queued"
    charged = await until(lambda: store.fair_share_usage(7 * 24 * 3600.0).get("user:bob"))  # at the pass's end
    assert charged == pytest.approx(8 * 0.1 * 60.0, rel=0.05)  # the entry penalty: 60 s of 8 CPUs at weight 0.1
    await asyncio.sleep(1.0)
    await until(lambda: store.fair_share_usage(7 * 24 * 3600.0)["user:bob"] > charged + 0.4)  # sampled while running
    assert (await q.quota("bob", [])).decayed_usage > charged
    (tmp_path / "release").touch()
    for job_id in (alice, bob):
        assert (await finished(store, job_id)).state == "succeeded"


async def test_a_large_job_keeps_its_reservation_while_short_jobs_backfill(make_queue, store, tmp_path):
    q = await make_queue()  # 8 CPUs
    gates = {name: tmp_path / name for name in ("running", "short")}
    for gate in gates.values():
        gate.mkdir()
    running = await submit(q, entrypoint=py(GATED, gates["running"]), resources={"cpus": 6.0}, max_runtime=600)
    await state_is(store, running, "running")
    large = await submit(q, "bob", entrypoint=py(GATED, gates["running"]), resources={"cpus": 8.0})
    await until(lambda: q.reservations.held_by(large))  # from the pass after the one that found it waiting
    detail = await q.job_detail(store.get_job(large))
    reserved_from = store.get_job(running).started_at + timedelta(seconds=600)
    assert detail.estimated_start == reserved_from.isoformat() + "Z" and detail.queue_position == 1
    endless = await submit(q, "carol", entrypoint=py(GATED, gates["short"]), resources={"cpus": 2.0})
    await until(lambda: store.get_job(endless).state_reason.startswith("waiting: backfill"))
    assert store.get_job(endless).state_reason == (  # 2 CPUs are free, but for longer than until the reservation
        f"waiting: backfill: pool 'default' is reserved for job {large} (reserved from "
        f"{reserved_from:%Y-%m-%d %H:%M:%S} UTC); this job would delay it (give it a max_runtime that ends before)"
    )
    assert (await q.job_detail(store.get_job(endless))).queue_position == 2
    short = await submit(q, "dave", entrypoint=py(GATED, gates["short"]), resources={"cpus": 2.0}, max_runtime=60)
    await state_is(store, short, "running")  # ends before the reserved start: backfilled
    (gates["short"] / "release").touch()
    (gates["running"] / "release").touch()
    for job_id in (running, large, short, endless):
        assert (await finished(store, job_id)).state == "succeeded"
    assert store.get_job(large).started_at < store.get_job(endless).started_at  # the reservation went first


async def test_a_job_cancelled_while_it_is_preempted_ends_cancelled(make_queue, store, tmp_path):
    q = await make_queue(queue={"preemption_grace": 5.0}, executor={"gpus": 1})
    ready = tmp_path / "ready"
    stubborn = py(
        "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); open(sys.argv[1], 'w').close()\n"
        "time.sleep(60)",
        ready,
    )
    low = await submit(q, "alice", entrypoint=stubborn, resources={"gpus": 1}, preemptible=True)
    await until(ready.exists)  # it ignores SIGTERM from now on
    urgent = await submit(q, "admin", admin=True, entrypoint=["true"], resources={"gpus": 1}, priority=50)
    await until(lambda: low in q._stopping)  # SIGTERM sent, ignored: the grace runs
    cancelled = await q.cancel(low, "alice")
    assert (cancelled.state, cancelled.state_reason) == ("cancelled", "cancelled by alice")
    assert (await finished(store, urgent)).state == "succeeded"


async def test_an_attempt_shorter_than_a_sample_is_charged_what_it_held(make_queue, store):
    q = await make_queue(queue={"usage_sample_interval": 3600.0, "fair_share_entry_penalty": 0.0})
    quick = await submit(q, entrypoint=py("import time; time.sleep(0.5)"), resources={"cpus": 2.0})
    assert (await finished(store, quick)).state == "succeeded"
    charged = store.fair_share_usage(7 * 24 * 3600.0)["user:alice"]
    assert 2 * 0.1 * 0.4 < charged < 2 * 0.1 * 5  # about half a second of 2 CPUs at weight 0.1


async def test_gpu_job_waits_on_a_machine_without_gpus(make_queue, store):
    q = await make_queue()
    assert (await q.executor.capacity())["default"].gpus == 0  # no NVML, no nvidia-smi here
    gpu = await submit(q, entrypoint=["true"], resources={"gpus": 1})
    cpu = await submit(q, entrypoint=["true"])
    assert (await finished(store, cpu)).state == "succeeded"  # a job that fits is not held up
    row = store.get_job(gpu)
    assert (row.state, row.state_reason) == (
        "queued",
        "waiting: no GPU capacity in pool 'default' (0 of 0 free)",
    )
    [pool] = await q.pools()
    assert (pool.name, pool.capacity.gpus, pool.queued) == ("default", 0, 1)
    other = await submit(q, entrypoint=["true"], resources={"pool": "big"})
    await until(lambda: store.get_job(other).state_reason != "submitted")
    assert store.get_job(other).state_reason == "waiting: no pool 'big' (pools: default)"


async def test_queue_assigns_gpu_ids(make_queue, store, tmp_path):
    q = await make_queue(executor={"gpus": 2})
    ids = [await submit(q, entrypoint=py(GATED, tmp_path), resources={"gpus": 1}) for _ in range(3)]
    await until(lambda: len([r for r in store.active_jobs() if r.state == "running"]) == 2)
    third = await until(lambda: (r := store.get_job(ids[2])).state_reason.startswith("waiting") and r)
    assert third.state_reason == "waiting: no GPU capacity in pool 'default' (0 of 2 free)"
    running = [store.get_job(i) for i in ids[:2]]
    await until(lambda: all("CVD=" in q.attempts.log_path(r).read_text() for r in running))
    assert sorted(q.attempts.log_path(r).read_text().strip() for r in running) == ["CVD=[0]", "CVD=[1]"]
    assert sorted(r.handle["gpu_ids"] for r in running) == [[0], [1]]
    (tmp_path / "release").touch()
    for job_id in ids:
        assert (await finished(store, job_id)).state == "succeeded"


async def test_one_pass_reads_more_of_an_owner_when_the_first_candidates_cannot_start(make_queue, store, tmp_path):
    q = await make_queue(start=False, queue={"user_quota": {"max_jobs": 1}}, executor={"gpus": 1})
    bob = await submit(q, "bob", entrypoint=py(GATED, tmp_path), resources={"gpus": 1})
    gpu = await submit(q, "alice", entrypoint=py(GATED, tmp_path), resources={"gpus": 1})
    cpu = await submit(q, "alice", entrypoint=py(GATED, tmp_path))
    await q.tick()  # alice's first candidate loses the GPU to bob; her next job starts in the same pass
    assert [store.get_job(i).state for i in (bob, gpu, cpu)] == ["running", "queued", "running"]
    assert store.get_job(gpu).state_reason == "waiting: quota max_jobs=1 reached"
    await q.start()
    (tmp_path / "release").touch()
    for job_id in (bob, gpu, cpu):
        assert (await finished(store, job_id)).state == "succeeded"


async def test_waiting_reasons_of_jobs_never_read_follow_the_checks_order(make_queue, store, tmp_path):
    q = await make_queue(start=False, queue={"user_quota": {"max_jobs": 1}})
    running = await submit(q, "alice", entrypoint=py(GATED, tmp_path))
    await q.tick()
    assert store.get_job(running).state == "running"
    more = [await submit(q, "alice", entrypoint=["true"], resources=r) for r in ({}, {}, {"pool": "big"})]
    bobs = await submit(q, "bob", entrypoint=["true"], resources={"pool": "big"})
    await q.tick()
    assert {store.get_job(i).state_reason for i in more} == {"waiting: quota max_jobs=1 reached"}
    assert store.get_job(bobs).state_reason == "waiting: no pool 'big' (pools: default)"
    await q.start()
    (tmp_path / "release").touch()
    for job_id in (running, *more[:2]):
        assert (await finished(store, job_id)).state == "succeeded"


class PendingExecutor(LocalExecutor):
    """Like Ray: an accepted attempt is "starting" until it runs (here: until the file ``go`` exists),
    and the log is copied into the job's log file when the attempt ends."""

    start_pending = True
    go: Path

    async def poll(self, handle):
        outcome = await super().poll(handle)
        if outcome.state == "running" and not self.go.exists():
            return Outcome("starting", reason="PENDING: waiting for resources")
        return outcome

    async def save_logs(self, handle, log_path):
        log_path.write_bytes(log_path.read_bytes() + b"saved by the executor\n")


async def test_pending_attempt_runs_only_once_the_executor_says_so(make_queue, store, tmp_path):
    q = await make_queue(start=False, queue={"executor_class": PendingExecutor})
    q.executor.go = tmp_path / "go"
    await q.start()
    job_id = await submit(q, entrypoint=py(GATED, tmp_path))
    pending = "attempt 1 submitted to local: PENDING: waiting for resources"
    row = await until(lambda: (r := store.get_job(job_id)).state_reason == pending and r)
    assert (row.state, row.started_at, row.handle is not None) == ("dispatching", None, True)
    q.executor.go.touch()
    row = await state_is(store, job_id, "running")
    assert row.started_at is not None and row.state_reason == "attempt 1 started"
    (tmp_path / "release").touch()
    assert (await finished(store, job_id)).state == "succeeded"
    assert events(store, job_id)[1:] == [
        ("queued", "dispatching", "starting attempt 1"),
        ("dispatching", "running", "attempt 1 started"),
        ("running", "succeeded", "exit code 0"),
    ]
    assert q.attempts.log_path(row).read_text().endswith("saved by the executor\n")


async def test_cancel_stops_a_pending_attempt(make_queue, store, tmp_path):
    q = await make_queue(start=False, queue={"executor_class": PendingExecutor})
    q.executor.go = tmp_path / "go"
    await q.start()
    job_id = await submit(q, entrypoint=py(FAMILY, tmp_path / "pids"))
    await until(lambda: (tmp_path / "pids").exists())
    pids = map(int, (tmp_path / "pids").read_text().split())
    assert store.get_job(job_id).state == "dispatching"
    row = await q.cancel(job_id, by="alice")
    assert (row.state, row.state_reason) == ("cancelled", "cancelled by alice")
    assert all(gone(pid) for pid in pids)
    assert q.attempts.log_path(row).read_text().endswith("saved by the executor\n")


class UnreachableExecutor(LocalExecutor):
    """A backend that is down (as a Ray cluster can be)."""

    async def capacity(self):
        raise ExecutorUnavailable("connection refused")


async def test_unavailable_executor_keeps_jobs_queued(make_queue, store):
    q = await make_queue(queue={"executor_class": UnreachableExecutor})
    job_id = await submit(q, entrypoint=["true"])
    await until(lambda: store.get_job(job_id).state_reason != "submitted")
    row = store.get_job(job_id)
    assert (row.state, row.state_reason) == ("queued", "waiting: executor unavailable: connection refused")


async def test_executor_class_names(make_queue):
    q = await make_queue(start=False, queue={"executor_class": "local"})
    assert type(q.executor) is LocalExecutor and q.executor.parent is q
    assert q.executor.state_dir == str(Path(q.data_dir) / "jobs" / ".local-executor")


async def test_idempotent_submit(make_queue, store):
    q = await make_queue(start=False)
    spec = JobSpec(name="j", entrypoint=["true"], idempotency_key="key-1")
    first, created = await q.submit("alice", [], spec)
    again, created_again = await q.submit("alice", [], spec)
    assert created and not created_again and again.id == first.id


def start_service(tmp_path: Path, store: JobStore, spec: dict) -> subprocess.Popen:
    return subprocess.Popen(
        py(SERVICE, store.url, tmp_path, json.dumps(spec)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def kill_service(service: subprocess.Popen) -> None:
    service.send_signal(signal.SIGKILL)
    await until(lambda: service.poll() is not None, what="the service to die")


async def test_restart_reattaches_running_job(make_queue, store, tmp_path):
    service = start_service(tmp_path, store, {"name": "long", "entrypoint": py(GATED, tmp_path)})
    try:
        [row] = await until(lambda: [r for r in store.active_jobs() if r.state == "running"], 30, "the job")
        await until((tmp_path / "runs").exists)
    finally:
        await kill_service(service)
    q = await make_queue()  # the restarted service
    await asyncio.sleep(0.3)
    assert store.get_job(row.id).state == "running"
    (tmp_path / "release").touch()
    done = await finished(store, row.id)
    assert (done.state, done.attempt, done.exit_code) == ("succeeded", 1, 0)
    assert (tmp_path / "runs").read_text().splitlines() == [row.id]
    assert [e[1] for e in events(store, row.id)].count("dispatching") == 1
    assert q.attempts.log_path(done).read_text().strip() == "CVD=[]"


async def test_job_killed_while_service_down_is_lost_and_retried(make_queue, store, tmp_path):
    service = start_service(tmp_path, store, {"name": "long", "entrypoint": py(GATED, tmp_path), "retries": 1})
    try:
        [row] = await until(lambda: [r for r in store.active_jobs() if r.state == "running"], 30, "the job")
        await until((tmp_path / "runs").exists)
    finally:
        await kill_service(service)
    pgid = int(row.handle["ref"].split(":")[0])
    os.killpg(pgid, signal.SIGKILL)
    await until(lambda: gone(pgid), what="the job to die")
    (tmp_path / "release").touch()  # the retry may finish
    await make_queue()
    done = await finished(store, row.id)
    assert (done.state, done.attempt) == ("succeeded", 2)
    assert ("running", "queued", "retry 2/2 after: process gone after service restart") in events(store, row.id)
    assert (tmp_path / "runs").read_text().splitlines() == [row.id, row.id]


async def test_restart_requeues_or_reattaches_dispatching_jobs(make_queue, store, tmp_path):
    q = await make_queue(start=False)
    spec = {"entrypoint": py(GATED, tmp_path)}
    # died after committing 'dispatching', before starting: requeued, started once
    lost = await submit(q, name="not started", **spec)
    store.transition(lost, "dispatching", "starting attempt 1", attempt=1)
    # died after the executor started it, before storing the handle: re-attached from the handle file
    started = await submit(q, name="started", **spec)
    row = store.transition(started, "dispatching", "starting attempt 1", attempt=1)
    q.attempts.job_dir(row).mkdir(parents=True)
    launch = Launch(
        job_id=row.id,
        attempt=1,
        owner="alice",
        argv=spec["entrypoint"],
        working_dir=str(tmp_path),
        env={"GPULAB_JOB_ID": row.id, "GPULAB_JOB_TOKEN": "t"},
        gpus=0,
        cpus=1,
        memory=None,
        pool="default",
        log_path=q.attempts.log_path(row),
    )
    await q.executor.start(launch)
    await q.start()
    assert ("dispatching", "queued", "requeued after service restart") in events(store, lost)
    assert events(store, started)[-1][1:] == ("running", "re-attached after service restart")
    (tmp_path / "release").touch()
    for job_id in (lost, started):
        assert ((await finished(store, job_id)).state, store.get_job(job_id).attempt) == ("succeeded", 1)
    assert sorted((tmp_path / "runs").read_text().splitlines()) == sorted([lost, started])


needs_cgroups = pytest.mark.skipif(cgroups.version() is None, reason="needs writable cgroups (root; CI runs as root)")


@needs_cgroups
async def test_a_job_over_its_memory_limit_fails_with_the_reason(make_queue, store):
    q = await make_queue()
    hog = "blocks = [bytearray(16 * 2**20) for _ in range(32)]\nprint('survived', flush=True)\n"  # 512 MiB
    job_id = await submit(q, entrypoint=py(hog), resources={"memory": "128Mi"})
    row = await finished(store, job_id, timeout=60)
    assert (row.state, row.state_reason) == ("failed", "memory limit (128 MiB) exceeded"), row.state_reason
    assert "survived" not in q.attempts.log_path(row).read_text()
    fits = await submit(q, entrypoint=py("x = bytearray(32 * 2**20); print('fits')"), resources={"memory": "128Mi"})
    assert (await finished(store, fits, timeout=60)).state == "succeeded"
    for job in (job_id, fits):  # their cgroups are gone with them
        group = cgroups.Cgroup(cgroups.group_name(store.get_job(job).handle["ref"]), cgroups.Limits())
        assert group.dirs and not any(d.exists() for d in group.dirs.values())


@needs_cgroups
async def test_a_job_with_one_cpu_gets_one_cpu_of_time(make_queue, store):
    """Two busy processes for 2 s of wall time: with ``cpus: 1`` they share one CPU's worth of time."""
    q = await make_queue()
    code = """
import multiprocessing, os, time
def spin(seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
if __name__ == "__main__":
    start, cpu0 = time.monotonic(), os.times()
    workers = [multiprocessing.Process(target=spin, args=(2,)) for _ in range(2)]
    for w in workers: w.start()
    for w in workers: w.join()
    cpu = os.times()
    from gpulab.cgroups import ROOT, own_groups
    groups = own_groups()
    for path in (ROOT / "cpu" / groups.get("cpu", "-").lstrip("/") / "cpu.cfs_quota_us",
                 ROOT / groups.get("", "-").lstrip("/") / "cpu.max"):
        if path.exists():
            print("quota", path.read_text().split()[0], flush=True)
    print("ratio", (cpu.children_user + cpu.children_system - cpu0.children_user - cpu0.children_system)
          / (time.monotonic() - start), flush=True)
"""
    job_id = await submit(q, entrypoint=py(code), resources={"cpus": 1})
    row = await finished(store, job_id, timeout=60)
    assert row.state == "succeeded", q.attempts.log_path(row).read_text()
    log = q.attempts.log_path(row).read_text()
    assert "quota 100000\n" in log, log  # its own group's quota: one period's worth
    ratio = float(log.split("ratio")[1])
    assert ratio <= 1.15, ratio  # two CPUs' worth (about 2) without the limit, on a machine with two


@pytest.mark.skipif(
    cgroups.version() != 1 or not os.access(cgroups.ROOT / "devices", os.W_OK),
    reason="needs cgroup v1's devices controller, writable (root)",
)
async def test_a_job_opens_only_its_own_gpus_device_nodes(make_queue, store, tmp_path):
    """Device nodes made for the test (NVIDIA's major 195, no driver behind them): a node the job may open
    answers ENXIO (no device), one the devices cgroup denies answers EPERM."""
    nodes = tmp_path / "dev"
    nodes.mkdir()
    for name, minor in (("nvidia0", 0), ("nvidia1", 1), ("nvidiactl", 255)):
        os.mknod(nodes / name, 0o666 | stat.S_IFCHR, os.makedev(195, minor))
    q = await make_queue(executor={"gpus": 2, "gpu_devices": str(nodes / "nvidia*")})
    code = f"""
import errno, os
for name in ("nvidia0", "nvidia1", "nvidiactl"):
    try:
        os.close(os.open({str(nodes)!r} + "/" + name, os.O_RDWR))
        print(name, "opened")
    except OSError as e:
        print(name, errno.errorcode[e.errno])
"""
    one = await submit(q, entrypoint=py(code), resources={"gpus": 1})
    row = await finished(store, one)
    [gpu] = row.handle["gpu_ids"]
    seen = dict(line.split() for line in q.attempts.log_path(row).read_text().splitlines())
    assert seen == {f"nvidia{gpu}": "ENXIO", f"nvidia{1 - gpu}": "EPERM", "nvidiactl": "ENXIO"}, seen
    none = await submit(q, entrypoint=py(code))
    row = await finished(store, none)
    seen = dict(line.split() for line in q.attempts.log_path(row).read_text().splitlines())
    assert seen == {"nvidia0": "EPERM", "nvidia1": "EPERM", "nvidiactl": "EPERM"}, seen


async def test_a_job_that_cannot_be_handled_fails_alone_and_the_others_run(make_queue, store):
    """A job stored before the API bounded max_runtime (2^70 s: every pass raised OverflowError on it, stalling
    the queue for everyone) is failed with the reason, and the next job still runs."""
    q = await make_queue()
    bad = await submit(q, entrypoint=py("import time; time.sleep(60)"), max_runtime=60)
    await state_is(store, bad, "running")
    row = store.get_job(bad)
    with store.session() as session:  # as an older gpulab stored it
        stored = session.get(type(row), bad)
        stored.spec = {**stored.spec, "max_runtime": 2**70}
        session.commit()
    failed = await finished(store, bad)
    assert failed.state == "failed" and "could not handle this job: OverflowError" in failed.state_reason
    good = await submit(q, entrypoint=py("print('ran')"))
    assert (await finished(store, good)).state == "succeeded"


# --- dependencies (depends_on) ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("condition", "state", "verdict"),
    [
        ("afterok", "succeeded", "met"),
        ("afterok", "failed", "impossible"),
        ("afterok", "cancelled", "impossible"),
        ("afternotok", "timed_out", "met"),
        ("afternotok", "succeeded", "impossible"),
        ("afterany", "cancelled", "met"),
        ("afterany", "running", "waiting"),
        ("afterok", "queued", "waiting"),
        ("afterany", None, "impossible"),  # the job is gone
    ],
)
def test_dependency_verdicts(condition, state, verdict):
    assert dependencies.verdict(condition, state) == verdict


async def test_a_job_waits_for_its_dependencies_and_is_cancelled_when_one_cannot_be_met(make_queue, store, tmp_path):
    q = await make_queue()
    gate = tmp_path / "gate"
    first = await submit(
        q,
        entrypoint=py(
            "import os, sys, time\nwhile not os.path.exists(sys.argv[1]): time.sleep(0.02)\nsys.exit(3)", gate
        ),
    )
    on_ok = await submit(q, entrypoint=["true"], depends_on=[{"job": first}])
    on_fail = await submit(q, entrypoint=["true"], depends_on=[{"job": first, "condition": "afternotok"}])
    on_end = await submit(q, entrypoint=["true"], depends_on=[{"job": first, "condition": "afterany"}])
    await until(lambda: store.get_job(first).state == "running", what="the first job to run")
    await until(lambda: store.get_job(on_ok).state_reason == f"waiting for job {first[:8]} to succeed")
    assert [store.get_job(j).state for j in (on_ok, on_fail, on_end)] == ["queued"] * 3
    gate.write_text("go")  # the first job fails
    cancelled = await finished(store, on_ok)
    assert cancelled.state == "cancelled"
    assert cancelled.state_reason == f"dependency {first[:8]} ended failed: afterok cannot be met"
    assert (await finished(store, on_fail)).state == "succeeded"
    assert (await finished(store, on_end)).state == "succeeded"
    assert [e.to_state for e in store.events(on_ok)] == ["queued", "cancelled"]


async def test_a_dependency_must_be_one_of_the_owners_jobs(make_queue, store):
    q = await make_queue(start=False)
    bobs = await submit(q, owner="bob", entrypoint=["true"])
    for depends_on in ([{"job": bobs}], [{"job": "0" * 32}]):
        with pytest.raises(BadDependency) as refused:
            await submit(q, entrypoint=["true"], depends_on=depends_on)
        assert refused.value.field == "depends_on.0.job" and "no job" in str(refused.value)
    with pytest.raises(ValueError, match="names a job more than once"):
        JobSpec.model_validate({"name": "j", "entrypoint": ["true"], "depends_on": [{"job": bobs}, {"job": bobs}]})
