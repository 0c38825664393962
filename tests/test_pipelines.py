"""Pipelines as the client reads them: the order of steps and what is refused before anything is submitted.
The job service's side (all steps at once or none, cancel, schedules of pipelines) is in
tests/test_pipelines_service.py; a pipeline run end to end (a failing step, the step that needed it cancelled with
the reason, the others run) is in tests/test_kernel_magics.py, from a kernel in a user's server."""

import json
import subprocess
import sys

import pytest

from gpulab import pipeline_graph
from gpulab.kernels.pipelines import PipelineError, check, pipeline_spec, step_spec, submit_pipeline


def names(steps):
    return [steps[i]["name"] for i in pipeline_graph.order([(s["name"], s.get("needs", [])) for s in steps])]


def test_steps_come_after_what_they_need():
    steps = [
        {"name": "report", "script": "r.py", "needs": ["train", "prep"]},
        {"name": "train", "script": "t.py", "needs": ["prep"]},
        {"name": "prep", "script": "p.py"},
        {"name": "lint", "script": "l.py"},
    ]
    assert names(steps) == ["prep", "train", "report", "lint"]


@pytest.mark.parametrize(
    ("steps", "says"),
    [
        (
            [{"name": "a", "script": "a.py", "needs": ["b"]}, {"name": "b", "script": "b.py", "needs": ["a"]}],
            "steps: a -> b -> a form a cycle",
        ),
        ([{"name": "a", "script": "a.py", "needs": ["a"]}], "steps: a -> a form a cycle"),
        ([{"name": "a", "script": "a.py", "needs": ["prpe"]}], "steps.0.needs: step 'a' needs 'prpe', which is not"),
        ([{"name": "a", "script": "a.py"}, {"name": "a", "script": "b.py"}], "steps.1.name: there are two steps"),
        ([{"script": "a.py"}], "steps.0.name: give each step a name"),
        ([{"name": "a", "script": "a.py", "gpu": 1}], "step 'a': 'gpu' is not a step field"),
        ([{"name": "a", "script": "a.py", "condition": "afterfail"}], "step 'a': condition is one of afterok"),
        ([], "steps: give a list of steps"),
        ([{"name": f"s{i}", "script": "a.py"} for i in range(65)], "steps: 65 steps; a pipeline has at most 64"),
    ],
)
def test_bad_pipelines_are_refused_naming_the_step(steps, says):
    with pytest.raises(PipelineError) as refused:
        check(steps)
    assert says in str(refused.value)


def test_a_step_is_an_ordinary_job_run_in_the_pipeline_files_folder(tmp_path):
    (tmp_path / "nb.ipynb").write_text(json.dumps({"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": []}))
    script = step_spec({"name": "s", "script": "t.py", "args": ["--n", 3], "gpus": 1, "env": {"A": "1"}}, tmp_path)
    assert script["entrypoint"] == ["python", "t.py", "--n", "3"] and script["resources"]["gpus"] == 1
    assert script["env"] == {"A": "1"} and script["working_dir"] == str(tmp_path)
    notebook = step_spec({"name": "n", "notebook": "nb.ipynb", "parameters": {"x": 1}}, tmp_path)
    assert notebook["kind"] == "notebook" and notebook["notebook"]["parameters"] == {"x": 1}
    with pytest.raises(PipelineError, match="step 's': give exactly one of notebook, script"):
        step_spec({"name": "s", "script": "t.py", "source": "print()"}, tmp_path)
    with pytest.raises(PipelineError, match="parameters go with a notebook step"):
        step_spec({"name": "s", "script": "t.py", "parameters": {"x": 1}}, tmp_path)
    body = pipeline_spec({"name": "p", "steps": [{"name": "s", "script": "t.py", "needs": []}]}, tmp_path)
    assert body["directory"] == str(tmp_path / ".gpulab-pipelines")
    assert body["steps"][0]["condition"] == "afterok" and body["steps"][0]["job"]["entrypoint"] == ["python", "t.py"]


def test_a_pipeline_with_a_cycle_is_refused_before_anything_is_submitted(tmp_path, monkeypatch):
    for name in ("GPULAB_JOBS_URL", "JUPYTERHUB_API_TOKEN"):
        monkeypatch.delenv(name, raising=False)  # nothing could be submitted: the refusal comes first
    (tmp_path / "p.yaml").write_text(
        "name: p\nsteps:\n  - {name: a, script: a.py, needs: [b]}\n  - {name: b, script: b.py, needs: [a]}\n"
    )
    with pytest.raises(PipelineError, match="form a cycle"):
        submit_pipeline(tmp_path / "p.yaml")
    assert not (tmp_path / ".gpulab-pipelines").exists()
    cli = subprocess.run(
        [sys.executable, "-m", "gpulab", "pipeline", "submit", str(tmp_path / "p.yaml")], capture_output=True, text=True
    )
    assert cli.returncode == 2 and cli.stderr.strip() == "gpulab pipeline: steps: a -> b -> a form a cycle", cli.stderr
