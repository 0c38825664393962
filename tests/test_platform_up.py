"""`gpulab up` end to end: the embedded default starts, a user signs in and spawns, and it all stops."""

import os
import signal
import socket
import time
from pathlib import Path

import psutil
import pytest
import requests

from tests.support.gpulab_up import Platform
from tests.support.login import api_session_token, password_login, wait_for_lab
from tests.support.net import next_loopback


@pytest.fixture
def platform(tmp_path):
    p = Platform(tmp_path / "data", host=next_loopback()).start("c.Platform.inference_service = True\n")
    yield p
    p.stop()


def test_up_login_spawn_whoami_and_clean_stop(platform):
    print(f"startup to login page: {platform.startup_seconds:.1f}s")
    password_file = platform.data_dir / "secrets" / "admin-password"
    assert password_file.stat().st_mode & 0o777 == 0o600
    password = password_file.read_text().strip()
    assert len(password) >= 32
    assert password in platform.log_path.read_text()  # printed once, on first start

    with pytest.raises(PermissionError):
        password_login(platform.url, "admin", "not-the-password")
    t0 = time.monotonic()
    session = password_login(platform.url, "admin", password)
    wait_for_lab(session, platform.url, "admin")
    print(f"login + spawn to JupyterLab: {time.monotonic() - t0:.1f}s")

    token = api_session_token(session, platform.url, "admin")
    r = requests.get(
        f"{platform.url}/user/admin/gpulab/api/v1/whoami", headers={"Authorization": f"token {token}"}, timeout=30
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["name"] == "admin" and body["admin"] is True
    assert "custom:gpulab:admin" in body["scopes"] and "custom:gpulab:jobs" in body["scopes"]

    info = requests.get(
        f"{platform.url}/hub/api/services/gpulab-infer", headers={"Authorization": f"token {token}"}, timeout=30
    ).json()["info"]
    gateway = info["grpc_address"]
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(gateway)
    deadline = time.monotonic() + 120  # the embedded Triton starts beside the hub
    while time.monotonic() < deadline:
        try:
            if client.is_server_ready(headers={"authorization": f"token {token}"}):
                break
        except Exception:
            time.sleep(1)
    assert client.is_server_ready(headers={"authorization": f"token {token}"})
    rest = requests.get(
        f"http://{info['rest_address']}/v2/health/ready", headers={"Authorization": f"token {token}"}, timeout=30
    )  # KServe v2 REST on the gateway, to the embedded Triton's HTTP port
    assert rest.status_code == 200, rest.text
    assert (
        requests.get(
            f"http://{info['rest_address']}/v2", headers={"Authorization": f"token {token}"}, timeout=30
        ).json()["name"]
        == "triton"
    )
    # the embedded Triton, killed, is started again on its ports (and says why it went in the platform's log)
    [triton] = running(platform, "tritonserver")
    triton.kill()
    deadline = time.monotonic() + 60
    while not [p for p in running(platform, "tritonserver") if p.pid != triton.pid]:
        assert time.monotonic() < deadline, "the embedded Triton was not started again"
        time.sleep(0.5)
    while (
        requests.get(
            f"http://{info['rest_address']}/v2", headers={"Authorization": f"token {token}"}, timeout=30
        ).status_code
        != 200
    ):
        assert time.monotonic() < deadline, "the gateway did not reach the restarted Triton"
        time.sleep(0.5)
    assert f"tritonserver (pid {triton.pid}) exited with status -9" in platform.log_path.read_text()
    # it listens on no TCP port, only on unix sockets in a directory of the service's account alone, so it needs
    # no key (none on its command line, which every account can read)
    [triton] = running(platform, "tritonserver")
    listening = [c for c in triton.net_connections(kind="all") if c.status in (psutil.CONN_LISTEN, psutil.CONN_NONE)]
    assert not [c for c in listening if c.family != socket.AF_UNIX], listening
    sockets = platform.data_dir / "triton"
    assert {Path(c.laddr) for c in listening if c.laddr} == {
        sockets / "grpc.sock:0",
        sockets / "http.sock",
        sockets / "metrics.sock",
    }, listening
    assert sockets.stat().st_mode & 0o777 == 0o700
    assert not any("restricted" in arg for arg in triton.cmdline()), triton.cmdline()
    # the gateway (nginx in front of the Python gateway) listens on TCP only where users call it: its gRPC and
    # REST ports and the service's HTTP port; the hops between nginx and Python are unix sockets
    [service] = [p for p in platform.descendants() if p.cmdline()[-2:] == ["-m", "gpulab.services.infer"]]
    public = {int(a.rsplit(":", 1)[1]) for a in (info["grpc_address"], info["rest_address"])}
    public.add(int(service.environ()["JUPYTERHUB_SERVICE_URL"].rstrip("/").rsplit(":", 1)[1]))
    gateway_parts = [service, *service.children(recursive=True)]
    assert any(p.name() == "nginx" for p in gateway_parts)
    tcp = {
        c.laddr.port for p in gateway_parts for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN
    }
    assert tcp == public, (tcp, public)

    started = platform.descendants()
    names = " ".join(" ".join(p.cmdline()) for p in started)
    for part in (
        "jupyterhub",
        "configurable-http-proxy",
        "singleuser",
        "gpulab.services.jobs",
        "gpulab.services.mlflow",
        "gpulab.services.infer",
        "tritonserver",
    ):
        assert part in names, part
    if os.geteuid() == 0:  # isolation 'accounts': each part as little as it needs
        runs_as = {}
        for p in started:
            for part in ("jupyterhub.singleuser", "gpulab.services", "tritonserver", "nginx", "mlflow.server"):
                if part in " ".join(p.cmdline()):
                    runs_as.setdefault(p.username(), set()).add(" ".join(p.cmdline()))
        service_parts = runs_as.pop(platform.service_account)
        for part in ("gpulab.services.mlflow", "gpulab.services.infer", "tritonserver", "-m gpulab.services.jobs"):
            assert any(part in what for what in service_parts), (part, runs_as)
        assert {u for u, parts in runs_as.items() if any("singleuser" in w for w in parts)} == {
            f"{platform.account_prefix}admin"
        }, runs_as
        # of the job service only its launcher keeps root: it starts jobs as their owners' accounts
        [launcher] = runs_as.pop("root")
        assert launcher.split()[1:4] == ["-I", "-m", "gpulab.services.jobs.executors.launcher"], launcher
    assert platform.stop() == 0
    time.sleep(0.5)
    left = [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, f"left running: {[p.cmdline() for p in left]}"


def running(platform, name: str) -> list[psutil.Process]:
    """The platform's live processes called ``name``."""
    found = []
    for process in platform.descendants():
        try:
            if process.name() == name and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except psutil.Error:  # gone meanwhile
            pass
    return found


def test_second_start_reuses_password_without_printing_it(tmp_path):
    first = Platform(tmp_path / "data", host=next_loopback()).start()
    first.stop()
    password = (first.data_dir / "secrets" / "admin-password").read_text().strip()
    first.log_path.unlink()
    second = Platform(tmp_path / "data", host=next_loopback(), admin_token=first.admin_token).start()
    try:
        assert password not in second.log_path.read_text()
        password_login(second.url, "admin", password)
    finally:
        assert second.stop() in (0, -signal.SIGTERM)
