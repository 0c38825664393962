"""The job widgets, in this process, against a real platform (hub, proxy, gpulab-jobs, local executor).

The pool offers 2 (unused) GPUs; gia may use GPUs (quota 1), hal may not.
"""

import os
import time

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gpulab.kernels.client import GpulabError, JobsClient, NotConfigured, default_client, job_spec
from gpulab.kernels.widgets import JobList, Launcher, Monitor
from gpulab.tracing import setup_tracing

CONFIG = """
c.Platform.mlflow_service = False
c.Roles.group_roles = {"gpu": ["gpulab-gpu"]}
c.JobQueue.user_quota = {"max_jobs": 4, "max_gpus": 1}
c.JobQueue.tick_interval = 0.2
c.JobQueue.cancel_grace = 2
c.LocalExecutor.gpus = 2
"""
PROGRESS_JOB = (
    "import gpulab, time\nfor i in range(1, {n} + 1):\n    print('epoch', i, flush=True)\n"
    "    gpulab.progress(i, {n}, loss=1.0 / i)\n    time.sleep({pause})\ntime.sleep(1.5)\n"
)


@pytest.fixture(scope="module")
def hub(gpulab_up):
    hub = gpulab_up(CONFIG, users={"gia": ["gpu"], "hal": []})
    hub.tokens = {user: hub.token(user) for user in ("gia", "hal")}
    return hub


@pytest.fixture
def as_user(hub, monkeypatch):
    """Give this process the environment of ``user``'s server, in a notebook dir of theirs; return the client."""

    def become(user: str) -> JobsClient:
        monkeypatch.setenv("GPULAB_JOBS_URL", f"{hub.url}/services/gpulab-jobs/api/v1")
        monkeypatch.setenv("JUPYTERHUB_API_TOKEN", hub.tokens[user])
        monkeypatch.setenv("JUPYTERHUB_API_URL", f"{hub.url}/hub/api")
        monkeypatch.chdir(hub.user_dir(user))
        return default_client()

    return become


def record(monitor: Monitor) -> list[tuple[float, str, float]]:
    """(time, job state, bar value) for every change of the progress bar."""
    seen = []
    monitor.bar.observe(lambda change: seen.append((time.monotonic(), monitor.job.state, change.new)), "value")
    return seen


def test_launcher_builds_the_spec_within_scopes_and_quota(as_user):
    launcher = Launcher(client=as_user("gia"))
    assert (launcher.gpus.max, launcher.gpus.disabled) == (1, False)
    assert "quota is 1" in launcher.gpu_note.value
    launcher.script.value, launcher.args.value = "train.py", "--epochs 5 --lr '0.1'"
    assert launcher.cpus.max == launcher.pools["default"]["capacity"]["cpus"] > 1
    launcher.gpus.value, launcher.cpus.value = 3, 2.0  # GPUs clamped to the quota
    launcher.experiment.value, launcher.name.value, launcher.priority.value = "digits", "l1", 5
    assert launcher.spec() == {
        "name": "l1",
        "kind": "train",
        "working_dir": os.getcwd(),
        "entrypoint": ["python", "train.py", "--epochs", "5", "--lr", "0.1"],
        "resources": {"gpus": 1, "cpus": 2.0, "pool": "default"},
        "priority": 5,
        "tracking": {"experiment": "digits"},
    }
    launcher.what.value = "code"
    assert launcher.code.layout.display is None and launcher.script.layout.display == "none"
    with pytest.raises(GpulabError, match="Code box"):
        launcher.spec()
    launcher.code.value = "print('from the launcher')"
    spec = launcher.spec()
    assert spec["source"] == "print('from the launcher')" and "entrypoint" not in spec
    job = launcher.submit()
    assert launcher.output.outputs and job.id in launcher.message.value
    assert job.wait(timeout=60).state == "succeeded" and "from the launcher" in job.logs()
    assert job.data["resources"]["gpus"] == 1


def test_launcher_offers_no_gpus_without_the_gpu_scope(as_user):
    launcher = Launcher(client=as_user("hal"))
    assert (launcher.gpus.max, launcher.gpus.disabled) == (0, True)
    assert "custom:gpulab:gpu" in launcher.gpu_note.value
    with pytest.raises(GpulabError, match="give the script"):
        launcher.spec()


def test_monitor_progress_bar_reaches_100_percent(as_user):
    job = as_user("gia").submit(job_spec(source=PROGRESS_JOB.format(n=4, pause=0.3), name="progress"))
    monitor = Monitor(job, interval=0.2)
    seen = record(monitor)
    assert monitor.join(60) and job.state == "succeeded"
    assert any(0 < value < 1 for _, _, value in seen), seen
    assert ("running", 1.0) in [(state, value) for _, state, value in seen], seen  # reported, not assumed
    assert monitor.bar.description == "4/4" and monitor.bar.bar_style == "success"
    assert "<b>succeeded</b>" in monitor.status.value and "loss = 0.25" in monitor.metrics.value
    assert "epoch 4" in monitor.log_tail.value and monitor.cancel_button.disabled


def test_monitor_updates_while_the_main_thread_is_busy(as_user):
    job = as_user("gia").submit(job_spec(source=PROGRESS_JOB.format(n=6, pause=0.4), name="busy"))
    monitor = Monitor(job, interval=0.2)
    seen = record(monitor)
    start = time.monotonic()
    total = 0
    while time.monotonic() - start < 6:  # pure-Python work: never sleeps, never yields on purpose
        total += sum(i * i for i in range(1000))
    during = {value for at, _, value in seen if start < at < start + 6}
    assert len(during) >= 3, seen
    monitor.close()


def test_monitor_cancel_button_stops_the_job(as_user):
    job = as_user("gia").submit(job_spec(source="import time\nprint('up', flush=True)\ntime.sleep(300)"))
    monitor = Monitor(job, interval=0.2)
    deadline = time.monotonic() + 30
    while "up" not in monitor.log_tail.value and time.monotonic() < deadline:
        time.sleep(0.1)
    monitor.cancel_button.click()
    assert monitor.join(30) and job.state == "cancelled" and monitor.bar.bar_style == "warning", job.data


def test_job_list_refreshes(as_user):
    client = as_user("hal")
    job_list = JobList(interval=0.3)
    job = client.submit(job_spec(entrypoint=["true"], name="listed"))
    deadline = time.monotonic() + 30
    while job.id[:8] not in job_list.table.value and time.monotonic() < deadline:
        time.sleep(0.1)
    assert job.id[:8] in job_list.table.value and "listed" in job_list.table.value
    job_list.close()
    job_list._thread.join(5)
    assert not job_list._thread.is_alive()


def test_calls_carry_a_traceparent_into_the_job(as_user):
    exporter = InMemorySpanExporter()
    setup_tracing("gpulab-kernel", exporter)
    job = as_user("hal").submit(job_spec(source="import os\nprint(os.environ['TRACEPARENT'])"))
    (submit,) = [s for s in exporter.get_finished_spans() if s.name.startswith("POST ") and s.name.endswith("/jobs")]
    assert f"-{submit.context.trace_id:032x}-" in job.wait(timeout=60).logs()


def test_outside_a_gpulab_server_the_client_says_so(monkeypatch):
    monkeypatch.delenv("GPULAB_JOBS_URL", raising=False)
    with pytest.raises(NotConfigured, match="not running in a gpulab server: GPULAB_JOBS_URL is not set"):
        JobsClient()
    with pytest.raises(GpulabError, match="exactly one of source"):
        job_spec()
