"""Every gpulab database is made and upgraded by its one migration history, on SQLite and PostgreSQL: a fresh
database gets exactly the tables the code declares, and one left by the previous release (0.1.0: the jobs history
at 0004, applied_events and the attestation and events tables made by ``create_all``) is upgraded with a row in
every table kept. On PostgreSQL the three share one database, as an admin may configure them: their histories
stay apart (a version table each)."""

import json

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, select, text

from gpulab.attestation import nonces
from gpulab.attestation.enrolment import Enrolments
from gpulab.attestation.reasons import Reason
from gpulab.attestation.state import NodeStates
from gpulab.events import outbox
from gpulab.events.subscriber import AppliedEvents
from gpulab.service.storage import make_engine
from gpulab.services.jobs import store as jobs
from gpulab.services.jobs.models import JobSpec

SCHEMAS = {"jobs": jobs.SCHEMA, "attestation": nonces.SCHEMA, "events": outbox.SCHEMA}
# what 0.1.0 left: the jobs history at 0004, the other tables without a history
PREVIOUS = {"jobs": "0004", "attestation": None, "events": None}
HEAD = {"jobs": "0005", "attestation": "0001", "events": "0001"}


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
    """Each database as this release opens it (the services' own constructors, which upgrade it)."""
    return {
        "jobs": jobs.JobStore(url=urls["jobs"]),
        "attestation": nonces.open_database(urls["attestation"]),
        "events": outbox.UserEvents(url=urls["events"]),
    }


def test_fresh_databases_get_the_declared_tables(urls):
    opened = open_all(urls)
    for name, url in urls.items():
        assert version(url, name) == HEAD[name], name
        assert schema_differences(name, url) == [], name
    for db in opened.values():
        getattr(db, "engine", db).dispose()


def test_the_previous_releases_databases_are_upgraded_with_their_rows(urls):
    # this release's tables with a row in each, then the histories set back to where 0.1.0 left them: its tables
    # were these (0005 and the attestation and events histories only adopt them)
    opened = open_all(urls)
    store, events = opened["jobs"], opened["events"]
    job, _ = store.create_job("alice", ["ml"], JobSpec(name="kept", entrypoint=["python", "t.py"]))
    AppliedEvents(urls["jobs"]).apply_once({"event_id": "0b6c2f0e-7d4b-4f0a-9a53-0e4f3c2b1a01"}, lambda *_: None)
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
    for name, url in urls.items():
        engine = make_engine(url)
        with engine.begin() as conn:
            table = SCHEMAS[name].version_table
            if PREVIOUS[name] is None:
                conn.execute(text(f"DROP TABLE {table}"))
            else:
                conn.execute(text(f"UPDATE {table} SET version_num = :v"), {"v": PREVIOUS[name]})
        engine.dispose()
        assert version(url, name) == PREVIOUS[name]

    opened = open_all(urls)
    for name, url in urls.items():
        assert version(url, name) == HEAD[name], name
        assert schema_differences(name, url) == [], name
    store, engine, events = opened["jobs"], opened["attestation"], opened["events"]
    assert store.get_job(job.id).name == "kept" and [e.to_state for e in store.events(job.id)] == ["queued"]
    assert not AppliedEvents(urls["jobs"]).apply_once({"event_id": "0b6c2f0e-7d4b-4f0a-9a53-0e4f3c2b1a01"}, None)
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
