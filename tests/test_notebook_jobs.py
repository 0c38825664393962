"""Notebook jobs end to end: a real hub, gpulab-jobs with the local executor (each job as its user's account),
papermill on a real ipykernel, the MLflow service. The notebooks are written by the test into a folder of the
user's own, as a user's server would have them."""

import json
import os
from pathlib import Path

import pytest

from gpulab.kernels.client import SNAPSHOTS, APIError, GpulabError, JobsClient, SnapshotError, notebook_spec, snapshot
from gpulab.services.jobs.openapi import SPEC_PATH
from tests.support.jobs import Client
from tests.support.openapi import Spec

SPEC = Spec(SPEC_PATH)


def notebook(*cells: tuple[str, str], tags: dict[int, list[str]] | None = None) -> dict:
    """An nbformat 4 notebook of ``(cell_type, source)`` cells, ``tags`` by cell index."""
    return {
        "nbformat": 4,
        "nbformat_minor": 5,
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
        "cells": [
            {
                "id": f"cell-{i}",
                "cell_type": kind,
                "source": source,
                "metadata": {"tags": (tags or {}).get(i, [])},
                **(
                    {"outputs": [{"output_type": "stream", "name": "stdout", "text": "stale\n"}], "execution_count": 7}
                    if kind == "code"
                    else {}
                ),
            }
            for i, (kind, source) in enumerate(cells)
        ],
    }


TRAIN = notebook(
    ("markdown", "# A parametrised notebook"),
    ("code", "lr = 0.1\nepochs = 1\nname = 'default'"),
    ("code", "print(f'lr={lr} epochs={epochs} name={name}')\nopen('ran.txt', 'w').write(str(epochs))"),
    tags={1: ["parameters"]},
)
FAILING = notebook(
    ("code", "print('first cell ran')"),
    ("code", "raise ValueError('the data has no rows')"),
    ("code", "print('never')"),
)


@pytest.fixture(scope="module")
def hub(gpulab_up):
    return gpulab_up("c.JobQueue.tick_interval = 0.2\n", users={"alice": [], "bob": []})


@pytest.fixture(scope="module")
def alice(hub):
    return Client(hub, "alice")


def outputs(cell: dict) -> str:
    """The text a cell printed (nbformat keeps multi-line strings as lists of lines)."""
    return "".join("".join(o.get("text", "")) for o in cell.get("outputs", []))


def write(hub, user: str, nb: dict, name: str):
    folder = hub.user_dir(user)
    path = folder / name
    path.write_text(json.dumps(nb))
    return path


def test_a_notebook_runs_with_its_parameters_into_an_output_notebook_and_mlflow(hub, alice, monkeypatch):
    path = write(hub, "alice", TRAIN, "train.ipynb")
    spec = notebook_spec(path, {"lr": 0.01, "epochs": 3, "name": "run-a"}, html=True, experiment="notebooks")
    assert all(c.get("outputs", []) == [] for c in spec["notebook"]["content"]["cells"])  # the stale ones cleared
    job = alice.submit(**spec)
    SPEC.validate("/jobs", "POST", 201, job)
    assert job["kind"] == "notebook" and job["output_notebook"] == str(path.parent / f"train-{job['id'][:8]}.ipynb")
    done = alice.wait(job["id"], timeout=180)
    log = alice.logs(job["id"])
    assert done["state"] == "succeeded", log
    SPEC.validate("/jobs/{job_id}", "GET", 200, done)

    executed = json.loads(open(done["output_notebook"]).read())
    injected = [c for c in executed["cells"] if "injected-parameters" in c["metadata"].get("tags", [])]
    assert len(injected) == 1 and "lr = 0.01" in "".join(injected[0]["source"])
    assert executed["cells"].index(injected[0]) == 2  # right after the cell tagged parameters
    printed = "".join(outputs(c) for c in executed["cells"])
    assert "lr=0.01 epochs=3 name=run-a" in printed and "stale" not in printed
    assert (path.parent / "ran.txt").read_text() == "3"  # it ran in the notebook's folder
    html = path.parent / f"train-{job['id'][:8]}.html"
    assert "lr=0.01 epochs=3 name=run-a" in html.read_text()

    from mlflow import MlflowClient

    token = hub.token("alice")
    hub.wait_for_mlflow(token)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", token)
    client = MlflowClient(tracking_uri=f"{hub.url}/services/mlflow")
    run = client.get_run(done["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params == {"lr": "0.01", "epochs": "3", "name": '"run-a"'}
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "notebook")}
    assert artifacts == {f"notebook/train-{job['id'][:8]}.ipynb", f"notebook/train-{job['id'][:8]}.html"}


def test_a_failing_notebook_names_the_cell_and_keeps_what_ran(hub, alice):
    path = write(hub, "alice", FAILING, "broken.ipynb")
    job = alice.submit(**notebook_spec(path))
    done = alice.wait(job["id"], timeout=180)
    log = alice.logs(job["id"])
    assert done["state"] == "failed", log
    assert "the notebook failed: cell 2, execution count 2 raised ValueError: the data has no rows" in log
    executed = json.loads(open(done["output_notebook"]).read())
    printed = [outputs(c) for c in executed["cells"]]
    assert "first cell ran" in printed[1] and "never" not in "".join(printed)  # papermill's banner cell first


def test_an_unknown_kernel_is_named(hub, alice):
    path = write(hub, "alice", TRAIN, "k.ipynb")
    done = alice.wait(alice.submit(**notebook_spec(path, kernel="no-such-kernel"))["id"], timeout=120)
    assert done["state"] == "failed"
    assert "there is no kernel spec 'no-such-kernel' where the job runs" in alice.logs(done["id"])


@pytest.mark.parametrize(
    ("change", "field", "says"),
    [
        (lambda nb: nb.update(content={"cells": []}), "notebook.content", "nbformat 4"),
        (lambda nb: nb.update(parameters={"not an identifier": 1}), "notebook.parameters", "Python identifier"),
        (lambda nb: nb.update(parameters={"x": {"nested": 1}}), "notebook.parameters.x", ""),
        (lambda nb: nb.update(kernel="../python3"), "notebook.kernel", "kernel spec name"),
        (lambda nb: nb.update(path="relative.ipynb"), "notebook.path", "absolute"),
        (lambda nb: nb.update(formats=["pdf"]), "notebook.formats.0", ""),
        (lambda nb: nb.update(content={**nb["content"], "pad": "x" * (1024 * 1024)}), None, ""),
    ],
)
def test_bad_notebook_jobs_are_refused_naming_the_field(alice, change, field, says):
    spec = {"name": "bad", "notebook": {"path": "/home/alice/a.ipynb", "content": TRAIN}}
    change(spec["notebook"])
    r = alice.request("POST", "/jobs", json=spec)
    if field is None:  # over the body limit: refused before it is parsed
        assert r.status_code == 413, r.text
        return
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["field"].startswith(field) and says in error["message"], error


def test_a_notebook_goes_with_kind_notebook_only(alice):
    both = {"name": "x", "entrypoint": ["true"], "notebook": {"path": "/a.ipynb", "content": TRAIN}}
    r = alice.request("POST", "/jobs", json=both)
    assert r.status_code == 422 and "exactly one of 'entrypoint', 'source' or 'notebook'" in r.text, r.text
    r = alice.request("POST", "/jobs", json={"name": "x", "kind": "notebook", "entrypoint": ["true"]})
    assert r.status_code == 422 and r.json()["error"]["field"] == "kind", r.text


READS = notebook(
    ("code", "import helper\nprint('data=' + open('data.txt').read(), helper.WORD)\nopen('out.txt', 'w').write('x')"),
)


def test_files_snapshotted_with_the_notebook_are_what_the_job_reads(hub, alice):
    path = write(hub, "alice", READS, "reads.ipynb")
    folder = path.parent
    (folder / "data.txt").write_text("v1")
    (folder / "helper.py").write_text("WORD = 'helped'\n")
    spec = notebook_spec(path, files=["data.txt", "helper.py"])
    snapshot = Path(spec["working_dir"])
    assert snapshot.parent == folder / ".gpulab-snapshots" and sorted(p.name for p in snapshot.iterdir()) == [
        "data.txt",
        "helper.py",
    ]
    owner = folder.stat()
    for p in [snapshot.parent, snapshot, *snapshot.iterdir()]:  # as the user's own server would have made it
        os.chown(p, owner.st_uid, owner.st_gid)
    (folder / "data.txt").write_text("v2, edited after submitting")
    job = alice.submit(**spec)
    assert job["spec"]["notebook"]["files"] == ["data.txt", "helper.py"]
    done = alice.wait(job["id"], timeout=180)
    assert done["state"] == "succeeded", alice.logs(job["id"])
    executed = json.loads(open(done["output_notebook"]).read())
    assert "data=v1 helped" in outputs(executed["cells"][0])
    assert (snapshot / "out.txt").exists() and not (folder / "out.txt").exists()  # it ran in the copy


def test_a_snapshot_is_bounded_and_names_what_it_cannot_take(tmp_path):
    (tmp_path / "nb.ipynb").write_text(json.dumps(READS))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "big.bin").write_bytes(b"0" * 2048)
    (tmp_path / ".ipynb_checkpoints").mkdir()
    (tmp_path / ".ipynb_checkpoints" / "nb-checkpoint.ipynb").write_text("{}")
    whole = snapshot(tmp_path, ["."], "nb")
    assert sorted(str(p.relative_to(whole)) for p in whole.rglob("*") if p.is_file()) == ["data/big.bin", "nb.ipynb"]
    again = snapshot(tmp_path, ["."], "../../up/and away")  # the first snapshot is not copied into the second
    assert not any(SNAPSHOTS in str(p.relative_to(again)) for p in again.rglob("*"))
    assert again.parent == tmp_path / SNAPSHOTS and again.name.startswith("up-and-away-")  # a job's name is no path
    for files, says in [
        (["../etc/passwd"], "must be relative to the notebook's folder"),
        (["/etc/passwd"], "must be relative to the notebook's folder"),
        (["missing.csv"], "there is no missing.csv"),
    ]:
        with pytest.raises(SnapshotError, match=says):
            snapshot(tmp_path, files, "nb")
    with pytest.raises(SnapshotError, match=r"files: 0.0 MiB is over the snapshot's limit of 0 MiB"):
        snapshot(tmp_path, ["data"], "nb", max_bytes=1024)
    with pytest.raises(GpulabError, match="no working_dir= with it"):
        notebook_spec(tmp_path / "nb.ipynb", files=["data"], working_dir=str(tmp_path))


def test_a_refused_notebook_job_leaves_no_snapshot(hub, alice):
    path = write(hub, "alice", READS, "refused.ipynb")
    (path.parent / "data.txt").write_text("v1")
    spec = notebook_spec(path, files=["data.txt"], gpus=1)  # alice may not request GPUs
    client = JobsClient(url=f"{hub.url}/services/gpulab-jobs/api/v1", token=hub.token("alice"))
    with pytest.raises(APIError, match="custom:gpulab:gpu"):
        client.submit(spec)
    assert list((path.parent / ".gpulab-snapshots").iterdir()) == []
