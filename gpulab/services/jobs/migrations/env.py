"""Alembic environment of the jobs database; run by :data:`gpulab.services.jobs.store.SCHEMA`."""

from gpulab.service.storage import run_migrations

run_migrations()
