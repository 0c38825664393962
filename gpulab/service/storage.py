"""What every gpulab database shares: how an engine is made, how time is stored, how its schema is migrated, and
the thread its calls run on."""

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from alembic import command, context
from alembic.config import Config as AlembicConfig
from sqlalchemy import Engine, MetaData, create_engine, event

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


@dataclass(frozen=True)
class Schema:
    """One gpulab database's tables (``metadata``) and their one migration history (alembic, in ``migrations``,
    recorded in ``version_table``: a name of its own, so that databases an admin shares between services keep
    their histories apart). Every gpulab database is created and upgraded by its schema's :meth:`upgrade`, never
    by ``create_all``: a database made by an earlier release is brought to this one's tables, its rows kept."""

    metadata: tuple[MetaData, ...]
    migrations: Path
    version_table: str

    def upgrade(self, engine: Engine, revision: str = "head") -> None:
        """Bring the database to ``revision``, the newest by default (no alembic.ini needed)."""
        self._migrate(engine, command.upgrade, revision)

    def downgrade(self, engine: Engine, revision: str) -> None:
        """Take the database back to ``revision`` (tests of an upgrade from an earlier schema)."""
        self._migrate(engine, command.downgrade, revision)

    def _migrate(self, engine: Engine, step, revision: str) -> None:
        cfg = AlembicConfig()
        cfg.set_main_option("script_location", str(self.migrations))
        with engine.begin() as connection:
            cfg.attributes.update(connection=connection, schema=self)
            step(cfg, revision)


def run_migrations() -> None:
    """The body of every history's ``env.py``: migrate the connection :meth:`Schema.upgrade` passes."""
    schema: Schema = context.config.attributes["schema"]
    context.configure(
        connection=context.config.attributes["connection"],
        target_metadata=list(schema.metadata),
        version_table=schema.version_table,
    )
    with context.begin_transaction():
        context.run_migrations()


class DatabaseThread:
    """A database's calls on one thread of its own: off the event loop, and one at a time. SQLite takes one
    writer at a time anyway, and threads racing for its write lock sleep in its busy handler, which cost a
    quarter of the job service's submissions a second when its calls went to asyncio's shared pool."""

    def __init__(self, name: str):
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    async def run(self, fn: Callable[..., T], /, *args, **kwargs) -> T:
        """``fn(*args, **kwargs)`` on the database's thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))
