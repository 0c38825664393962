"""The server extension in-process, on jupyter_server's own test server (pytest-jupyter's ``jp_fetch``): what it
answers by itself, before any hub service is reached. The whole path (hub, proxy, services, as two users) is in
the end-to-end tests; these are its edges, fast."""

import json

import pytest
from pytest_jupyter.jupyter_server import *  # noqa: F403 (jupyter_server's test fixtures, for this module only)
from tornado.httpclient import HTTPClientError

from gpulab.net import free_port
from gpulab.services.jobs.models import MAX_BODY
from tests.support.openapi import Spec
from tests.support.triton import REPO

SPEC = Spec(REPO / "gpulab" / "server_extension" / "openapi.yaml")
API = ("gpulab", "api", "v1")


@pytest.fixture
def jp_server_config():
    return {"ServerApp": {"jpserver_extensions": {"gpulab.server_extension": True}}}


@pytest.fixture
def answer(jp_fetch, jp_asyncio_loop):
    """``answer(*path, method=..., body=...)``: (status, JSON body) of a call under the API, errors included (on
    the server's own loop: the tests themselves are not coroutines)."""

    async def call(*path, method="GET", body=None):
        try:
            r = await jp_fetch(*API, *path, method=method, body=body)
        except HTTPClientError as e:
            r = e.response
        return r.code, json.loads(r.body)

    return lambda *path, **kwargs: jp_asyncio_loop.run_until_complete(call(*path, **kwargs))


@pytest.fixture
def no_services(monkeypatch):
    for name in ("GPULAB_JOBS_URL", "GPULAB_INFER_URL", "GPULAB_INFER_ADDRESS"):
        monkeypatch.delenv(name, raising=False)


def test_without_a_job_service_the_api_says_so(no_services, answer):
    status, body = answer("jobs")
    assert status == 503 and body["error"]["code"] == "unavailable", body
    assert "GPULAB_JOBS_URL is not set" in body["error"]["message"]
    SPEC.validate("/jobs", "get", 503, body)


def test_schedules_go_to_the_job_service_too(no_services, answer):
    for path, method in [
        (("schedules",), "GET"),
        (("schedules", "a" * 32), "PATCH"),
        (("schedules", "a" * 32, "run"), "POST"),
    ]:
        status, body = answer(*path, method=method, body="{}" if method != "GET" else None)
        assert status == 503 and "the job service is not configured" in body["error"]["message"], (path, body)
    SPEC.validate("/schedules", "get", 503, body)


def test_an_unknown_path_under_the_api_is_a_json_404(no_services, answer):
    status, body = answer("no-such-thing")
    assert status == 404 and body["error"]["code"] == "not_found", body


@pytest.fixture
def no_hub_token(monkeypatch):
    """A job service, but no token to call it with (set before the server starts, which reads them)."""
    monkeypatch.setenv("GPULAB_JOBS_URL", f"http://127.0.0.1:{free_port()}/services/gpulab-jobs/api/v1")
    monkeypatch.delenv("JUPYTERHUB_API_TOKEN", raising=False)


def test_without_a_hub_token_the_api_says_which_variable_is_missing(no_hub_token, answer):
    status, body = answer("jobs")
    assert status == 503 and "JUPYTERHUB_API_TOKEN is not set" in body["error"]["message"], body


def test_whoami_names_the_servers_user(no_services, answer):
    status, body = answer("whoami")
    assert status == 200, body
    SPEC.validate("/whoami", "get", 200, body)


@pytest.fixture
def unreachable_jobs(monkeypatch):
    """A job service URL nothing listens at (set before the server starts, which reads it)."""
    monkeypatch.setenv("GPULAB_JOBS_URL", f"http://127.0.0.1:{free_port()}/services/gpulab-jobs/api/v1")
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", "a-token-nobody-checks")


def test_a_body_over_the_limit_is_refused_before_the_service_is_called(unreachable_jobs, answer):
    status, body = answer("jobs", method="POST", body=b"x" * (MAX_BODY + 1))
    assert status == 413 and body["error"]["code"] == "too_large", body
    status, body = answer("jobs", method="POST", body=json.dumps({"name": "j"}))
    assert status == 503 and "gpulab-jobs is unreachable" in body["error"]["message"], body
