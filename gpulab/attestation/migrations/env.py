"""Alembic environment of the attestation database; run by its :class:`~gpulab.service.storage.Schema`."""

from gpulab.service.storage import run_migrations

run_migrations()
