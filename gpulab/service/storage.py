"""What every gpulab database shares: how an engine is made, how time is stored, and the thread its calls run on."""

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import TypeVar

from sqlalchemy import Engine, create_engine, event

T = TypeVar("T")


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


class DatabaseThread:
    """A database's calls on one thread of its own: off the event loop, and one at a time. SQLite takes one
    writer at a time anyway, and threads racing for its write lock sleep in its busy handler, which cost a
    quarter of the job service's submissions a second when its calls went to asyncio's shared pool."""

    def __init__(self, name: str):
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    async def run(self, fn: Callable[..., T], /, *args, **kwargs) -> T:
        """``fn(*args, **kwargs)`` on the database's thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))
