"""A training job tracked end to end: real hub, gpulab-jobs, the MLflow service, W&B offline.

W&B runs offline (wandb.ai cannot be reached from here); its run directory is checked on disk.
"""

import os
import time

import pytest
import requests

from tests.support.jobs import Client

TRAIN = """
import mlflow, mlflow.sklearn, numpy as np, gpulab
from sklearn.datasets import load_digits
from sklearn.linear_model import SGDClassifier

X, y = load_digits(return_X_y=True)
X = X / 16.0
model = SGDClassifier(loss="log_loss", random_state=0)
with mlflow.start_run():
    mlflow.log_params({"epochs": 5, "model": "sgd"})
    for epoch in range(1, 6):
        model.partial_fit(X, y, classes=np.arange(10))
        gpulab.progress(epoch, 5, accuracy=float(model.score(X, y)))
    mlflow.sklearn.log_model(model, name="model", input_example=X[:2])
print("trained")
"""


@pytest.fixture(scope="module")
def hub(gpulab_up):
    return gpulab_up("c.JobQueue.tick_interval = 0.2\n", users={"alice": ["vision"], "bea": ["vision"], "carl": []})


def test_training_job_is_tracked_in_mlflow_and_wandb(hub, monkeypatch):
    token = hub.token("alice")
    hub.wait_for_mlflow(token)
    alice = Client(hub, "alice", token)
    spec = {"name": "digits-sgd", "source": TRAIN, "tracking": {"experiment": "digits", "wandb_project": "digits"}}
    job_id = alice.submit(**spec)["id"]
    job = alice.wait(job_id, timeout=180)
    log = alice.logs(job_id)
    assert job["state"] == "succeeded", log
    assert job["progress"]["fraction"] == 1.0 and job["progress"]["metrics"]["accuracy"] > 0.8
    assert job["mlflow_run_id"]

    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", token)
    client = MlflowClient(tracking_uri=f"{hub.url}/services/mlflow")
    run = client.get_run(job["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["gpulab.job_id"] == job_id and run.data.tags["gpulab.user"] == "alice"
    assert client.get_experiment(run.info.experiment_id).name == "digits"
    assert run.data.params == {"epochs": "5", "model": "sgd"}
    history = client.get_metric_history(run.info.run_id, "accuracy")
    assert [m.step for m in history] == [1, 2, 3, 4, 5]
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert any(m.source_run_id == run.info.run_id and m.name == "model" for m in models)
    # the job made the experiment as alice, shared with her groups (c.Platform.mlflow_sharing "group")
    get_run = f"{hub.url}/services/mlflow/api/2.0/mlflow/runs/get"
    for user, status in [("bea", 200), ("carl", 403)]:
        r = requests.get(
            get_run,
            params={"run_id": run.info.run_id},
            timeout=30,
            headers={"Authorization": f"token {hub.token(user)}"},
        )
        assert r.status_code == status, (user, r.text)

    job_dir = hub.data_dir / "jobs" / "alice" / job_id / "work"
    runs = list((job_dir / "wandb").glob("offline-run-*"))
    assert runs and any(p.suffix == ".wandb" for p in runs[0].iterdir()), os.listdir(job_dir)


def test_jobs_log_to_mlflow_with_their_own_token_only_while_they_run(hub):
    """A job's MLFLOW_TRACKING_TOKEN (``job:<id>:<job token>``) is checked with gpulab-jobs: it works while
    the attempt runs, names the job's owner, and stops working when the job ends; a guessed one never works."""
    token = hub.token("alice")
    hub.wait_for_mlflow(token)
    alice = Client(hub, "alice", token)
    probe = """
import os, urllib.request, urllib.error
token = os.environ["MLFLOW_TRACKING_TOKEN"]
open("token", "w").write(token)
request = urllib.request.Request(os.environ["MLFLOW_TRACKING_URI"] + "/api/2.0/mlflow/experiments/search?max_results=5",
                                 headers={"Authorization": "Bearer " + token})
print("status", urllib.request.urlopen(request).status)
"""
    job_id = alice.submit(source=probe)["id"]
    job = alice.wait(job_id, timeout=120)
    log = alice.logs(job_id)
    assert job["state"] == "succeeded" and "status 200" in log, log
    job_token = (hub.data_dir / "jobs" / "alice" / job_id / "work" / "token").read_text()
    assert job_token.startswith(f"job:{job_id}:")

    api = f"{hub.url}/services/mlflow/api/2.0/mlflow/experiments/search?max_results=5"
    time.sleep(31)  # past the MLflow service's memory of checked tokens (JOB_TOKEN_TTL)
    ended = requests.get(api, headers={"Authorization": f"Bearer {job_token}"}, timeout=30)
    assert ended.status_code == 401, ended.text
    guessed = requests.get(api, headers={"Authorization": f"Bearer job:{job_id}:guessed"}, timeout=30)
    assert guessed.status_code == 401, guessed.text
    assert requests.get(api, headers={"Authorization": f"token {token}"}, timeout=30).status_code == 200
