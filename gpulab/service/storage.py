"""What every gpulab database shares: how an engine is made, and how time is stored."""

from datetime import UTC, datetime

from sqlalchemy import Engine, create_engine, event


def utcnow() -> datetime:
    """Current time as naive UTC, the form stored in gpulab's tables (as JupyterHub does)."""
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
