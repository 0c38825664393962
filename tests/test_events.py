"""User lifecycle events end to end: outbox (SQLite and PostgreSQL) -> delivery -> a real
subscriber process (tests/support/event_recorder.py). No mocks."""

import asyncio
import io
import json
import logging
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import requests
from jsonschema import ValidationError
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import create_engine, func, select, text, update
from sqlalchemy.orm import Session
from tornado.httpclient import AsyncHTTPClient

from gpulab.events import subscriber
from gpulab.events.delivery import Deliverer, backoff_delay, deliver_pending
from gpulab.events.outbox import SCHEMA, Base, Delivery, OutboxEvent, UserEvents
from gpulab.service.storage import utcnow
from gpulab.tracing import setup_tracing

RECORDER = Path(__file__).parent / "support" / "event_recorder.py"
TOKEN = "recorder-service-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Recorder:
    """The event_recorder.py service as a subprocess, and readers for its SQLite DB."""

    def __init__(self, tmp_path: Path):
        self.port = free_port()
        self.db = tmp_path / "recorder.sqlite"
        self.url = f"http://127.0.0.1:{self.port}/services/recorder/events"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = {
            **os.environ,
            "JUPYTERHUB_SERVICE_URL": f"http://127.0.0.1:{self.port}",
            "JUPYTERHUB_SERVICE_PREFIX": "/services/recorder/",
            "JUPYTERHUB_API_TOKEN": TOKEN,
            "EVENT_RECORDER_DB": str(self.db),
        }
        self.proc = subprocess.Popen([sys.executable, str(RECORDER)], env=env)
        deadline = time.monotonic() + 30
        while True:
            assert self.proc.poll() is None, "event_recorder.py exited"
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                assert time.monotonic() < deadline, "event_recorder.py did not start"
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            os.kill(self.proc.pid, signal.SIGTERM)
            assert self.proc.wait(timeout=10) == 0
            self.proc = None

    def _query(self, sql: str, *args) -> list[tuple]:
        with sqlite3.connect(self.db) as db:
            return db.execute(sql, args).fetchall()

    def received(self) -> list[tuple[str, str, str]]:
        """Applied events as (event_id, type, user), in apply order."""
        return self._query("SELECT event_id, type, user FROM received ORDER BY seq")

    def payload(self, event_id: str) -> dict:
        return json.loads(self._query("SELECT payload FROM received WHERE event_id=?", event_id)[0][0])

    def receipts(self, event_id: str) -> list[int]:
        """Response statuses of every POST of ``event_id``."""
        return [r[0] for r in self._query("SELECT status FROM receipts WHERE event_id=? ORDER BY seq", event_id)]

    def traceparent(self, event_id: str) -> str:
        return self._query("SELECT traceparent FROM receipts WHERE event_id=?", event_id)[0][0]


@pytest.fixture
def recorder(tmp_path):
    recorder = Recorder(tmp_path)
    recorder.start()
    yield recorder
    recorder.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """A database URL for the outbox or applied-events tables; tables dropped afterwards."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'events.sqlite'}"
        return
    url = request.getfixturevalue("pg_database")
    yield url
    engine = create_engine(url)
    Base.metadata.drop_all(engine)
    subscriber.Base.metadata.drop_all(engine)
    with engine.begin() as conn:
        conn.execute(text(f"DROP TABLE IF EXISTS {SCHEMA.version_table}"))
    engine.dispose()


@pytest.fixture
def events(db_url):
    events = UserEvents(url=db_url)
    yield events
    events.engine.dispose()


def deliveries(events: UserEvents, subscriber: str) -> list[Delivery]:
    """Delivery rows of ``subscriber`` in event order."""
    with Session(events.engine) as session:
        return list(
            session.scalars(
                select(Delivery)
                .join(OutboxEvent, OutboxEvent.event_id == Delivery.event_id)
                .where(Delivery.subscriber == subscriber)
                .order_by(OutboxEvent.id)
            )
        )


def make_due(events: UserEvents) -> None:
    """Let backoff time pass: make every pending delivery due now."""
    with Session(events.engine) as session, session.begin():
        session.execute(update(Delivery).values(next_attempt_at=utcnow()))


async def test_events_delivered_in_order(events, recorder):
    events.add_subscriber("recorder", recorder.url, TOKEN)
    ids = [
        events.emit("user.created", "alice"),
        events.emit(
            "user.updated",
            "alice",
            groups=["ml", "gpu"],
            roles=["user", "mlflow-admin"],
            admin=True,
        ),
        events.emit("user.deleted", "alice"),
    ]

    assert await deliver_pending(events, AsyncHTTPClient()) == 3

    assert recorder.received() == [
        (ids[0], "user.created", "alice"),
        (ids[1], "user.updated", "alice"),
        (ids[2], "user.deleted", "alice"),
    ]
    assert recorder.payload(ids[1]) == {
        "event_id": ids[1],
        "type": "user.updated",
        "user": "alice",
        "groups": ["ml", "gpu"],
        "roles": ["user", "mlflow-admin"],
        "admin": True,
    }
    rows = deliveries(events, "recorder")
    assert [(d.event_id, d.attempts, d.last_error) for d in rows] == [(i, 0, None) for i in ids]
    assert all(d.delivered_at is not None for d in rows)
    assert await deliver_pending(events, AsyncHTTPClient()) == 0


async def test_delivery_carries_traceparent(events, recorder):
    exporter = InMemorySpanExporter()
    setup_tracing("gpulab-tests", exporter=exporter)
    events.add_subscriber("recorder", recorder.url, TOKEN)
    event_id = events.emit("user.created", "bob")

    await deliver_pending(events, AsyncHTTPClient())

    (span,) = [s for s in exporter.get_finished_spans() if s.name == "deliver user event"]
    assert span.attributes["gpulab.event_id"] == event_id
    trace_id = recorder.traceparent(event_id).split("-")[1]
    assert trace_id == format(span.context.trace_id, "032x")


async def test_duplicate_delivery_applied_once(events, recorder):
    events.add_subscriber("recorder", recorder.url, TOKEN)
    event_id = events.emit("user.created", "carol")
    assert await deliver_pending(events, AsyncHTTPClient()) == 1

    with Session(events.engine) as session, session.begin():  # force a re-send
        session.execute(update(Delivery).values(delivered_at=None))
    assert await deliver_pending(events, AsyncHTTPClient()) == 1

    assert recorder.receipts(event_id) == [204, 204]
    assert recorder.received() == [(event_id, "user.created", "carol")]


async def test_wrong_token_is_rejected_and_stays_pending_in_order(events, recorder, caplog):
    events.add_subscriber("good", recorder.url, TOKEN)
    events.add_subscriber("bad", recorder.url, "not-the-token")
    first = events.emit("user.created", "dave")
    second = events.emit("user.updated", "dave", groups=["ml"])

    before = utcnow()
    assert await deliver_pending(events, AsyncHTTPClient()) == 2  # both to "good" only

    assert sorted(recorder.receipts(first)) == [204, 403]
    assert recorder.receipts(second) == [204]  # bad never sent event 2 before event 1 succeeded
    head, blocked = deliveries(events, "bad")
    assert head.delivered_at is None and head.attempts == 1
    assert "403" in head.last_error and "not-the-token" not in head.last_error
    assert head.next_attempt_at >= before + timedelta(seconds=1)
    assert blocked.delivered_at is None and blocked.attempts == 0
    assert [d.delivered_at is not None for d in deliveries(events, "good")] == [True, True]
    assert f"Delivering event {first} to bad failed" in caplog.text
    assert "not-the-token" not in caplog.text and TOKEN not in caplog.text


async def test_subscriber_down_then_up(events, tmp_path):
    recorder = Recorder(tmp_path)  # not started: connection refused
    events.add_subscriber("recorder", recorder.url, TOKEN)
    ids = [events.emit("user.created", "erin"), events.emit("user.deleted", "erin")]

    before = utcnow()
    assert await deliver_pending(events, AsyncHTTPClient()) == 0
    head, _ = deliveries(events, "recorder")
    assert head.attempts == 1 and head.last_error
    assert before + timedelta(seconds=1) <= head.next_attempt_at <= utcnow() + timedelta(seconds=1)

    assert await deliver_pending(events, AsyncHTTPClient()) == 0  # backing off: not retried yet
    assert deliveries(events, "recorder")[0].attempts == 1

    make_due(events)
    before = utcnow()
    assert await deliver_pending(events, AsyncHTTPClient()) == 0
    head, second = deliveries(events, "recorder")
    assert head.attempts == 2 and head.next_attempt_at >= before + timedelta(seconds=2)
    assert second.attempts == 0

    recorder.start()
    try:
        make_due(events)
        assert await deliver_pending(events, AsyncHTTPClient()) == 2
        assert [r[0] for r in recorder.received()] == ids
    finally:
        recorder.stop()


def test_backoff_doubles_from_one_second_up_to_a_minute():
    assert [backoff_delay(n).total_seconds() for n in range(1, 9)] == [1, 2, 4, 8, 16, 32, 60, 60]


def test_invalid_event_is_rejected_and_not_stored(events):
    events.add_subscriber("recorder", "http://127.0.0.1:9/events", TOKEN)
    with pytest.raises(ValidationError, match="user.exploded"):
        events.emit("user.exploded", "frank")
    with pytest.raises(ValidationError):
        events.emit("user.created", "")
    with Session(events.engine) as session:
        assert session.scalar(select(func.count()).select_from(OutboxEvent)) == 0
        assert session.scalar(select(func.count()).select_from(Delivery)) == 0


def test_events_go_through_the_jupyter_events_logger(events):
    stream = io.StringIO()
    events.event_logger.register_handler(logging.StreamHandler(stream))
    event_id = events.emit("user.created", "gina", roles=["user"])
    (line,) = stream.getvalue().splitlines()
    logged = json.loads(line)
    assert logged["__schema__"] == "https://events.gpulab.dev/user/lifecycle"
    assert logged["__schema_version__"] == "1"
    assert (logged["event_id"], logged["type"], logged["roles"]) == (
        event_id,
        "user.created",
        ["user"],
    )


async def test_deliverer_delivers_on_kick(events, recorder):
    events.add_subscriber("recorder", recorder.url, TOKEN)
    deliverer = Deliverer(events, interval=60)
    deliverer.start()
    try:
        await asyncio.sleep(0.2)  # the first round (empty outbox) has run; next one in 60 s
        event_id = events.emit("user.created", "hank")
        deliverer.kick()
        deadline = time.monotonic() + 10
        while not recorder.received():
            assert time.monotonic() < deadline, "kick did not deliver"
            await asyncio.sleep(0.05)
        assert recorder.received() == [(event_id, "user.created", "hank")]
    finally:
        await deliverer.stop()


def test_apply_once_is_idempotent_and_atomic(db_url):
    applied = subscriber.AppliedEvents(db_url)
    subscriber.Base.metadata.create_all(applied.engine)  # a subscriber's table, in its own migrations
    first = {
        "event_id": "0b6c2f0e-7d4b-4f0a-9a53-0e4f3c2b1a01",
        "type": "user.created",
        "user": "jo",
    }
    second = {**first, "event_id": "0b6c2f0e-7d4b-4f0a-9a53-0e4f3c2b1a02"}
    calls = []

    def apply(event, session):
        calls.append(event["event_id"])

    def fail(event, session):
        raise RuntimeError("service state not updated")

    try:
        assert applied.apply_once(first, apply) is True
        assert applied.apply_once(first, apply) is False
        with pytest.raises(RuntimeError):
            applied.apply_once(second, fail)
        assert applied.apply_once(second, apply) is True  # the failed try recorded nothing
        assert calls == [first["event_id"], second["event_id"]]
    finally:
        applied.engine.dispose()


def test_subscriber_rejects_bad_requests(recorder):
    valid = {
        "event_id": "0b6c2f0e-7d4b-4f0a-9a53-0e4f3c2b1a00",
        "type": "user.created",
        "user": "ivy",
    }

    def post(body, headers):
        return requests.post(recorder.url, data=body, headers=headers, timeout=10)

    r = post(json.dumps(valid), {})
    assert r.status_code == 401
    r = post(json.dumps(valid), {"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 401
    r = post(json.dumps(valid), {"Authorization": "token wrong"})
    assert r.status_code == 403

    auth = {"Authorization": f"token {TOKEN}"}
    assert post("{not json", auth).json()["field"] == "body"
    for bad, field in [
        ({**valid, "type": "user.renamed"}, "type"),
        ({k: v for k, v in valid.items() if k != "user"}, "user"),
        ({**valid, "event_id": "42"}, "event_id"),
        ({**valid, "groups": ["ml", 7]}, "groups.1"),
        ({**valid, "admin": "yes"}, "admin"),
    ]:
        r = post(json.dumps(bad), auth)
        assert (r.status_code, r.json()["field"]) == (400, field), r.text
    assert recorder.received() == []

    r = post(json.dumps(valid), auth)
    assert r.status_code == 204
    assert recorder.received() == [(valid["event_id"], "user.created", "ivy")]
