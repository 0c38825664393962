"""The gpulab magics in a real IPython kernel against a real platform.

Real parts: `gpulab up` (JupyterHub, configurable-http-proxy, gpulab-jobs running jobs on the
local executor), kim's server spawned by the hub, and a jupyter_client kernel started with that
server's environment (GPULAB_JOBS_URL, JUPYTERHUB_API_TOKEN with the server token's scopes,
JUPYTERHUB_API_URL), as the server gives its kernels.
"""

import json
import os
import pwd
import subprocess
import sys

import pytest

from gpulab.kernels.client import JobsClient, NoCapacity, job_spec
from gpulab.kernels.pipelines import Pipeline
from tests.support.gpulab_up import Platform
from tests.support.kernel import Kernel

CONFIG = """
c.Platform.mlflow_service = False
c.Roles.group_roles = {"gpu": ["gpulab-gpu"]}
c.JobQueue.tick_interval = 0.2
c.JobQueue.cancel_grace = 2
"""
WIDGET = "application/vnd.jupyter.widget-view+json"


@pytest.fixture(scope="module")
def hub(gpulab_up):
    return gpulab_up(CONFIG, users={"kim": [], "lee": ["gpu"]})


def user_env(hub: Platform, user: str) -> dict:
    return {
        "GPULAB_JOBS_URL": f"{hub.url}/services/gpulab-jobs/api/v1",
        "JUPYTERHUB_API_TOKEN": hub.token(user),
        "JUPYTERHUB_API_URL": f"{hub.url}/hub/api",
    }


@pytest.fixture(scope="module")
def kernel(hub):
    """A plain Python kernel in kim's server environment with the extension loaded, in ``kernel.cwd``
    (a folder of kim's, where kim's jobs run)."""
    env = hub.server_env("kim")
    cwd = hub.user_dir("kim")
    assert env["GPULAB_JOBS_URL"].startswith("http://127.0.0.1:")  # the service's direct address
    kernel = Kernel("python3", env=env, cwd=str(cwd))
    kernel.cwd = cwd
    loaded = kernel.run("%load_ext gpulab")
    assert loaded.reply["status"] == "ok" and not loaded.stderr, loaded.messages
    yield kernel
    kernel.stop()


def one_line_error(result) -> str:
    """The stderr line a failed magic printed, after checking there was no traceback."""
    assert result.reply["status"] == "ok" and not result.errors, result.messages
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result.stderr.strip()


def test_train_cell_runs_in_the_notebook_dir_and_is_listed(kernel):
    cell = kernel.run(
        "%%train --name cell-job\nimport gpulab, time\nfor i in range(1, 4):\n"
        "    gpulab.progress(i, 3, loss=1.0 / i)\n    time.sleep(0.2)\n"
        "open('written-by-job.txt', 'w').write('hi')\nprint('trained', flush=True)\n"
    )
    assert cell.reply["status"] == "ok" and not cell.errors and not cell.stderr, cell.messages
    assert cell.data(WIDGET), "the monitor was not displayed"
    assert "'cell-job'" in cell.data("text/plain")[-1]  # the returned job handle
    done = kernel.run("job = _\ndone = job.wait(timeout=60)\nprint(done.state, done.id, done.progress['fraction'])")
    state, job_id, fraction = done.stdout.split()
    assert (state, float(fraction)) == ("succeeded", 1.0), done.messages
    assert (kernel.cwd / "written-by-job.txt").read_text() == "hi"

    listed = kernel.run("%jobs")
    assert job_id[:8] in listed.data("text/html")[0] and "succeeded" in listed.data("text/html")[0]
    assert job_id[:8] in listed.data("text/plain")[0]
    assert "trained" in kernel.run(f"%logs {job_id[:8]}").stdout
    assert "trained" in kernel.run(f"%logs {job_id} --follow").stdout
    assert kernel.run(f"%job {job_id[:8]}").data(WIDGET)


def test_a_job_array_from_train_runs_each_index_and_waits_for_all(kernel):
    (kernel.cwd / "shard.py").write_text("import os\nprint('shard', os.environ['GPULAB_ARRAY_INDEX'])\n")
    result = kernel.run("job = %train --array 3%2 --wait shard.py\nprint(job.data['array']['count'])")
    assert result.reply["status"] == "ok" and not result.stderr, result.messages
    assert "submitted job array " in result.stdout and "3 jobs, 2 at once" in result.stdout, result.stdout
    assert result.stdout.count("succeeded") == 3 and result.stdout.strip().endswith("3"), result.stdout
    logs = kernel.run(
        "from gpulab.kernels.client import default_client\n"
        "for j in default_client().list(array=job.data['array']['id']): print(j.logs().strip())"
    )
    assert logs.stdout.split("\n")[:3] == ["shard 0", "shard 1", "shard 2"], logs.stdout
    refused = kernel.run("%train --array 3%x shard.py")
    assert "--array 3%x: give N or N%M" in refused.stderr, refused.messages
    refused = kernel.run("%train --group research shard.py")  # not one of the user's groups
    assert "you are not in group 'research'" in refused.stderr, refused.messages


def test_sweep_runs_a_trial_per_combination_and_finds_the_best(kernel):
    (kernel.cwd / "trial.py").write_text(
        "import gpulab\np = gpulab.trial_params()\nprint('lr', p['lr'])\ngpulab.progress(1, 1, loss=abs(p['lr'] - 0.01))\n"
    )
    result = kernel.run(
        's = %sweep --param lr=0.1,0.01,0.001 --max-concurrent 2 --cpus 0.2 --wait trial.py\nprint(s.best("loss").data["array"]["params"])'
    )
    assert result.reply["status"] == "ok" and not result.stderr, result.messages
    assert "3 trials, 2 at once" in result.stdout and result.stdout.count("succeeded") == 3, result.stdout
    assert result.stdout.strip().endswith("{'lr': 0.01}"), result.stdout


def test_a_queued_job_is_held_moved_and_released_from_python(kernel):
    result = kernel.run(
        "import gpulab\njob = gpulab.submit(source='print(42)', pool='later')\n"
        "print(job.hold().data['held'], job.change(pool='default', cpus=0.5).data['resources']['pool'])\n"
        "print(job.release().wait(timeout=60).state)"
    )
    assert result.reply["status"] == "ok" and not result.stderr, result.messages
    assert result.stdout.split() == ["True", "default", "succeeded"], result.stdout


def test_preprocess_jobs_run_with_the_rapids_runner(kernel):
    (kernel.cwd / "prep.py").write_text("import sys, pandas\nprint('prepared', sys.argv[1:])\n")
    result = kernel.run(
        "job = %preprocess --wait --no-monitor prep.py --rows 3\nprint(job.data['kind'])\nprint(job.logs())"
    )
    assert result.reply["status"] == "ok" and not result.stderr, result.messages
    assert "preprocess" in result.stdout and "prepared ['--rows', '3']" in result.stdout
    assert "gpulab: no GPU found; pandas runs on the CPU" in result.stdout
    cell = kernel.run("%%preprocess --wait --no-monitor\nimport pandas\nprint('cell prepared')")
    assert cell.reply["status"] == "ok" and not cell.stderr, cell.messages
    log = kernel.run("print(_.logs())").stdout
    assert "gpulab: no GPU found" in log and "cell prepared" in log


def test_notebook_runs_a_notebook_with_parameters_typed_as_papermill_types_them(kernel):
    cells = [
        {
            "cell_type": "code",
            "source": "lr = 0.1\nsteps = 1\nfast = False\ntag = 'x'",
            "outputs": [],
            "execution_count": None,
            "metadata": {"tags": ["parameters"]},
        },
        {
            "cell_type": "code",
            "source": "print(type(lr).__name__, lr, steps, fast, tag)",
            "outputs": [],
            "execution_count": None,
            "metadata": {},
        },
    ]
    notebook = {"nbformat": 4, "nbformat_minor": 4, "metadata": {}, "cells": cells}
    (kernel.cwd / "sweep.ipynb").write_text(json.dumps(notebook))
    result = kernel.run(
        "job = %notebook --wait --no-monitor sweep.ipynb -p lr 0.01 -p steps 5 -p fast True -p tag run-b\n"
        "print(job.data['kind'], job.output_notebook)"
    )
    assert result.reply["status"] == "ok" and not result.stderr, (result.errors, result.stderr)
    kind, output = result.stdout.splitlines()[-1].split()  # after --no-monitor's lines
    assert kind == "notebook" and output.startswith(str(kernel.cwd / "sweep-"))
    executed = json.loads(open(output).read())
    assert "float 0.01 5 True run-b" in json.dumps(executed["cells"][-1]["outputs"])
    missing = one_line_error(kernel.run("%notebook nowhere.ipynb"))
    assert missing.startswith("%notebook: there is no notebook at ") and missing.endswith("nowhere.ipynb"), missing


def test_after_makes_a_job_wait_for_another(kernel):
    (kernel.cwd / "fails.py").write_text("import sys, time\ntime.sleep(1)\nsys.exit(1)\n")
    (kernel.cwd / "cleanup.py").write_text("print('cleaned up')\n")
    result = kernel.run(
        "a = %train --no-monitor fails.py\n"
        "b = %train --no-monitor --after {a.id[:8]}:afternotok cleanup.py\n"
        "print(b.data['spec']['depends_on'] == [{'job': a.id, 'condition': 'afternotok'}], b.state_reason)\n"
        "print(b.wait(timeout=60).state, a.refresh().state, 'cleaned up' in b.logs())"
    )
    assert result.reply["status"] == "ok" and not result.stderr, (result.errors, result.stderr)
    lines = result.stdout.splitlines()[-2:]
    assert lines[0].startswith("True waiting for job ") and lines[0].endswith(" to fail"), lines
    assert lines[1] == "succeeded failed True", lines


PIPELINE = """
name: digits
steps:
  - {name: prep, source: "import os; open(os.environ['PIPELINE_DIR'] + '/rows', 'w').write('100')"}
  - {name: train, script: train.py, needs: [prep]}
  - {name: report, source: "print('never')", needs: [train]}
  - {name: cleanup, source: "print('cleaned up after train')", needs: [train], condition: afternotok}
  - {name: lint, source: "print('independent')"}
"""


def test_a_pipeline_runs_its_steps_in_order_and_cancels_what_a_failure_leaves_unmet(hub, kernel):
    """``gpulab pipeline submit --wait`` in kim's folder, as kim's account with her server's environment (as in a
    terminal of her server), so that the steps, run as kim, share the pipeline directory she made."""
    (kernel.cwd / "pipeline.yaml").write_text(PIPELINE)
    (kernel.cwd / "train.py").write_text(
        "import os, sys\nrows = open(os.environ['PIPELINE_DIR'] + '/rows').read()\n"
        "print('read', rows, 'rows')\nsys.exit(f'no model converges on {rows} rows')\n"
    )
    account = pwd.getpwuid(kernel.cwd.stat().st_uid).pw_name
    env = {**hub.server_env("kim"), "PATH": os.environ["PATH"], "HOME": str(kernel.cwd)}
    cli = subprocess.run(
        [
            "runuser",
            "-u",
            account,
            "--",
            sys.executable,
            "-m",
            "gpulab",
            "pipeline",
            "submit",
            "--wait",
            "pipeline.yaml",
        ],
        cwd=kernel.cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert cli.returncode == 1, (cli.stdout, cli.stderr)  # not every step succeeded
    final = dict(line.strip().split(": ", 1) for line in cli.stdout.splitlines()[-5:])
    assert {name: said.split(" ")[0] for name, said in final.items()} == {
        "prep": "succeeded",
        "train": "failed",
        "report": "cancelled",
        "cleanup": "succeeded",
        "lint": "succeeded",
    }, cli.stdout
    assert "ended failed: afterok cannot be met" in final["report"], final["report"]
    _, name, pipeline_id = cli.stdout.split()[:3]  # "pipeline <name> <id>: 5 steps, files in <directory>"
    pipeline_id = pipeline_id.rstrip(":")
    assert (kernel.cwd / ".gpulab-pipelines" / f"{name}-{pipeline_id[:8]}" / "rows").read_text() == "100"
    client = JobsClient(env["GPULAB_JOBS_URL"], env["JUPYTERHUB_API_TOKEN"])
    labelled = client.request("GET", "/jobs", params={"label": f"gpulab.pipeline={pipeline_id}"})
    assert sorted(j["labels"]["gpulab.step"] for j in labelled.json()["jobs"]) == sorted(final)
    pipeline = Pipeline(client, client.request("GET", f"/pipelines/{pipeline_id}").json())
    assert pipeline.data["state"] == "failed"
    assert {step: job.state for step, job in pipeline.jobs.items()} == {
        name: said.split(" ")[0] for name, said in final.items()
    }


def test_schedule_makes_a_schedule_the_service_keeps(kernel):
    (kernel.cwd / "etl.py").write_text("print('etl ran')\n")
    made = kernel.run(
        's = %schedule "30 4 * * *" --timezone America/New_York --overlap queue etl.py --day 1\n'
        "print(s.data['cron'], s.data['timezone'], s.data['overlap'], s.data['job']['entrypoint'])"
    )
    assert made.reply["status"] == "ok" and not made.stderr, (made.errors, made.stderr)
    assert "30 4 * * * America/New_York queue ['python', 'etl.py', '--day', '1']" in made.stdout
    run = kernel.run("job = s.run_now()\nprint(job.wait(timeout=60).state, job.data['schedule_id'] == s.id)")
    assert run.stdout.split() == ["succeeded", "True"], run.messages
    listed = kernel.run("%schedules")
    assert "30 4 * * *" in listed.data("text/plain")[0] and "America/New_York" in listed.data("text/html")[0]
    assert kernel.run("s.pause().state").data("text/plain") == ["'paused'"]
    kernel.run("s.delete()")
    assert one_line_error(kernel.run('%schedule "every day" etl.py')).startswith("%schedule: cron: must have five")
    assert "give a script to run or --notebook" in one_line_error(kernel.run('%schedule "@daily"'))


def test_the_server_token_holds_the_users_gpulab_scopes(kernel):
    result = kernel.run(
        "from gpulab.kernels.client import default_client\nc = default_client()\n"
        "print(sorted(s for s in c.token_scopes() if s.startswith('custom:')))\nprint(c.gpu_limit())"
    )
    assert "'custom:gpulab:jobs'" in result.stdout and "custom:gpulab:gpu'" not in result.stdout, result.messages
    assert "(0, 'your account may not request GPUs" in result.stdout


def test_train_script_with_arguments_and_wait(kernel):
    (kernel.cwd / "args.py").write_text("import sys\nprint('argv', sys.argv[1:])\n")
    result = kernel.run(
        "job = %train --wait --no-monitor --name with-args args.py --epochs 2 -v\nprint(job.state)\nprint(job.logs())"
    )
    assert result.reply["status"] == "ok" and not result.stderr, result.messages
    assert "succeeded" in result.stdout and "argv ['--epochs', '2', '-v']" in result.stdout


def test_cancel_stops_a_long_job(kernel):
    kernel.run("%%train --no-monitor --name sleeper\nimport time\nprint('sleeping', flush=True)\ntime.sleep(300)")
    started = kernel.run(
        "import time\nsleeper = _\nwhile 'sleeping' not in sleeper.logs():\n    time.sleep(0.2)\nprint(sleeper.id)",
        timeout=60,
    )
    job_id = started.stdout.strip()
    cancelled = kernel.run(f"%cancel {job_id[:10]}")
    assert f"job {job_id} (sleeper): cancelled" in cancelled.stdout, cancelled.messages
    waited = kernel.run(
        "from gpulab.kernels.client import JobFailed\ntry:\n    sleeper.wait()\nexcept JobFailed as e:\n    print(e)"
    )
    assert f"job 'sleeper' ({job_id}) cancelled: cancelled by kim" in waited.stdout
    assert "sleeping" in waited.stdout  # the log tail


@pytest.mark.parametrize(
    "line, message",
    [
        ("%train --gpus two x.py", "%train: error: argument --gpus: invalid int value: 'two'"),
        ("%train --wait", "%train: error: give the script to run"),
        ("%%train --bogus\nprint(1)", "%%train: error: unrecognized arguments: --bogus"),
        ("%%train x.py\nprint(1)", "%%train: error: unrecognized arguments: x.py"),
        ("%jobs --state nope", "%jobs: error: argument --state: invalid choice: 'nope'"),
        ("%job", "%job: error: the following arguments are required: id"),
        ("%logs abc --tail x", "%logs: error: argument --tail: invalid int value: 'x'"),
        ("%cancel 'unbalanced", "%cancel: error: No closing quotation"),
        ("%cancel 0123abc", "%cancel: no job of yours starts with '0123abc'"),
        ("%train --priority 1000 x.py", "%train: priority: Input should be less than or equal to 100"),
    ],
)
def test_option_errors_are_one_line_without_traceback(kernel, line, message):
    assert one_line_error(kernel.run(line)).startswith(message)


def test_gpu_request_without_the_gpu_scope_is_one_line(kernel):
    error = one_line_error(kernel.run("%train --gpus 1 x.py"))
    assert error == (
        "%train: requesting GPUs needs the custom:gpulab:gpu scope; ask an admin for GPU access, or request no GPUs"
    )


def test_a_failing_job_with_wait_prints_its_reason_and_log_tail(kernel):
    result = kernel.run("%%train --wait --no-monitor --name failing\nprint('about to fail')\nraise SystemExit(3)")
    assert result.reply["status"] == "ok" and not result.errors and "Traceback" not in result.stderr
    assert "job 'failing' (" in result.stderr and "exit code 3" in result.stderr
    assert "about to fail" in result.stderr


def test_the_monitor_updates_while_another_cell_runs(kernel):
    submitted = kernel.run(
        "%%train --name slow\nimport gpulab, time\nfor i in range(1, 9):\n"
        "    gpulab.progress(i, 8)\n    time.sleep(0.5)\n"
    )
    bars = [
        m["content"]["comm_id"]
        for m in submitted.messages
        if m["msg_type"] == "comm_open" and m["content"]["data"]["state"].get("_model_name") == "FloatProgressModel"
    ]
    assert len(bars) == 1, submitted.messages
    busy = kernel.run("import time\ntime.sleep(7)")
    values = [
        m["content"]["data"]["state"]["value"]
        for m in busy.messages
        if m["msg_type"] == "comm_msg"
        and m["content"]["comm_id"] == bars[0]
        and "value" in m["content"]["data"].get("state", {})
    ]
    assert len(set(values)) >= 3 and values[-1] == 1.0, values


def test_waiting_for_gpus_no_pool_has_raises(hub):
    env = user_env(hub, "lee")
    client = JobsClient(env["GPULAB_JOBS_URL"], env["JUPYTERHUB_API_TOKEN"])
    job = client.submit(job_spec(source="print(1)", gpus=1))
    with pytest.raises(NoCapacity, match=r"no GPU capacity in pool 'default' \(0 GPUs, 1 requested\); job "):
        job.wait(timeout=30, poll=0.2)
    assert job.cancel().state == "cancelled"
