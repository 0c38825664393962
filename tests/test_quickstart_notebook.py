"""``examples/quickstart.ipynb`` runs top to bottom (nbclient) against a real platform with MLflow.

Real parts: `gpulab up` with gpulab-jobs and the MLflow service behind the hub, the
"Python 3 (GPU, RAPIDS)" kernel spec (installed into a temporary JUPYTER_PATH), the job on the
local executor logging to MLflow. The executed notebook is saved in the test output dir.
"""

import shutil
import time
from pathlib import Path

import nbformat
import pytest
import requests
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "examples" / "quickstart.ipynb"


@pytest.fixture(scope="module")
def hub(gpulab_up):
    hub = gpulab_up("c.JobQueue.tick_interval = 0.2\n", users={"nia": []})
    hub.user_token = hub.token("nia")
    deadline = time.monotonic() + 90
    while (
        requests.get(f"{hub.url}/services/mlflow/health", headers=auth(hub.user_token), timeout=10).status_code != 200
    ):
        assert time.monotonic() < deadline, f"MLflow not up through the hub:\n{hub.log_tail()}"
        time.sleep(0.5)
    return hub


def auth(token: str) -> dict:
    return {"Authorization": f"token {token}"}


def test_quickstart_runs_top_to_bottom_and_leaves_a_model_in_mlflow(hub, tmp_path, monkeypatch, output_dir):
    shutil.copytree(ROOT / "jupyter-kernels" / "gpulab-rapids", tmp_path / "jupyter" / "kernels" / "gpulab-rapids")
    server_env = {
        "GPULAB_JOBS_URL": f"{hub.url}/services/gpulab-jobs/api/v1",
        "JUPYTERHUB_API_TOKEN": hub.user_token,
        "JUPYTERHUB_API_URL": f"{hub.url}/hub/api",
        "GPULAB_MLFLOW_UI_URL": f"{hub.url}/services/mlflow/",
    }
    for name, value in {**server_env, "JUPYTER_PATH": str(tmp_path / "jupyter")}.items():
        monkeypatch.setenv(name, value)  # the kernel inherits them
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    notebook_dir = hub.user_dir("nia")  # where nia's jobs, running as nia's account, can work
    started = time.monotonic()
    NotebookClient(notebook, timeout=300, resources={"metadata": {"path": str(notebook_dir)}}).execute()
    print(f"notebook ran in {time.monotonic() - started:.1f}s")
    nbformat.write(notebook, output_dir / "quickstart-executed.ipynb")

    outputs = [cell.get("outputs", []) for cell in notebook.cells if cell.cell_type == "code"]
    text = ["".join(o.get("text", "") for o in cell_outputs) for cell_outputs in outputs]
    assert "no GPU found" in text[0] + text[1]
    assert (notebook_dir / "digits-prepared.parquet").exists()
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs[2])  # the monitor
    widgets = [
        w["state"] for w in notebook.metadata.widgets["application/vnd.jupyter.widget-state+json"]["state"].values()
    ]  # as the monitor ended
    (bar,) = [(w["value"], w["description"]) for w in widgets if w["_model_name"] == "FloatProgressModel"]
    texts = [w["value"] for w in widgets if w["_model_name"] == "HTMLModel"]
    assert bar == (1.0, "30/30") and any(t.startswith("<b>succeeded</b>") for t in texts), widgets
    assert text[3].startswith("succeeded {") and "'test_accuracy': " in text[3], text[3]

    api = f"{hub.url}/services/mlflow/api/2.0/mlflow"
    headers = auth(hub.user_token)
    experiment = requests.get(
        f"{api}/experiments/get-by-name", params={"experiment_name": "digits"}, headers=headers, timeout=10
    ).json()["experiment"]
    runs = requests.post(
        f"{api}/runs/search", json={"experiment_ids": [experiment["experiment_id"]]}, headers=headers, timeout=10
    ).json()["runs"]
    assert len(runs) == 1 and runs[0]["info"]["status"] == "FINISHED", runs
    run = runs[0]
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert metrics["test_accuracy"] > 0.85 and "loss" in metrics, metrics
    assert {t["key"]: t["value"] for t in run["data"]["tags"]}["gpulab.user"] == "nia"
    link = f"/services/mlflow/#/experiments/{experiment['experiment_id']}/runs/{run['info']['run_id']}"
    assert link in outputs[3][-1]["data"]["text/html"]
    assert any(link in text for text in texts), texts  # the monitor's MLflow link
    models = requests.post(
        f"{api}/logged-models/search",
        json={"experiment_ids": [experiment["experiment_id"]]},
        headers=headers,
        timeout=10,
    ).json()["models"]
    assert [m["info"]["source_run_id"] for m in models] == [run["info"]["run_id"]], models
