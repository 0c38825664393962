"""Every gpulab database is made and upgraded by its one migration history, on SQLite and PostgreSQL: a fresh
database gets exactly the tables the code declares, and one left by the previous release (0.1.0: the jobs history
at 0004, applied_events and the attestation and events tables made by ``create_all``) is upgraded with a row in
every table kept. On PostgreSQL the three share one database, as an admin may configure them: their histories
stay apart (a version table each)."""

import json
from datetime import datetime

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import MetaData, inspect, select, text

from gpulab.attestation import nonces
from gpulab.attestation.enrolment import Enrolments
from gpulab.attestation.reasons import Reason
from gpulab.attestation.state import NodeStates
from gpulab.events import outbox, subscriber
from gpulab.events.subscriber import AppliedEvents
from gpulab.service.storage import make_engine
from gpulab.services.jobs import store as jobs
from gpulab.services.jobs.models import JobSpec

SCHEMAS = {"jobs": jobs.SCHEMA, "attestation": nonces.SCHEMA, "events": outbox.SCHEMA}
# what 0.1.0 left: the jobs history at 0004, the other tables without a history
PREVIOUS = {"jobs": "0004", "attestation": None, "events": None}
HEAD = {"jobs": "0012", "attestation": "0001", "events": "0001"}


@pytest.fixture(params=["sqlite", "postgresql"])
def urls(request, tmp_path):
    if request.param == "sqlite":
        return {name: f"sqlite:///{tmp_path / f'{name}.sqlite'}" for name in SCHEMAS}
    url = request.getfixturevalue("pg_database")
    engine = make_engine(url)
    with engine.begin() as conn:  # each test starts from an empty database
        conn.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    engine.dispose()
    return dict.fromkeys(SCHEMAS, url)


def schema_differences(name: str, url: str) -> list:
    """How the database at ``url`` differs from the tables its schema declares (others' tables left out)."""
    schema = SCHEMAS[name]
    own = {t for metadata in schema.metadata for t in metadata.tables}
    engine = make_engine(url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), list(schema.metadata))
    engine.dispose()
    others = {"remove_table": lambda table: table.name, "remove_index": lambda index: index.table.name}
    return [d for d in diff if not (d[0] in others and others[d[0]](d[1]) not in own)]


def version(url: str, name: str) -> str | None:
    engine = make_engine(url)
    with engine.connect() as conn:
        table = SCHEMAS[name].version_table
        found = table in inspect(conn).get_table_names()
        value = conn.scalar(text(f"SELECT version_num FROM {table}")) if found else None
    engine.dispose()
    return value


def open_all(urls: dict) -> dict:
    """Each database as this release opens it (the services' own constructors, which upgrade it); None where
    ``urls`` gives none."""
    return {
        "jobs": urls["jobs"] and jobs.JobStore(url=urls["jobs"]),
        "attestation": urls["attestation"] and nonces.open_database(urls["attestation"]),
        "events": urls["events"] and outbox.UserEvents(url=urls["events"]),
    }


def test_fresh_databases_get_the_declared_tables(urls):
    opened = open_all(urls)
    for name, url in urls.items():
        assert version(url, name) == HEAD[name], name
        assert schema_differences(name, url) == [], name
    for db in opened.values():
        getattr(db, "engine", db).dispose()


def previous_jobs_database(url: str) -> str:
    """The jobs database as 0.1.0 left it, its history at 0004 and applied_events made by ``create_all``, with a
    job, its event and an applied event in it, written as 0.1.0 wrote them; the job's id."""
    engine = make_engine(url)
    jobs.SCHEMA.upgrade(engine, PREVIOUS["jobs"])
    subscriber.Base.metadata.create_all(engine)
    tables = MetaData()
    tables.reflect(engine, only=["jobs", "job_events", "applied_events"])
    at = datetime(2026, 11, 2, 9, 30)
    spec = JobSpec(name="kept", entrypoint=["python", "t.py"]).model_dump(
        mode="json", exclude={"notebook", "depends_on"}
    )
    job = {
        **dict(id="a1" * 16, owner="alice", groups=["ml"], name="kept", kind="train", spec=spec, state="queued"),
        **dict(state_reason="submitted", priority=0, pool="default", gpus=0, cpus=1.0, attempt=0, max_retries=0),
        **dict(labels={}, created_at=at, updated_at=at, attestation_required=False, global_priority=0),
    }
    with engine.begin() as conn:
        conn.execute(tables.tables["jobs"].insert().values(job))
        conn.execute(
            tables.tables["job_events"].insert().values(job_id=job["id"], at=at, to_state="queued", reason="submitted")
        )
        conn.execute(tables.tables["applied_events"].insert().values(event_id=EVENT, applied_at=at))
    engine.dispose()
    return job["id"]


EVENT = "0b6c2f0e-7d4b-4f0a-9a53-0e4f3c2b1a01"


def test_the_previous_releases_databases_are_upgraded_with_their_rows(urls):
    # the jobs database as 0.1.0 wrote it; the others, whose tables 0.1.0 made as this release declares them (their
    # histories only adopt them), with this release's tables and a row in each, then their histories removed
    job_id = previous_jobs_database(urls["jobs"])
    assert version(urls["jobs"], "jobs") == PREVIOUS["jobs"]
    opened = {name: db for name, db in open_all({**urls, "jobs": None}).items() if db is not None}
    events = opened["events"]
    engine = opened["attestation"]
    nonce = nonces.NonceStore(engine=engine).issue(user="alice", node="gpu-1", purpose="attest")
    Enrolments(engine).enroll("gpu-1", by="admin", gpus=1)
    NodeStates(engine).record("gpu-1", "alice", Reason.DEVICE_MISMATCH)
    events.add_subscriber("gpulab-jobs", "http://127.0.0.1:9/events", "token")
    event_id = events.emit("user.created", "alice", groups=["ml"])
    with events.engine.begin() as conn:
        conn.execute(outbox.known_users.insert().values(name="alice", state=json.dumps({"groups": ["ml"]})))
    for db in opened.values():
        getattr(db, "engine", db).dispose()
    for name in ("attestation", "events"):
        engine = make_engine(urls[name])
        with engine.begin() as conn:
            conn.execute(text(f"DROP TABLE {SCHEMAS[name].version_table}"))
        engine.dispose()
        assert version(urls[name], name) is None

    opened = open_all(urls)
    for name, url in urls.items():
        assert version(url, name) == HEAD[name], name
        assert schema_differences(name, url) == [], name
    store, engine, events = opened["jobs"], opened["attestation"], opened["events"]
    kept = store.get_job(job_id)
    assert (kept.name, kept.schedule_id, kept.held_by) == ("kept", None, None)
    assert kept.to_model().spec.depends_on == []  # a spec written before depends_on reads as it was
    assert [e.to_state for e in store.events(job_id)] == ["queued"]
    assert not AppliedEvents(urls["jobs"]).apply_once({"event_id": EVENT}, None)
    assert nonces.NonceStore(engine=engine).consume(nonce.value, user="alice", node="gpu-1", purpose="attest")
    assert [e.node for e in Enrolments(engine).all()] == ["gpu-1"]
    assert NodeStates(engine).get("gpu-1").last_reason == Reason.DEVICE_MISMATCH
    with events.engine.connect() as conn:
        assert conn.scalar(select(outbox.OutboxEvent.type).where(outbox.OutboxEvent.event_id == event_id)) == (
            "user.created"
        )
        assert conn.scalar(select(outbox.known_users.c.state)) == json.dumps({"groups": ["ml"]})
        assert conn.execute(select(outbox.Delivery.event_id, outbox.Delivery.subscriber)).all() == [
            (event_id, "gpulab-jobs")
        ]
    for db in opened.values():
        getattr(db, "engine", db).dispose()
