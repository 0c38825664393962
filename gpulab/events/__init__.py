"""User lifecycle events: emitted by the hub into an outbox, delivered at least once
to subscribing services, applied there idempotently by event id.

- :mod:`gpulab.events.outbox` — hub side: validate, emit and store events.
- :mod:`gpulab.events.delivery` — hub side: POST pending events to subscribers.
- :mod:`gpulab.events.subscriber` — service side: authenticate, validate, apply once.
"""

from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Engine, create_engine, event

SCHEMA_ID = "https://events.gpulab.dev/user/lifecycle"
SCHEMA_PATH = Path(__file__).with_name("user.schema.yaml")


def utcnow() -> datetime:
    """Current time as naive UTC, the form stored in event tables (as JupyterHub does)."""
    return datetime.now(UTC).replace(tzinfo=None)


def make_engine(url: str) -> Engine:
    """Create an engine for a gpulab database; SQLite gets WAL (synchronous=NORMAL) and foreign keys."""
    engine = create_engine(url, pool_pre_ping=True)
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")  # with WAL: durable across process crashes
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

    return engine
