"""Alembic environment of the jobs tables; run via :func:`gpulab.services.jobs.store.upgrade`,
which passes an open connection in ``config.attributes["connection"]``."""

from alembic import context

from gpulab.services.jobs.store import VERSION_TABLE, Base

context.configure(
    connection=context.config.attributes["connection"],
    target_metadata=Base.metadata,
    version_table=VERSION_TABLE,
)
with context.begin_transaction():
    context.run_migrations()
