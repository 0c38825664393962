import itertools
import os
import secrets
from pathlib import Path

import pytest

OUTPUT_DIR = Path(os.environ.get("GPULAB_TEST_OUTPUT", Path(__file__).resolve().parent.parent / "test-output"))


_LOOPBACK = itertools.count()


@pytest.fixture
def loopback() -> str:
    """A loopback address of this test's own (from 127.0.1.1 on, where no hand-written address lies): servers the
    test starts bind there on free ports, so that two tests never meet on one address."""
    n = next(_LOOPBACK)
    return f"127.0.{1 + n // 254}.{1 + n % 254}"


@pytest.fixture(scope="session")
def output_dir() -> Path:
    """Where tests keep artefacts worth looking at (screenshots)."""
    OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
    return OUTPUT_DIR


@pytest.fixture(scope="module")
def pg_database():
    """A throwaway PostgreSQL database on 127.0.0.1:5432 for this test module (dropped afterwards)."""
    psycopg = pytest.importorskip("psycopg")
    name = f"gpulab_test_{secrets.token_hex(6)}"
    try:
        admin = psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=postgres", autocommit=True)
    except psycopg.OperationalError as e:
        pytest.skip(f"no PostgreSQL at 127.0.0.1:5432: {e}")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
        admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
