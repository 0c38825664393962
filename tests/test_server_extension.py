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

    async def call(*path, method="GET", body=None, params=None):
        try:
            r = await jp_fetch(*API, *path, method=method, body=body, params=params)
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


@pytest.fixture
def parametrised(jp_root_dir):
    """``work/train.ipynb`` below the server's root, with a cell tagged ``parameters``."""
    import nbformat

    nb = nbformat.v4.new_notebook(
        metadata={"kernelspec": {"name": "python3", "language": "python", "display_name": "Python 3"}}
    )
    nb.cells = [
        nbformat.v4.new_code_cell("lr = 0.01  # learning rate\nepochs: int = 5\noptimizer = 'adam'\nstart = now()\n"),
        nbformat.v4.new_code_cell("print(lr * epochs)"),
    ]
    nb.cells[0].metadata["tags"] = ["parameters"]
    (jp_root_dir / "work").mkdir()
    nbformat.write(nb, jp_root_dir / "work" / "train.ipynb")
    return "work/train.ipynb"


def test_a_notebooks_parameters_are_read_as_papermill_reads_them(no_services, answer, parametrised):
    status, body = answer("notebooks", "parameters", params={"path": "work/train.ipynb"})
    assert status == 200, body
    SPEC.validate("/notebooks/parameters", "get", 200, body)
    assert body["kernel"] == "python3"
    found = {p["name"]: (p["type"], p["value"], p["literal"], p["help"]) for p in body["parameters"]}
    assert found == {
        "lr": ("float", 0.01, True, "learning rate"),
        "epochs": ("int", 5, True, ""),
        "optimizer": ("str", "adam", True, ""),
        "start": ("", None, False, ""),  # an expression: kept as the notebook has it unless given
    }


def test_notebook_paths_and_kernels_are_checked_before_the_job_service(no_services, answer, parametrised, jp_root_dir):
    for path, status, field in [
        (None, 400, "path"),
        ("../etc/passwd.ipynb", 422, "path"),
        ("work/train.py", 422, "path"),
        ("work/missing.ipynb", 404, "path"),
    ]:
        got, body = answer("notebooks", "parameters", params={"path": path} if path else None)
        assert (got, body["error"]["field"]) == (status, field), (path, body)
        SPEC.validate("/notebooks/parameters", "get", status, body)
    for request, status, field in [
        ({"path": "work/train.ipynb", "kernel": "no-such-kernel"}, 422, "kernel"),
        ({"path": "work/train.ipynb", "gpus": -1}, 422, "gpus"),
        ({"path": "work/train.ipynb", "colour": "red"}, 422, "colour"),
        ({"path": "/abs/train.ipynb"}, 422, "path"),
        ({"path": "work/train.ipynb", "files": ["../secrets"]}, 422, "files"),
        ({"path": "work/train.ipynb", "files": ["missing.csv"]}, 422, "files"),
    ]:
        got, body = answer("notebooks", "jobs", method="POST", body=json.dumps(request))
        assert (got, body["error"]["field"]) == (status, field), (request, body)
        SPEC.validate("/notebooks/jobs", "post", status, body)
    # A good request gets as far as the job service, which this server does not have.
    got, body = answer(
        "notebooks", "jobs", method="POST", body=json.dumps({"path": parametrised, "parameters": {"lr": 1}})
    )
    assert got == 503 and "the job service is not configured" in body["error"]["message"], body


def test_a_notebook_schedule_is_checked_like_a_notebook_job(no_services, answer, parametrised):
    for request, status, field in [
        ({"path": parametrised}, 422, "cron"),  # no cron: a job, not a schedule
        ({"path": parametrised, "cron": "0 3 * * *", "overlap": "sometimes"}, 422, "overlap"),
        ({"path": "work/none.ipynb", "cron": "0 3 * * *"}, 404, "path"),
    ]:
        got, body = answer("notebooks", "schedules", method="POST", body=json.dumps(request))
        assert (got, body["error"]["field"]) == (status, field), (request, body)
        SPEC.validate("/notebooks/schedules", "post", status, body)
    got, body = answer(
        "notebooks", "schedules", method="POST", body=json.dumps({"path": parametrised, "cron": "@daily"})
    )
    assert got == 503 and "the job service is not configured" in body["error"]["message"], body


def test_a_pipeline_file_is_checked_before_anything_is_submitted(no_services, answer, jp_root_dir):
    (jp_root_dir / "cycle.yaml").write_text(
        "name: loop\nsteps:\n  - {name: a, source: 'pass', needs: [b]}\n  - {name: b, source: 'pass', needs: [a]}\n"
    )
    (jp_root_dir / "unknown.yml").write_text("steps:\n  - {name: a, source: 'pass', needs: [ghost]}\n")
    (jp_root_dir / "fine.yaml").write_text("steps:\n  - {name: a, source: 'pass'}\n")
    for path, status, says in [
        ("cycle.yaml", 422, "steps: a -> b -> a form a cycle"),
        ("unknown.yml", 422, "step 'a' needs 'ghost', which is not a step of this pipeline"),
        ("missing.yaml", 404, "there is no file missing.yaml"),
        ("fine.txt", 422, "must name a pipeline file"),
    ]:
        got, body = answer("pipelines", method="POST", body=json.dumps({"path": path}))
        assert got == status and says in body["error"]["message"], (path, body)
        SPEC.validate("/pipelines", "post", status, body)
    got, body = answer("pipelines", method="POST", body=json.dumps({"path": "fine.yaml"}))
    assert got == 503 and "GPULAB_JOBS_URL is not set" in body["error"]["message"], body
