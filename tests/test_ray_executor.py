"""RayExecutor against a real two-node Ray cluster (the second node has a fake GPU)."""

import asyncio
import json
import os
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import requests

from gpulab.net import free_port
from gpulab.services.jobs.executors.base import ExecutorUnavailable, Handle, Launch
from gpulab.services.jobs.executors.ray import RayExecutor
from tests.support.net import next_loopback
from tests.support.ray_cluster import GPU_RESOURCE, RayCluster

pytestmark = pytest.mark.timeout(240)
FROM_RAY = Path("/nonexistent/attempt-1.log")  # no saved log: read_logs asks Ray


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = RayCluster.start(tmp_path_factory.mktemp("ray"), gpu_node=True, timeout=90)
    yield cluster
    cluster.stop()
    assert cluster.leftovers() == []


@pytest.fixture
async def executor(cluster):
    executor = RayExecutor(address=cluster.address, pool_resources={"gpu": GPU_RESOURCE})
    yield executor
    await executor.close()


def launch(
    code: str,
    tmp_path: Path,
    *,
    pool: str = "default",
    gpus: int = 0,
    env: dict | None = None,
    job_id: str | None = None,
) -> Launch:
    return Launch(
        job_id=job_id or os.urandom(6).hex(),
        attempt=1,
        owner="alice",
        argv=[sys.executable, "-c", code],
        working_dir=str(tmp_path),
        env=env or {},
        gpus=gpus,
        cpus=1,
        memory=None,
        pool=pool,
        log_path=tmp_path / "attempt-1.log",
    )


async def wait_done(executor: RayExecutor, handle: Handle, timeout: float = 90):
    deadline = time.monotonic() + timeout
    while (outcome := await executor.poll(handle)).state in ("starting", "running"):
        assert time.monotonic() < deadline, f"{handle.ref} still running after {timeout}s"
        await asyncio.sleep(0.3)
    return outcome


async def wait_for_log(executor: RayExecutor, handle: Handle, text: str, timeout: float = 90) -> str:
    deadline = time.monotonic() + timeout
    while text not in (logs := (await executor.read_logs(handle, FROM_RAY, 0, 1 << 20)).decode()):
        assert time.monotonic() < deadline, f"{text!r} not in the log of {handle.ref}:\n{logs}"
        await asyncio.sleep(0.3)
    return logs


async def test_capacity_per_pool(executor):
    capacity = await executor.capacity()
    assert set(capacity) == {"default", "gpu"}
    assert (capacity["gpu"].gpus, capacity["gpu"].cpus) == (1, 2)
    assert (capacity["default"].gpus, capacity["default"].cpus) == (0, 2)  # nodes without a pool resource
    assert capacity["gpu"].memory > 0


async def test_cpu_job_succeeds_and_logs_its_output(executor, tmp_path):
    code = (
        "import os; print('hello from gpulab', os.environ['GREETING'],"
        " repr(os.environ['CUDA_VISIBLE_DEVICES']), os.environ['GPULAB_WORKING_DIR'])"
    )
    handle = await executor.start(launch(code, tmp_path, env={"GREETING": "hi there"}))
    assert handle.executor == "ray" and handle.ref.startswith("gpulab-")
    outcome = await wait_done(executor, handle)
    assert (outcome.state, outcome.exit_code) == ("succeeded", 0)
    log_path = tmp_path / "attempt-1.log"
    logs = await executor.read_logs(handle, log_path, 0, 1 << 20)  # from Ray: no file yet
    assert f"hello from gpulab hi there '' {tmp_path}" in logs.decode()
    assert await executor.read_logs(handle, log_path, 5, 10) == logs[5:15]
    await executor.save_logs(handle, log_path)
    assert log_path.read_bytes() == logs
    log_path.write_bytes(b"from the file")
    assert await executor.read_logs(handle, log_path, 5, 3) == b"the"


async def test_job_waiting_for_resources_is_starting(cluster, tmp_path):
    executor = RayExecutor(address=cluster.address, pool_resources={"nowhere": "no_node_has_this"})
    try:
        handle = await executor.start(launch("print('never')", tmp_path, pool="nowhere"))
        outcome = await executor.poll(handle)
        assert outcome.state == "starting" and outcome.reason.startswith("PENDING: Job has not started yet")
        started = time.monotonic()
        await executor.cancel(handle, grace=0.5)  # Ray keeps it PENDING (stopped once it starts)
        assert time.monotonic() - started < 5
    finally:
        await executor.close()


async def test_gpu_job_runs_on_the_gpu_node_with_cuda_visible_devices(executor, cluster, tmp_path):
    code = "import os; print('CUDA_VISIBLE_DEVICES=' + os.environ['CUDA_VISIBLE_DEVICES'])"
    handle = await executor.start(launch(code, tmp_path, pool="gpu", gpus=1))
    assert (await wait_done(executor, handle)).state == "succeeded"
    assert "CUDA_VISIBLE_DEVICES=0" in (await executor.read_logs(handle, FROM_RAY, 0, 1 << 20)).decode()
    [gpu_node] = [n["node_id"] for n in cluster.nodes() if GPU_RESOURCE in n["resources_total"]]
    assert cluster.get(f"/api/jobs/{handle.ref}")["driver_node_id"] == gpu_node


async def test_cancel_stops_a_sleeping_job(executor, tmp_path):
    handle = await executor.start(launch("import time; print('sleeping', flush=True); time.sleep(300)", tmp_path))
    await wait_for_log(executor, handle, "sleeping")
    started = time.monotonic()
    await executor.cancel(handle, grace=5)
    outcome = await wait_done(executor, handle, timeout=30)
    assert (outcome.state, outcome.reason, outcome.retryable) == ("failed", "stopped", False)
    assert time.monotonic() - started < 20
    await executor.cancel(handle, grace=5)  # stopping a stopped job is fine


async def test_same_attempt_submitted_twice_runs_once(executor, tmp_path):
    marker = tmp_path / "runs"
    attempt = launch(f"open({str(marker)!r}, 'a').write('ran\\n')", tmp_path)
    first = await executor.start(attempt)
    assert await executor.start(attempt) == first
    assert (await wait_done(executor, first)).state == "succeeded"
    assert await executor.start(attempt) == first  # also after it finished
    assert marker.read_text() == "ran\n"


async def test_failing_job_reports_its_exit_code(executor, tmp_path):
    handle = await executor.start(launch("import sys; print('about to fail'); sys.exit(3)", tmp_path))
    outcome = await wait_done(executor, handle)
    assert (outcome.state, outcome.exit_code, outcome.retryable) == ("failed", 3, False)
    assert "exit code 3" in outcome.reason
    assert "about to fail" in (await executor.read_logs(handle, FROM_RAY, 0, 1 << 20)).decode()


async def test_unknown_job_is_lost(executor):
    outcome = await executor.poll(Handle(executor="ray", ref="gpulab-nosuchjob-1"))
    assert outcome.state == "lost"


async def forward(port: int, target_port: int) -> asyncio.Server:
    """A TCP proxy 127.0.0.1:port -> 127.0.0.1:target_port: the dashboard coming back at ``port``."""

    async def pipe(reader, writer):
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    async def handle(reader, writer):
        target_reader, target_writer = await asyncio.open_connection("127.0.0.1", target_port)
        await asyncio.gather(pipe(reader, target_writer), pipe(target_reader, writer), return_exceptions=True)

    return await asyncio.start_server(handle, "127.0.0.1", port)


async def test_unreachable_dashboard_opens_the_circuit_then_a_probe_recovers(cluster, tmp_path):
    port = free_port()
    address = f"http://127.0.0.1:{port}"
    executor = RayExecutor(
        address=address, pool_resources={"gpu": GPU_RESOURCE}, failure_threshold=3, recovery_timeout=1.0
    )
    try:
        started = time.monotonic()
        with pytest.raises(ExecutorUnavailable, match=f"ray at {address} is unavailable"):
            await executor.capacity()  # 3 retried GETs, refused: the circuit opens
        assert time.monotonic() - started < 3
        assert executor.breaker.state == "open"

        for call in (executor.capacity(), executor.start(launch("print(1)", tmp_path))):
            started = time.monotonic()
            with pytest.raises(ExecutorUnavailable) as err:
                await call
            assert time.monotonic() - started < 0.010
            assert str(err.value) == f"ray at {address} is unavailable (circuit open, retry in 1 s)"

        server = await forward(port, int(cluster.address.rsplit(":", 1)[1]))
        try:
            await asyncio.sleep(1.0)
            assert executor.breaker.state == "half_open"
            assert (await executor.capacity())["gpu"].gpus == 1
            assert executor.breaker.snapshot()["state"] == "closed"
        finally:
            server.close()
    finally:
        await executor.close()


def test_gpu_job_through_the_platform_runs_on_the_gpu_node(cluster, tmp_path):
    """gpulab-on-Ray end to end: hub, gpulab-jobs with the Ray executor, a GPU job in pool 'gpu'."""
    from tests.support.gpulab_up import Platform
    from tests.support.jobs import Client

    hub = Platform(tmp_path / "data", host=next_loopback())
    hub.start(f"""
c.Platform.mlflow_service = False
c.Roles.everyone = ["gpulab-user", "gpulab-gpu"]
c.JobQueue.executor_class = "ray"
c.JobQueue.tick_interval = 0.2
c.RayExecutor.address = {cluster.address!r}
c.RayExecutor.pool_resources = {{"gpu": {GPU_RESOURCE!r}}}
""")
    try:
        hub.create_user("alice")
        alice = Client(hub, "alice")
        code = (
            "import os, gpulab; print('CVD=' + os.environ['CUDA_VISIBLE_DEVICES']); "
            "print('token:', bool(os.environ.get('GPULAB_JOB_TOKEN'))); gpulab.progress(1, 2, loss=0.5)"
        )
        spec = {"name": "on-ray", "entrypoint": [sys.executable, "-c", code], "resources": {"gpus": 1, "pool": "gpu"}}
        job_id = alice.submit(**spec)["id"]
        job = alice.wait(job_id, timeout=120)
        logs = alice.logs(job_id)
        assert job["state"] == "succeeded", (job, logs)
        assert "CVD=0" in logs and job["log_size"] == len(logs.encode())  # copied into the job's log file
        # Ray's dashboard shows runtime_env to all who reach it: only a ticket there, claimed once by the runner
        ray_job = json.loads(urllib.request.urlopen(f"{cluster.address}/api/jobs/gpulab-{job_id}-1", timeout=30).read())
        shown = ray_job["runtime_env"]["env_vars"]
        assert not {"GPULAB_JOB_TOKEN", "MLFLOW_TRACKING_TOKEN"} & shown.keys() and shown["GPULAB_CREDENTIALS_TICKET"]
        assert "token: True" in logs and job["progress"]["step"] == 1  # the claimed token works
        claim = requests.post(
            f"{alice.base}/jobs/{job_id}/credentials",
            timeout=30,
            headers={"Authorization": f"job-ticket {shown['GPULAB_CREDENTIALS_TICKET']}"},
        )
        assert claim.status_code == 403, claim.text  # the attempt is over
        events = alice.request("GET", f"/jobs/{job_id}/events").json()["events"]
        states = [e["to_state"] for e in events]  # `running` only if a poll saw Ray's RUNNING
        assert states in (["queued", "dispatching", "running", "succeeded"], ["queued", "dispatching", "succeeded"])
        pools = {p["name"]: p for p in alice.request("GET", "/pools").json()["pools"]}
        assert pools["gpu"]["capacity"]["gpus"] == 1 and pools["default"]["capacity"]["gpus"] == 0
    finally:
        hub.stop()


async def test_node_death_is_a_retryable_failure(executor, cluster, tmp_path):
    """Last: it kills the fake-GPU node."""
    handle = await executor.start(
        launch("import time; print('up', flush=True); time.sleep(300)", tmp_path, pool="gpu", gpus=1)
    )
    await wait_for_log(executor, handle, "up")
    cluster.kill_raylet(1)
    outcome = await wait_done(executor, handle, timeout=90)
    assert (outcome.state, outcome.retryable) == ("failed", True), outcome
    assert "died" in outcome.reason
