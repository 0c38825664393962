import os
import secrets
from pathlib import Path

import pytest

from tests.support.gpulab_up import Platform
from tests.support.net import next_loopback

OUTPUT_DIR = Path(os.environ.get("GPULAB_TEST_OUTPUT", Path(__file__).resolve().parent.parent / "test-output"))


@pytest.fixture
def loopback() -> str:
    """A loopback address of this test's own: servers the test starts bind there on free ports."""
    return next_loopback()


@pytest.fixture(scope="module")
def gpulab_up(tmp_path_factory):
    """A hub with this config, for this module's tests: ``gpulab_up(config, users={"alice": ["ml"]}, services=[...],
    env={...}, work=...)`` starts a real `gpulab up` (:class:`tests.support.gpulab_up.Platform`) on a loopback
    address of its own, with ``env`` in its environment, its data dir ``<work>/data`` (``work``: a new directory
    by default; the platform opens the path to it to users' accounts) and ``users`` (name -> groups) made;
    returns it. Every platform started is stopped by PID, its accounts removed, when the module ends (also when its
    start failed half-way)."""
    started = []

    def start(config="", *, users: dict | None = None, services=(), env: dict | None = None, work=None, name="hub"):
        hub = Platform((work or tmp_path_factory.mktemp(name)) / "data", host=next_loopback())
        started.append(hub)
        with pytest.MonkeyPatch.context() as patch:
            for key, value in (env or {}).items():
                patch.setenv(key, value)
            hub.start(config, services=services)
        for user, groups in (users or {}).items():
            hub.create_user(user, groups=groups)
        return hub

    yield start
    for hub in reversed(started):
        hub.stop()


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
