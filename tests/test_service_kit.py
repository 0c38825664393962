"""The service kit (gpulab/service/): one error answer for every REST API, one gRPC<->HTTP table, one
supervisor of child processes.

The handlers run in-process on tornado's HTTP server (as jupyter_server's ``jp_fetch`` does): what is tested is
the answer a handler's error becomes, not a service. The supervisor runs real processes.
"""

import asyncio
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import grpc
import psutil
import pytest
import requests
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, Field
from tornado import web
from tornado.httpclient import AsyncHTTPClient
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from traitlets.config import Config

from gpulab.config import OVERRIDES_ENV, Platform
from gpulab.hub_config.services import builtin_services
from gpulab.inference.triton import TritonServer
from gpulab.service import errors
from gpulab.service.errors import STATUSES, APIError
from gpulab.service.handlers import JSONAPIMixin
from gpulab.service.loop_lag import LoopLag
from gpulab.service.supervisor import Child, ChildFailed, Supervisor, wait_until
from gpulab.services.infer.rest import ErrorHandler
from gpulab.services.mlflow import ProxyHandler
from tests.support.gpulab_up import Platform as GpulabUp
from tests.support.greeter_service import Greeter, GreeterApp
from tests.support.triton import REPO


class Body(BaseModel):
    name: str = Field(max_length=8)
    gpus: int = 0


class Handler(JSONAPIMixin, web.RequestHandler):
    log_name = "gpulab-test"

    def get(self, what):
        if what == "api":
            raise APIError(
                409,
                "job 1 is 100% done",
                field="state",
                code="conflict",
                headers={"Retry-After": "3"},
                details={"job": 1},
            )
        if what == "tornado":
            raise web.HTTPError(400, "malformed %s", "query")
        if what == "bug":
            raise KeyError("secret-internal-detail")
        if what == "upstream":
            raise web.HTTPError(502, "a dependency's message")
        self.write_json({"ok": what})

    def post(self, what):
        self.write_json(self.parse(Body), 201)


class KServe(ErrorHandler):
    def get(self):
        raise APIError(404, "no model 'x'")


class MLflow(ProxyHandler):
    def initialize(self):
        self.has_body, self.body, self.refusal = False, None, None

    async def prepare(self):
        raise APIError(401, "authentication required")


@pytest.fixture
async def serve(loopback):
    sockets = bind_sockets(0, loopback)
    app = web.Application([(r"/kserve", KServe), (r"/mlflow", MLflow), (r"/(\w+)", Handler)])
    server = HTTPServer(app)
    server.add_sockets(sockets)
    base = f"http://{loopback}:{sockets[0].getsockname()[1]}"

    async def fetch(path, method="GET", body=None):
        r = await AsyncHTTPClient().fetch(base + path, method=method, body=body, raise_error=False)
        return r.code, r.headers, json.loads(r.body) if r.body else None

    yield fetch
    server.stop()


async def test_api_error_answers_with_its_code_field_headers_and_details(serve):
    code, headers, body = await serve("/api")
    assert code == 409 and headers["Retry-After"] == "3" and headers["Content-Type"] == "application/json"
    assert body == {
        "error": {"code": "conflict", "message": "job 1 is 100% done", "field": "state", "details": {"job": 1}}
    }


async def test_tornado_errors_under_500_keep_their_message_and_get_a_code(serve):
    code, _, body = await serve("/tornado")
    assert (code, body) == (400, {"error": {"code": "bad_request", "message": "malformed query", "field": None}})


async def test_failures_of_ours_say_where_to_look_and_leak_nothing(serve):
    for path in ("/bug", "/upstream"):  # a 5xx that is not an APIError is ours, whatever it says
        code, _, body = await serve(path)
        assert code == 500 if path == "/bug" else 502
        assert body == {
            "error": {"code": "internal", "message": "internal error; see the gpulab-test log", "field": None}
        }, path


async def test_every_405_names_the_methods_in_allow(serve):
    code, headers, body = await serve("/x", method="DELETE")
    assert code == 405 and headers["Allow"] == "GET, POST"
    assert body["error"]["code"] == "method_not_allowed" and "use GET, POST" in body["error"]["message"]


async def test_bodies_are_parsed_into_models_naming_the_field_at_fault(serve):
    assert (await serve("/x", "POST", b'{"name": "a"}'))[::2] == (201, {"name": "a", "gpus": 0})
    code, _, body = await serve("/x", "POST", b'{"name": "much too long"}')
    assert code == 422 and body["error"]["field"] == "name" and body["error"]["code"] == "invalid"
    for raw, message in (
        (b"{", "not valid JSON"),
        (b"[1]", "must be a JSON object"),
        (b"[" * 100_000, "not valid JSON|nested too deeply"),
    ):
        code, _, body = await serve("/x", "POST", raw)
        assert code == 400 and body["error"]["code"] == "invalid_json" and re.search(message, body["error"]["message"])


async def test_protocols_with_their_own_error_shape_keep_it(serve):
    assert (await serve("/kserve"))[::2] == (404, {"error": "no model 'x'"})  # KServe v2 REST
    code, _, body = await serve("/mlflow")
    assert (code, body) == (401, {"error_code": "UNAUTHENTICATED", "message": "authentication required"})


def test_one_table_between_grpc_and_http():
    for status in STATUSES:
        code = grpc.StatusCode[status.grpc]
        assert code.value[0] == status.number  # the wire number the nginx plane uses
        assert errors.http_status(code) == errors.http_status(f"StatusCode.{status.grpc}") == status.http
        assert errors.grpc_name(status.http) == status.grpc and errors.error_code(code) == status.code
    assert errors.http_status(grpc.StatusCode.ABORTED) == 500 and errors.http_status("ABORTED", 503) == 503
    assert errors.grpc_name(502) == "UNAVAILABLE" and errors.grpc_name(418) == "UNKNOWN"


def test_the_nginx_plane_gets_the_same_table():
    tables = errors.lua_tables()
    rest_status = dict(re.findall(r"\[(\d+)\] = (\d+)", tables.split("rest_code")[0]))
    rest_code = dict(re.findall(r"\[(\d+)\] = (\d+)", tables.split("rest_code")[1]))
    assert rest_status == {str(s.number): str(s.http) for s in STATUSES if s.grpc != "OK"}
    assert rest_code == {str(s.http): str(s.number) for s in STATUSES} | {"502": "14"}


# The supervisor, with real child processes (python -c ...).


def python(code: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], **kwargs)


async def wait_for(predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)
    return value


async def test_a_child_that_exits_is_started_again_and_its_exit_logged(caplog):
    child = Child("worker", lambda: python("import time; time.sleep(60)"), log_tail=lambda: "last words")
    supervisor = Supervisor(logging.getLogger("test.supervisor"), healthy_after=0.0, poll_interval=0.05)
    await supervisor.start(child)
    first = child.proc
    watch = asyncio.create_task(supervisor.run())
    try:
        first.kill()
        second = await wait_for(lambda: child.proc is not first and child.proc)
        assert second.poll() is None and child.delay == 0.0  # after a healthy run: at once
        assert (
            f"worker (pid {first.pid}) exited with status -9; starting it again in 0 s; its log ends:\nlast words"
            in caplog.text
        )
    finally:
        watch.cancel()
        await supervisor.stop(timeout=5)
    assert second.poll() is not None


async def test_a_child_failing_early_is_started_again_later_and_later(caplog):
    spawned = []

    def spawn():
        spawned.append(time.monotonic())
        return python("raise SystemExit(3)")

    child = Child("flaky", spawn)
    supervisor = Supervisor(logging.getLogger("test.supervisor"), healthy_after=30.0, poll_interval=0.05)
    await supervisor.start(child)
    watch = asyncio.create_task(supervisor.run())
    try:
        await wait_for(lambda: len(spawned) >= 3, timeout=15)
    finally:
        watch.cancel()
        await supervisor.stop(timeout=5)
    gaps = [b - a for a, b in zip(spawned, spawned[1:])]
    assert gaps[0] >= 0.95 and gaps[1] >= 1.95, gaps  # 1 s, then 2 s (and the time to see each exit)
    delays = re.findall(r"flaky \(pid \d+\) exited with status 3; starting it again in (\d+) s", caplog.text)
    assert delays[:2] == ["1", "2"], caplog.text


async def test_stop_kills_by_pid_what_ignores_its_signal_and_the_childs_group():
    code = (
        "import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); print(p.pid, flush=True); "
        "time.sleep(60)"
    )
    child = Child("stubborn", lambda: python(code, stdout=subprocess.PIPE, start_new_session=True), group=True)
    supervisor = Supervisor(logging.getLogger("test.supervisor"))
    await supervisor.start(child)
    grandchild = int(await asyncio.to_thread(child.proc.stdout.readline))
    started = time.monotonic()
    await supervisor.stop(timeout=1)
    assert child.proc.returncode == -9 and 0.9 < time.monotonic() - started < 5
    await wait_for(lambda: not psutil.pid_exists(grandchild) or psutil.Process(grandchild).status() == "zombie")
    child.proc.stdout.close()


async def test_a_child_not_ready_is_stopped_and_named():
    async def never() -> bool:
        return False

    child = Child(
        "slow", lambda: python("import time; time.sleep(60)"), ready=lambda proc: wait_until(never, proc, 0.5, "slow")
    )
    supervisor = Supervisor(logging.getLogger("test.supervisor"))
    with pytest.raises(ChildFailed, match="slow was not ready in 0 s|slow was not ready in 1 s"):
        await supervisor.start(child)
    assert child.proc.poll() is not None and supervisor.children == []
    dead = Child(
        "dead",
        lambda: python("raise SystemExit(7)"),
        ready=lambda proc: wait_until(never, proc, 10, "dead", lambda: "why"),
    )
    with pytest.raises(ChildFailed, match="dead exited with status 7:\nwhy"):
        await supervisor.start(dead)


async def test_loop_lag_sees_a_blocking_call():
    registry = CollectorRegistry()
    lag = LoopLag(registry, "t", interval=0.01)
    task = asyncio.create_task(lag.run())
    await asyncio.sleep(0.05)
    assert lag.recent_max() < 0.1
    time.sleep(0.3)  # noqa: ASYNC251 -- on purpose: what a synchronous database call does to the loop
    await asyncio.sleep(0.05)
    task.cancel()
    assert 0.25 < lag.recent_max() < 2.0
    assert registry.get_sample_value("t_event_loop_lag_max_seconds") == pytest.approx(lag.recent_max())
    assert registry.get_sample_value("t_event_loop_lag_seconds_bucket", {"le": "0.1"}) >= 3


def test_loop_lag_keeps_the_largest_of_its_window():
    lag = LoopLag(CollectorRegistry(), "w", window=10)
    now = time.monotonic()
    for age, value in ((20, 5.0), (5, 0.1), (4, 0.3), (1, 0.2)):  # the 5 s lag is older than the window
        lag.record(value, now - age)
    assert lag.recent_max() == 0.3


async def test_a_child_that_must_keep_trying_is_started_again_after_a_failed_first_start(caplog):
    codes = iter(["raise SystemExit(4)", "import time; time.sleep(60)"])  # fails once, then serves

    async def alive_after_a_second(proc):
        await asyncio.sleep(1)
        if proc.poll() is not None:
            raise ChildFailed(f"eventually exited with status {proc.returncode}")

    child = Child("eventually", lambda: python(next(codes)), ready=alive_after_a_second)
    supervisor = Supervisor(logging.getLogger("test.supervisor"), poll_interval=0.05)
    assert await supervisor.start(child, retry=True) is False
    assert supervisor.children == [child] and "eventually exited with status 4" in caplog.text
    watch = asyncio.create_task(supervisor.run())
    try:
        await wait_for(lambda: child.proc.poll() is None, timeout=15)  # started again after 1 s
    finally:
        watch.cancel()
        await supervisor.stop(timeout=5)


# A service process: ServiceApp


def test_a_service_reads_the_file_then_the_hubs_settings_then_its_command_line(tmp_path, monkeypatch):
    config = tmp_path / "gpulab_config.py"
    config.write_text("c.Greeter.greeting = 'from the file'\nc.Greeter.max_names = 5\nc.Platform.port = 8123\n")
    monkeypatch.setenv(OVERRIDES_ENV, json.dumps({"Greeter": {"max_names": 7}, "Platform": {"data_dir": "/srv/x"}}))
    monkeypatch.setenv("JUPYTERHUB_SERVICE_URL", "http://127.0.0.1:9/")
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", "t")
    monkeypatch.setenv("JUPYTERHUB_SERVICE_NAME", "greeter")
    app = GreeterApp()
    app.initialize(["--config", str(config), "--Greeter.greeting=from the command line"])
    greeter = Greeter(parent=app)
    assert (greeter.greeting, greeter.max_names) == ("from the command line", 7)
    assert (app.platform.port, app.data_dir) == (8123, Path("/srv/x"))
    assert (app.hub.name, app.hub.prefix, app.hub.api_token) == ("greeter", "/services/greeter/", "t")


@pytest.mark.parametrize(
    "args, env, expected",
    [
        (["--Greeter.max_names=0"], {}, "greeter: error: c.Greeter.max_names: "),
        ([], {OVERRIDES_ENV: json.dumps({"Greeter": {"max_name": 2}})}, "did you mean max_names?"),
        ([], {"JUPYTERHUB_SERVICE_URL": ""}, "JUPYTERHUB_SERVICE_URL not set"),
    ],
)
def test_a_service_refuses_a_bad_setting_in_one_line(tmp_path, args, env, expected):
    full = {**os.environ, "GPULAB_CONFIG": str(tmp_path / "absent.py"), "JUPYTERHUB_API_TOKEN": "t"}
    full.update({"JUPYTERHUB_SERVICE_URL": "http://127.0.0.1:9/", **env})
    if OVERRIDES_ENV not in env:
        full.pop(OVERRIDES_ENV, None)
    result = subprocess.run(
        [sys.executable, "-m", "tests.support.greeter_service", *args],
        env=full,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    assert expected in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_the_hub_gives_its_services_settings_and_the_admins_win(tmp_path):
    """What the hub decides for the built-in services travels as their settings (one JSON of the config's own
    classes and names), never as variables of their own; a setting the admin gave is not overridden."""
    cfg = Config()
    cfg.InferenceGateway.rest_address = ""  # no REST port: the admin's choice stands
    data_dir = tmp_path / "d"
    services = builtin_services(Platform(config=cfg), cfg, data_dir, tmp_path / "c.py", lambda name: f"t-{name}")
    by_name = {s["name"]: s for s in services}
    assert set(by_name) == {"mlflow", "gpulab-jobs", "gpulab-infer", "triton"}
    settings = {}
    for name, service in by_name.items():
        assert set(service["environment"]) == {"GPULAB_CONFIG", OVERRIDES_ENV}, name
        settings[name] = json.loads(service["environment"][OVERRIDES_ENV])
        assert settings[name]["Platform"] == {"data_dir": str(data_dir)}
    mlflow_url = f"{by_name['mlflow']['url']}/services/mlflow"
    assert settings["gpulab-jobs"]["JobQueue"] == {"mlflow_tracking_uri": mlflow_url, "mlflow_job_token": True}
    assert settings["mlflow"]["MLflowService"] == {
        "jobs_api_url": f"{by_name['gpulab-jobs']['url']}/services/gpulab-jobs/api/v1"
    }
    gateway = settings["gpulab-infer"]["InferenceGateway"]
    triton = settings["triton"]["TritonServer"]
    embedded = TritonServer(socket_dir=triton["socket_dir"])
    assert (gateway["replicas"], gateway["http_replicas"]) == ([embedded.grpc_address], [embedded.http_address])
    assert gateway["model_repository"] == triton["model_repository"] == str(data_dir / "models")
    assert gateway["mlflow_url"] == mlflow_url and gateway["platform_mlflow"] is True
    assert "rest_address" not in gateway and "rest_address" not in by_name["gpulab-infer"]["info"]
    assert gateway["address"] == by_name["gpulab-infer"]["info"]["grpc_address"]

    cfg.InferenceGateway.mlflow_url = "http://mlflow.example:5000"  # an MLflow of the admin's takes no hub token
    cfg.JobQueue.mlflow_tracking_uri = "http://mlflow.example:5000"
    services = builtin_services(Platform(config=cfg), cfg, data_dir, tmp_path / "c.py", lambda name: f"t-{name}")
    by_name = {s["name"]: json.loads(s["environment"][OVERRIDES_ENV]) for s in services}
    assert "JobQueue" not in by_name["gpulab-jobs"]
    assert not {"mlflow_url", "platform_mlflow"} & set(by_name["gpulab-infer"]["InferenceGateway"])


def test_a_fourth_service_is_its_domain_code_its_models_and_a_service_app(tmp_path, loopback):
    """tests/support/greeter_service.py, run by a real hub: the platform's config file and the hub's settings
    reach it; hub tokens, scopes, bodies and errors are handled as by every gpulab API."""
    service = {
        "name": "greeter",
        "command": [sys.executable, "-m", "tests.support.greeter_service"],
        "cwd": str(REPO),
        "environment": {OVERRIDES_ENV: json.dumps({"Greeter": {"max_names": 2}})},
    }
    hub = GpulabUp(tmp_path / "data", host=loopback)
    config = """
c.Greeter.greeting = "hej"
c.Platform.jobs_service = c.Platform.mlflow_service = False
c.Roles.extra_roles = c.Roles.extra_roles + [
    {"name": "greeters", "scopes": ["access:services!service=greeter"], "users": ["alice"]}]
"""
    hub.start(config, services=[service])
    try:
        hub.create_user("alice")
        token = hub.token("alice", scopes=["access:services!service=greeter"])
        url = f"{hub.url}/services/greeter/api/v1/greet"
        deadline = time.monotonic() + 60
        while (r := requests.post(url, json={"names": ["a"]}, headers=auth(token), timeout=10)).status_code != 200:
            assert r.status_code in (502, 503) and time.monotonic() < deadline, r.text  # starting
            time.sleep(0.3)
        r = requests.post(url, json={"names": ["a", "b"]}, headers=auth(token), timeout=10)
        assert r.json() == {"from": "alice", "greetings": ["hej, a", "hej, b"]}
        answers = {
            "too many": requests.post(url, json={"names": list("abc")}, headers=auth(token), timeout=10),
            "wrong type": requests.post(url, json={"names": "a"}, headers=auth(token), timeout=10),
            "not json": requests.post(url, data=b"{", headers=auth(token), timeout=10),
            "too large": requests.post(url, json={"names": ["x" * 2000]}, headers=auth(token), timeout=10),
            "no token": requests.post(url, json={"names": ["a"]}, timeout=10),
        }
        got = {
            what: (r.status_code, r.json()["error"]["code"], r.json()["error"].get("field"))
            for what, r in answers.items()
        }
        assert got == {
            "too many": (422, "invalid", "names"),
            "wrong type": (422, "invalid", "names"),
            "not json": (400, "invalid_json", None),
            "too large": (413, "too_large", None),
            "no token": (401, "unauthenticated", None),
        }
    finally:
        assert hub.stop() == 0


def auth(token: str) -> dict:
    return {"Authorization": f"token {token}"}
