"""gpulab.runner and gpulab.progress: real job processes, a real MLflow server, W&B offline, a recording service."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from mlflow import MlflowClient
from tornado import web
from wandb.proto import wandb_internal_pb2

from gpulab.net import free_port
from tests.support.mlflow_server import MlflowServer

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRAIN = """\
import os, signal, sys, time
import numpy as np
import mlflow
import gpulab

mode = sys.argv[1]
run = mlflow.start_run()  # resumes the runner's run from MLFLOW_RUN_ID
print("child run", run.info.run_id, flush=True)
mlflow.log_param("lr", 0.1)
rng = np.random.default_rng(0)
x = rng.normal(size=(64, 3))
y = x @ np.array([1.0, -2.0, 0.5])
w = np.zeros(3)
for step in range(1, 6):
    w -= 0.1 * 2 * x.T @ (x @ w - y) / len(x)
    gpulab.progress(step, 5, loss=float(np.mean((x @ w - y) ** 2)))
if mode == "fail":
    sys.exit(3)
if mode == "wait":
    def on_term(signum, frame):
        open("got-sigterm", "w").close()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    signal.signal(signal.SIGTERM, on_term)
    open("ready", "w").close()
    time.sleep(120)
"""


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    server = MlflowServer.start(tmp_path_factory.mktemp("mlflow"))
    print(f"mlflow server ready in {server.startup_seconds:.1f}s")
    yield server
    server.stop()


class JobsService:
    """Records the runner protocol's POSTs; rejects a wrong job token with 401."""

    def __init__(self, token: str):
        self.token = token
        self.calls: list[dict] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/services/gpulab-jobs/api/v1"
        service = self

        class Handler(web.RequestHandler):
            def post(self, job_id, endpoint):
                auth_ok = self.request.headers.get("Authorization") == f"job-token {service.token}"
                service.calls.append(
                    {
                        "job_id": job_id,
                        "endpoint": endpoint,
                        "auth_ok": auth_ok,
                        "body": json.loads(self.request.body),
                        "traceparent": self.request.headers.get("traceparent", ""),
                    }
                )
                self.set_status(204 if auth_ok else 401)

        app = web.Application([(r"/services/gpulab-jobs/api/v1/jobs/([^/]+)/(progress|heartbeat|tracking)", Handler)])
        self.server = app.listen(self.port, "127.0.0.1")

    def bodies(self, endpoint: str) -> list[dict]:
        return [c["body"] for c in self.calls if c["endpoint"] == endpoint]


@pytest.fixture
async def jobs_service():  # async: serves on the test's event loop
    service = JobsService(token=uuid.uuid4().hex)
    yield service
    service.server.stop()


def job_env(tmp_path: Path, jobs_url: str, token: str, mlflow_url: str | None = None) -> dict:
    """The environment the job service gives an attempt, with a fresh HOME to catch stray writes."""
    work, job_dir, home = tmp_path / "work", tmp_path / "job", tmp_path / "home"
    for d in (work, job_dir, home):
        d.mkdir(exist_ok=True)
    (work / "train.py").write_text(TRAIN)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPULAB_", "MLFLOW_", "WANDB_", "OTEL_"))}
    env.update(
        HOME=str(home),
        GPULAB_JOB_ID=uuid.uuid4().hex,
        GPULAB_JOB_OWNER="alice",
        GPULAB_JOB_NAME="demo-train",
        GPULAB_JOB_ATTEMPT="1",
        GPULAB_JOB_DIR=str(job_dir),
        GPULAB_WORKING_DIR=str(work),
        GPULAB_JOBS_URL=jobs_url,
        GPULAB_JOB_TOKEN=token,
        WANDB_PROJECT="gpulab-tests",
        TRACEPARENT=f"00-{TRACE_ID}-00f067aa0ba902b7-01",
    )
    if mlflow_url:
        env.update(MLFLOW_TRACKING_URI=mlflow_url, MLFLOW_EXPERIMENT_NAME="gpulab-tests")
    return env


async def start_job(env: dict, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gpulab.runner",
        "--",
        sys.executable,
        "train.py",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def run_job(env: dict, *args: str) -> tuple[int, str, str]:
    started = time.monotonic()
    proc = await start_job(env, *args)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    print(f"job {args} took {time.monotonic() - started:.1f}s")
    return proc.returncode, out.decode(), err.decode()


def the_run(mlflow_server: MlflowServer, job_id: str):
    client = MlflowClient(mlflow_server.url)
    experiment = client.get_experiment_by_name("gpulab-tests")
    runs = client.search_runs([experiment.experiment_id], f"tags.`gpulab.job_id` = '{job_id}'")
    assert len(runs) == 1, runs
    return client, runs[0]


def wandb_history(job_dir: Path, run_id: str) -> list[dict]:
    """History rows of the offline run ``run_id``, read from its ``.wandb`` log (LevelDB log format)."""
    [path] = (job_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    rows, pos, parts = [], 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        parts += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST fragment
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            parts = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or ".".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


async def test_job_succeeds_with_mlflow_wandb_and_progress(tmp_path, mlflow_server, jobs_service):
    env = job_env(tmp_path, jobs_service.url, jobs_service.token, mlflow_server.url)
    code, out, err = await run_job(env, "ok")
    assert code == 0, err

    client, run = the_run(mlflow_server, env["GPULAB_JOB_ID"])
    assert f"child run {run.info.run_id}" in out  # mlflow.start_run() in the child resumed it
    assert run.info.status == "FINISHED" and run.info.run_name == "demo-train"
    tags = run.data.tags
    assert (tags["gpulab.job_id"], tags["gpulab.user"], tags["gpulab.attempt"]) == (env["GPULAB_JOB_ID"], "alice", "1")
    assert tags["gpulab.trace_id"] == TRACE_ID and tags["mlflow.user"] == "alice"
    assert run.data.params == {"lr": "0.1"}
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == [1, 2, 3, 4, 5]
    losses = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert losses == sorted(losses, reverse=True)

    wandb_id = f"{env['GPULAB_JOB_ID']}-1"
    rows = wandb_history(tmp_path / "job", wandb_id)
    assert [(r["_step"], r["loss"]) for r in rows] == list(zip([1, 2, 3, 4, 5], losses))
    home = tmp_path / "home"
    assert not any("wandb" in str(p) for p in home.rglob("*")), list(home.rglob("*"))

    assert all(c["auth_ok"] and c["job_id"] == env["GPULAB_JOB_ID"] for c in jobs_service.calls)
    assert all(c["traceparent"].split("-")[1] == TRACE_ID for c in jobs_service.calls)
    progress = jobs_service.bodies("progress")
    assert progress[-1]["step"] == progress[-1]["total"] == 5
    assert progress[-1]["metrics"]["loss"] == pytest.approx(losses[-1])
    assert jobs_service.bodies("heartbeat")
    assert jobs_service.bodies("tracking") == [
        {
            "mlflow_run_id": run.info.run_id,
            "mlflow_experiment_id": run.info.experiment_id,
            "wandb_run_path": f"gpulab-tests/{wandb_id}",
        }
    ]


async def test_failing_job_keeps_exit_code_and_fails_the_run(tmp_path, mlflow_server, jobs_service):
    env = job_env(tmp_path, jobs_service.url, jobs_service.token, mlflow_server.url)
    code, _, err = await run_job(env, "fail")
    assert code == 3, err
    _, run = the_run(mlflow_server, env["GPULAB_JOB_ID"])
    assert run.info.status == "FAILED"


async def test_sigterm_is_forwarded_and_kills_the_run(tmp_path, mlflow_server, jobs_service):
    env = job_env(tmp_path, jobs_service.url, jobs_service.token, mlflow_server.url)
    proc = await start_job(env, "wait")
    ready = tmp_path / "work" / "ready"
    for _ in range(600):
        if ready.exists() or proc.returncode is not None:
            break
        await asyncio.sleep(0.1)
    assert ready.exists(), (await proc.stderr.read()).decode()
    proc.send_signal(signal.SIGTERM)  # the runner only, not its group
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert (tmp_path / "work" / "got-sigterm").exists()
    assert proc.returncode == -signal.SIGTERM, err.decode()
    _, run = the_run(mlflow_server, env["GPULAB_JOB_ID"])
    assert run.info.status == "KILLED"


async def test_job_succeeds_with_the_service_down(tmp_path, mlflow_server):
    token = uuid.uuid4().hex
    env = job_env(tmp_path, f"http://127.0.0.1:{free_port()}/services/gpulab-jobs/api/v1", token, mlflow_server.url)
    code, out, err = await run_job(env, "ok")
    assert code == 0, err
    assert "heartbeat failed" in err and "progress report failed" in err
    assert token not in out + err
    _, run = the_run(mlflow_server, env["GPULAB_JOB_ID"])
    assert run.info.status == "FINISHED"


async def test_job_succeeds_with_mlflow_down(tmp_path, jobs_service):
    env = job_env(tmp_path, jobs_service.url, jobs_service.token, f"http://127.0.0.1:{free_port()}")
    (tmp_path / "work" / "train.py").write_text("import gpulab\ngpulab.progress(1, 1, loss=0.5)\n")
    code, _, err = await run_job(env)
    assert code == 0, err
    runner_lines = [line for line in err.splitlines() if line.startswith("gpulab.runner")]
    assert len(runner_lines) == 1 and runner_lines[0].startswith("gpulab.runner: opening the MLflow run failed ("), err
    assert jobs_service.bodies("progress") == [{"step": 1, "total": 1, "metrics": {"loss": 0.5}}]
    assert jobs_service.bodies("tracking") == [
        {
            "mlflow_run_id": None,
            "mlflow_experiment_id": None,
            "wandb_run_path": f"gpulab-tests/{env['GPULAB_JOB_ID']}-1",
        }
    ]


async def test_progress_is_throttled_and_sends_the_last_step(tmp_path, jobs_service):
    env = job_env(tmp_path, jobs_service.url, jobs_service.token)
    del env["WANDB_PROJECT"]
    loop = (
        "import time, gpulab\np = gpulab.progress\nt = time.monotonic()\nfor i in range(1, 20001): p(i, 20000, x=i)\n"
        "print(time.monotonic() - t)"
    )
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", loop, env=env, stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    elapsed = float(out)
    progress = jobs_service.bodies("progress")
    assert progress[-1] == {"step": 20000, "total": 20000, "metrics": {"x": 20000.0}}
    assert len(progress) <= elapsed / 0.25 + 2, (len(progress), elapsed)


def test_progress_outside_a_job_prints_one_line():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPULAB_", "MLFLOW_", "WANDB_"))}
    out = subprocess.run(
        [sys.executable, "-c", "import gpulab; gpulab.progress(3, 10, loss=0.25, acc=1)"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout == "progress: step 3/10 loss=0.25 acc=1\n" and out.stderr == ""
