"""Pipelines: a small DAG of steps (notebooks, scripts, cell code) submitted at once, each step a job that waits
for the steps it ``needs`` (``depends_on``), from a YAML file (``gpulab pipeline submit pipeline.yaml``) or
Python (``gpulab.pipeline({...})``)::

    name: digits
    steps:
      - name: prep
        notebook: prep.ipynb
        parameters: {rows: 1000}
      - name: train
        script: train.py
        args: [--epochs, "3"]
        gpus: 1
        needs: [prep]
      - name: report
        notebook: report.ipynb
        needs: [train]
        condition: afterany      # run even when train failed (afterok by default; afternotok: only then)

The job service keeps the pipeline: every step is queued at once (or, refused, none), and a step whose dependency
can no longer be met is cancelled by the service, with the reason. Steps share a directory, ``$PIPELINE_DIR`` in
each (``<folder>/.gpulab-pipelines/<name>-<run>``), to pass files; relative paths are the pipeline file's folder's.
Every step's job is labelled ``gpulab.pipeline=<id>`` and ``gpulab.step=<name>``. Cycles, unknown or repeated
steps and unknown fields are refused here, before anything is sent (and by the service, naming the field).
A pipeline may also run on a schedule: ``gpulab.schedule("@daily", pipeline="pipeline.yaml")``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import yaml

from .. import pipeline_graph
from ..job_states import TERMINAL_STATES
from .client import GpulabError, Job, JobsClient, JobTable, WaitTimeout, default_client, job_spec, notebook_spec

PROGRAMS = ("notebook", "script", "source", "entrypoint")
JOB_FIELDS = {"gpus", "cpus", "memory", "pool", "priority", "max_runtime", "retries", "env", "experiment", "labels"}
STEP_FIELDS = {"name", "needs", "condition", "parameters", "args", "kernel", "html", *PROGRAMS, *JOB_FIELDS}
CONDITIONS = pipeline_graph.CONDITIONS


class PipelineError(GpulabError):
    """A pipeline that cannot run as written; the message names the step and field."""


def check(steps) -> None:
    """Refuse steps that are not as written above (naming the step and field), or whose graph cannot be ordered."""
    if not isinstance(steps, list):
        raise PipelineError("steps: give a list of steps")
    for i, step in enumerate(steps):
        if not isinstance(step, dict):
            raise PipelineError(f"steps.{i}: give a mapping of a step's fields")
        name = step.get("name")
        if unknown := sorted(set(step) - STEP_FIELDS):
            raise PipelineError(f"step {name!r}: {unknown[0]!r} is not a step field ({', '.join(sorted(STEP_FIELDS))})")
        needs = step.get("needs", [])
        if not isinstance(needs, list) or not all(isinstance(n, str) for n in needs):
            raise PipelineError(f"step {name!r}: needs is a list of step names")
        if step.get("condition", "afterok") not in CONDITIONS:
            raise PipelineError(f"step {name!r}: condition is one of {', '.join(CONDITIONS)}")
    try:
        pipeline_graph.order([(step.get("name"), step.get("needs", [])) for step in steps])
    except pipeline_graph.GraphError as e:
        raise PipelineError(f"{e.field}: {e}") from None


def step_spec(step: dict, folder: Path) -> dict:
    """The job of one step (the service adds what it needs, ``$PIPELINE_DIR`` and the pipeline's labels)."""
    name = step["name"]
    programs = [p for p in PROGRAMS if step.get(p) is not None]
    if len(programs) != 1:
        raise PipelineError(f"step {name!r}: give exactly one of {', '.join(PROGRAMS)}")
    fields = {k: step[k] for k in JOB_FIELDS & set(step)}
    fields.update(name=name, working_dir=str(folder))
    program = programs[0]
    if program == "notebook":
        extra = {"kernel": step.get("kernel"), "html": bool(step.get("html"))}
        return notebook_spec(folder / step["notebook"], step.get("parameters"), **extra, **fields)
    if step.get("parameters") is not None:
        raise PipelineError(f"step {name!r}: parameters go with a notebook step")
    if program == "script":
        return job_spec(entrypoint=["python", step["script"], *map(str, step.get("args", []))], **fields)
    if program == "entrypoint":
        return job_spec(entrypoint=[str(a) for a in step["entrypoint"]], **fields)
    return job_spec(source=step["source"], **fields)


class Pipeline:
    """A submitted pipeline; ``data`` is the service's latest view of it (``state``, each step's job and state)."""

    def __init__(self, client: JobsClient, data: dict):
        self.client, self.data = client, data

    id = property(lambda self: self.data["id"])
    name = property(lambda self: self.data["name"])
    state = property(lambda self: self.data["state"])
    directory = property(lambda self: Path(self.data["directory"]))

    def refresh(self) -> Pipeline:
        self.data = self.client.request("GET", f"/pipelines/{self.id}").json()
        return self

    def status(self) -> dict[str, str | None]:
        """Each step's state now (``succeeded``, ``failed``, ``cancelled`` when its dependency was not met, ...)."""
        return {step["name"]: step["state"] for step in self.refresh().data["steps"]}

    @property
    def jobs(self) -> dict[str, Job]:
        """Each step's job (one request: the jobs labelled with this pipeline)."""
        params = {"label": f"gpulab.pipeline={self.id}", "owner": self.data["owner"], "limit": pipeline_graph.MAX_STEPS}
        listed = {
            item["id"]: Job(self.client, item)
            for item in self.client.request("GET", "/jobs", params=params).json()["jobs"]
        }
        return {step["name"]: listed[step["job_id"]] for step in self.data["steps"] if step["job_id"] in listed}

    def wait(self, timeout: float | None = None, interval: float = 1.0) -> dict[str, str | None]:
        """Wait until every step has ended; each step's final state."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            states = self.status()
            if all(state in TERMINAL_STATES or state is None for state in states.values()):
                return states
            if deadline is not None and time.monotonic() > deadline:
                raise WaitTimeout(f"pipeline {self.id} has not ended after {timeout:g} s: {states}")
            time.sleep(interval)

    def cancel(self) -> Pipeline:
        """Cancel every step that has not ended (waits until they have stopped)."""
        self.data = self.client.request(
            "POST", f"/pipelines/{self.id}/cancel", timeout=max(self.client.timeout, 120)
        ).json()
        return self

    def table(self) -> JobTable:
        return JobTable(self.jobs.values())

    def __repr__(self) -> str:
        states = ", ".join(f"{step['name']} {step['state']}" for step in self.data["steps"])
        return f"<gpulab Pipeline {self.name} ({self.id[:8]}) {self.state}: {states}>"


def pipeline_spec(pipeline: dict | str | os.PathLike, folder: str | os.PathLike | None = None) -> dict:
    """The job service's body for ``pipeline`` (a dict as the YAML above, or the path of such a file) from
    ``folder`` (default: the file's folder, or the current one); refuses what is not as written above."""
    if not isinstance(pipeline, dict):
        path = Path(pipeline).expanduser().absolute()
        try:
            pipeline = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise PipelineError(f"there is no pipeline file at {path}") from None
        except yaml.YAMLError as e:
            raise PipelineError(f"{path} is not YAML: {e}") from None
        folder = folder or path.parent
        if not isinstance(pipeline, dict):
            raise PipelineError(f"{path}: give a mapping with name and steps")
    folder = Path(folder or os.getcwd()).absolute()
    name = pipeline.get("name") or "pipeline"
    if not isinstance(name, str) or not pipeline_graph.STEP_NAME.fullmatch(name):
        raise PipelineError("name: letters, digits, _ . - (at most 63)")
    steps = pipeline.get("steps")
    check(steps)
    return {
        "name": name,
        "directory": str(folder / ".gpulab-pipelines"),
        "steps": [
            {
                "name": step["name"],
                "needs": step.get("needs", []),
                "condition": step.get("condition", "afterok"),
                "job": step_spec(step, folder),
            }
            for step in steps
        ],
    }


def submit_pipeline(pipeline: dict | str | os.PathLike, folder: str | os.PathLike | None = None) -> Pipeline:
    """Submit ``pipeline`` (see :func:`pipeline_spec`): every step at once, each waiting for those it needs."""
    body = pipeline_spec(pipeline, folder)
    client = default_client()
    return Pipeline(client, client.request("POST", "/pipelines", json=body).json())
