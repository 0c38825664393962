"""JobStore on SQLite and PostgreSQL: migrations, idempotency, transitions and events,
pagination, deletion, tokens, usage. A throwaway PostgreSQL database per module."""

import threading
from datetime import timedelta

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import case, create_engine, inspect, select, text, update
from sqlalchemy.orm import Session

from gpulab.service.storage import utcnow
from gpulab.services.jobs.models import JobSpec
from gpulab.services.jobs.store import (
    SCHEMA,
    VERSION_TABLE,
    JobNotFound,
    JobRow,
    JobStateError,
    JobStore,
    token_hash,
    upgrade,
)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    """An empty database (tables dropped afterwards, so each test runs the migrations)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'jobs.sqlite'}"
        return
    url = request.getfixturevalue("pg_database")
    yield url
    engine = create_engine(url)
    for metadata in SCHEMA.metadata:  # every table of the jobs database, as this release declares them
        metadata.drop_all(engine)
    with engine.begin() as conn:
        conn.execute(text(f"DROP TABLE IF EXISTS {VERSION_TABLE}"))
    engine.dispose()


@pytest.fixture
def store(url):
    store = JobStore(url=url)
    yield store
    store.engine.dispose()


def spec(name="job", **kw) -> JobSpec:
    return JobSpec(name=name, entrypoint=["python", "train.py"], **kw)


def test_migrations_create_the_schema_once(url):
    first = JobStore(url=url)
    second = JobStore(url=url)  # upgrading an up-to-date database is a no-op
    with second.engine.connect() as conn:
        assert {"jobs", "job_events", VERSION_TABLE} <= set(inspect(conn).get_table_names())
        assert conn.scalar(text(f"SELECT version_num FROM {VERSION_TABLE}")) == "0012"
        diff = compare_metadata(MigrationContext.configure(conn), list(SCHEMA.metadata))
    assert [d for d in diff if not (d[0] == "remove_table" and d[1].name == VERSION_TABLE)] == []
    first.engine.dispose()
    second.engine.dispose()


def test_an_upgrade_keeps_stored_jobs_and_their_own_priority(url):
    store = JobStore(url=url)
    admins, _ = store.create_job("carol", [], spec(priority=50), admin=True)
    users, _ = store.create_job("alice", [], spec(priority=50))
    assert (admins.global_priority, users.global_priority) == (50, 0)
    SCHEMA.downgrade(store.engine, "0003")  # back to the schema of gpulab before global_priority
    upgrade(store.engine)
    for job_id in (admins.id, users.id):
        row = store.get_job(job_id)
        assert (row.priority, row.global_priority, row.state) == (50, 0, "queued")
    store.engine.dispose()


def test_create_is_idempotent_per_owner_and_key(store):
    row, created = store.create_job("alice", ["ml"], spec(idempotency_key="k1", labels={"team": "a"}))
    assert created and row.state == "queued" and row.attempt == 0 and row.groups == ["ml"]
    again, created = store.create_job("alice", ["ml"], spec("other name", idempotency_key="k1"))
    assert not created and again.id == row.id and again.name == "job"
    bobs, created = store.create_job("bob", [], spec(idempotency_key="k1"))
    assert created and bobs.id != row.id
    a, _ = store.create_job("alice", [], spec())
    b, _ = store.create_job("alice", [], spec())
    assert a.id != b.id
    assert [e.to_state for e in store.events(row.id)] == ["queued"]
    job = store.get_job(row.id).to_model()
    assert job.spec.idempotency_key == "k1" and job.labels == {"team": "a"} and job.created_at.endswith("Z")


def test_transitions_record_events_and_refuse_illegal_ones(store):
    row, _ = store.create_job("alice", [], spec(resources={"gpus": 0, "memory": "1Gi"}))
    store.transition(row.id, "dispatching", "starting attempt 1", attempt=1, job_token_hash=token_hash("t"))
    assert store.check_job_token(row.id, "t") and not store.check_job_token(row.id, "u")
    running = store.transition(row.id, "running", "started", handle={"executor": "local", "ref": "1:2.00"})
    assert running.started_at is not None and running.finished_at is None and running.handle["ref"] == "1:2.00"
    done = store.transition(row.id, "succeeded", "exit code 0", exit_code=0)
    assert done.finished_at is not None and done.exit_code == 0 and done.memory == 2**30
    assert not store.check_job_token(row.id, "t")  # token hashes are cleared on leaving the active states
    events = store.events(row.id)
    assert [(e.from_state, e.to_state, e.reason) for e in events] == [
        (None, "queued", "submitted"),
        ("queued", "dispatching", "starting attempt 1"),
        ("dispatching", "running", "started"),
        ("running", "succeeded", "exit code 0"),
    ]
    with pytest.raises(JobStateError, match="is succeeded: cannot change to running"):
        store.transition(row.id, "running", "again")
    other, _ = store.create_job("alice", [], spec())
    with pytest.raises(JobStateError, match="is queued: cannot change to running"):
        store.transition(other.id, "running", "skipping dispatch")
    assert len(store.events(row.id)) == 4 and len(store.events(other.id)) == 1
    assert store.get_job(other.id).state == "queued"
    with pytest.raises(JobNotFound):
        store.transition("nope", "dispatching", "x")
    with pytest.raises(JobNotFound):
        store.get_job("nope")


def test_concurrent_transitions_let_exactly_one_win(store):
    row, _ = store.create_job("alice", [], spec())
    results, barrier = [], threading.Barrier(8)

    def attempt():
        barrier.wait()
        try:
            store.transition(row.id, "dispatching", "race")
            results.append("won")
        except JobStateError:
            results.append("refused")

    threads = [threading.Thread(target=attempt) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["refused"] * 7 + ["won"]
    assert [e.to_state for e in store.events(row.id)] == ["queued", "dispatching"]


def test_cursor_pagination_newest_first(store):
    ids = [
        store.create_job("alice" if i % 2 else "bob", [], spec(f"j{i}", labels={"n": str(i % 3)}))[0].id
        for i in range(120)
    ]
    with Session(store.engine) as session, session.begin():  # ties on created_at order by id
        session.execute(update(JobRow).where(JobRow.id.in_(ids[40:60])).values(created_at=utcnow()))
    with Session(store.engine) as session:
        expected = list(session.scalars(select(JobRow.id).order_by(JobRow.created_at.desc(), JobRow.id.desc())))

    def pages(**filters):
        seen, cursor, n = [], None, 0
        while True:
            rows, cursor = store.list_jobs(cursor=cursor, **filters)
            seen += [r.id for r in rows]
            n += 1
            if cursor is None:
                return seen, n

    seen, n = pages(limit=25)
    assert seen == expected and n == 5
    seen, _ = pages(limit=7, owner="alice", labels={"n": "0"})
    assert seen == [i for i in expected if int(store.get_job(i).name[1:]) % 6 == 3]
    assert pages(limit=120)[1] == 1
    rows, cursor = store.list_jobs(limit=10, state=["queued", "running"])
    assert len(rows) == 10 and cursor
    assert store.list_jobs(state="running") == ([], None)
    with pytest.raises(ValueError, match="invalid cursor"):
        store.list_jobs(cursor="not-a-cursor")


def test_delete_only_finished_jobs(store):
    row, _ = store.create_job("alice", [], spec())
    with pytest.raises(JobStateError, match="only finished jobs"):
        store.delete_job(row.id)
    store.transition(row.id, "cancelled", "cancelled by alice")
    store.delete_job(row.id)
    assert store.events(row.id) == []
    with pytest.raises(JobNotFound):
        store.delete_job(row.id)


def test_progress_tracking_and_usage(store):
    a, _ = store.create_job("alice", ["ml"], spec(resources={"gpus": 2, "cpus": 4, "pool": "gpu"}))
    b, _ = store.create_job("alice", [], spec())
    c, _ = store.create_job("bob", [], spec(resources={"pool": "gpu"}))
    assert not store.update_progress(a.id, 1, 10, {})  # queued jobs report no progress
    for row in (a, c):
        store.transition(row.id, "dispatching", "go", attempt=1)
    store.transition(a.id, "running", "started")
    assert store.update_progress(a.id, 5, 10, {"loss": 0.5})
    assert store.set_tracking(a.id, "run123", None) and store.heartbeat(a.id)
    job = store.get_job(a.id).to_model()
    assert (job.progress.step, job.progress.fraction, job.progress.metrics) == (5, 0.5, {"loss": 0.5})
    assert job.mlflow_run_id == "run123" and job.wandb_run_path is None
    by_owner, by_pool = store.usage("owner"), store.usage("pool")
    assert (by_owner["alice"].jobs, by_owner["alice"].gpus, by_owner["bob"].jobs) == (1, 2, 1)
    assert (by_pool["gpu"].jobs, by_pool["gpu"].gpus, by_pool["gpu"].cpus) == (2, 2, 5.0)
    assert store.queued_count() == {"default": 1}
    assert {r.id for r in store.active_jobs()} == {a.id, c.id}
    store.transition(b.id, "dispatching", "go", attempt=1)
    store.transition(b.id, "queued", "retry", not_before=utcnow() + timedelta(hours=1))
    assert [r.id for r in store.queued_jobs()] == [] and [r.id for r in store.queued_jobs(due_only=False)] == [b.id]


def test_queued_jobs_scheduling_columns_filters_and_per_owner_limit(store):
    ids = {}
    for name, owner, prio, extra in [
        ("a1", "alice", 0, {}),
        ("a2", "alice", 5, {"attestation": "required"}),
        ("a3", "alice", 0, {"resources": {"pool": "big"}}),
        ("b1", "bob", 1, {}),
        ("b2", "bob", 1, {}),
    ]:
        ids[name] = store.create_job(owner, ["ml"], spec(name, priority=prio, **extra))[0].id
    rows = store.queued_jobs()
    assert [r.id for r in rows] == [ids[n] for n in ("a2", "b1", "b2", "a1", "a3")]
    assert (rows[0].groups, rows[0].attestation_required, rows[3].attestation_required) == (["ml"], True, False)
    assert not hasattr(rows[0], "spec")
    default = store.queued_jobs(where=[JobRow.pool == "default"], per_owner=1)
    assert [r.id for r in default] == [ids["a2"], ids["b1"]]
    limits = case({"alice": 2}, value=JobRow.owner, else_=0)
    assert [r.id for r in store.queued_jobs(per_owner=limits)] == [ids["a2"], ids["a1"]]


def test_waiting_reasons_are_set_in_bulk_where_they_differ(store):
    jobs = [
        store.create_job(owner, groups, spec(resources={"pool": pool}))[0]
        for owner, groups, pool in [("alice", ["ml"], "default"), ("alice", [], "default"), ("bob", [], "big")]
        + [("bob", [], "big")]
    ]
    store.transition(jobs[3].id, "dispatching", "go", attempt=1)
    store.transition(jobs[3].id, "queued", "retry 2/2", not_before=utcnow() + timedelta(hours=1))
    seen = []

    def reason_for(job):
        seen.append((job.owner, job.groups, job.pool, job.gpus, job.cpus, job.memory, job.state_reason))
        return None if job.groups else f"waiting: {job.owner} in {job.pool}"

    store.set_waiting_reasons(reason_for)
    assert sorted(seen) == [
        ("alice", [], "default", 0, 1.0, None, "submitted"),
        ("alice", ["ml"], "default", 0, 1.0, None, "submitted"),
        ("bob", [], "big", 0, 1.0, None, "submitted"),
    ]
    reasons = [store.get_job(j.id).state_reason for j in jobs]
    assert reasons == ["submitted", "waiting: alice in default", "waiting: bob in big", "retry 2/2"]
    updated = store.get_job(jobs[1].id).updated_at
    store.set_waiting_reasons(reason_for)  # unchanged reasons are not written again
    assert store.get_job(jobs[1].id).updated_at == updated
    assert [e.to_state for e in store.events(jobs[1].id)] == ["queued"]
