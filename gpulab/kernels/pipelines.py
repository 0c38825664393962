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

Steps share a directory, ``$PIPELINE_DIR`` in each (``<folder>/.gpulab-pipelines/<name>-<run>``), to pass files;
relative paths are the pipeline file's folder's. Every step's job is labelled ``gpulab.pipeline=<run>`` and
``gpulab.step=<name>``; a step whose dependency can no longer be met is cancelled by the job service, with the
reason. Cycles, unknown or repeated steps and unknown fields are refused before anything is submitted.
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

import yaml

from .client import GpulabError, Job, JobsClient, JobTable, default_client, job_spec, notebook_spec

PROGRAMS = ("notebook", "script", "source", "entrypoint")
JOB_FIELDS = {"gpus", "cpus", "memory", "pool", "priority", "max_runtime", "retries", "env", "experiment", "labels"}
STEP_FIELDS = {"name", "needs", "condition", "parameters", "args", "kernel", "html", *PROGRAMS, *JOB_FIELDS}
MAX_STEPS = 64
CONDITIONS = ("afterok", "afternotok", "afterany")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


class PipelineError(GpulabError):
    """A pipeline that cannot run as written; the message names the step and field."""


def order(steps: list[dict]) -> list[dict]:
    """The steps in an order in which every step comes after those it needs; refuses repeated or unknown names
    and cycles (naming them), before anything is submitted."""
    if not isinstance(steps, list) or not steps:
        raise PipelineError("steps: give a list of steps")
    if len(steps) > MAX_STEPS:
        raise PipelineError(f"steps: {len(steps)} steps; a pipeline has at most {MAX_STEPS}")
    by_name: dict[str, dict] = {}
    for i, step in enumerate(steps):
        name = step.get("name") if isinstance(step, dict) else None
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise PipelineError(f"steps[{i}].name: give each step a name (letters, digits, _ . -)")
        if name in by_name:
            raise PipelineError(f"steps[{i}].name: there are two steps named {name!r}")
        if unknown := sorted(set(step) - STEP_FIELDS):
            raise PipelineError(f"step {name!r}: {unknown[0]!r} is not a step field ({', '.join(sorted(STEP_FIELDS))})")
        needs = step.get("needs", [])
        if not isinstance(needs, list) or not all(isinstance(n, str) for n in needs):
            raise PipelineError(f"step {name!r}: needs is a list of step names")
        if step.get("condition", "afterok") not in CONDITIONS:
            raise PipelineError(f"step {name!r}: condition is one of {', '.join(CONDITIONS)}")
        by_name[name] = step
    for name, step in by_name.items():
        for need in step.get("needs", []):
            if need not in by_name:
                raise PipelineError(f"step {name!r} needs {need!r}, which is not a step of this pipeline")
    done: list[dict] = []
    state: dict[str, str] = {}  # name -> "visiting" | "done"

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            cycle = path[path.index(name) :] + [name]
            raise PipelineError(f"steps {' -> '.join(cycle)} form a cycle")
        state[name] = "visiting"
        for need in by_name[name].get("needs", []):
            visit(need, [*path, name])
        state[name] = "done"
        done.append(by_name[name])

    for name in by_name:
        visit(name, [])
    return done


def step_spec(step: dict, folder: Path, pipeline_dir: Path, labels: dict) -> dict:
    """The job submission of one step, but for its dependencies (the ids of the jobs it needs are known once
    those are submitted)."""
    name = step["name"]
    programs = [p for p in PROGRAMS if step.get(p) is not None]
    if len(programs) != 1:
        raise PipelineError(f"step {name!r}: give exactly one of {', '.join(PROGRAMS)}")
    fields = {k: step[k] for k in JOB_FIELDS & set(step) if k not in ("env", "labels")}
    fields["env"] = {**step.get("env", {}), "PIPELINE_DIR": str(pipeline_dir)}
    fields["labels"] = {**step.get("labels", {}), **labels, "gpulab.step": name}
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
    """A submitted pipeline: its run id, folder and the job of each step."""

    def __init__(self, client: JobsClient, run: str, directory: Path, jobs: dict[str, Job]):
        self.client, self.run, self.directory, self.jobs = client, run, directory, jobs

    def status(self) -> dict[str, str]:
        """Each step's state now (``succeeded``, ``failed``, ``cancelled`` when its dependency was not met, ...)."""
        return {name: job.refresh().state for name, job in self.jobs.items()}

    def wait(self, timeout: float | None = None) -> dict[str, str]:
        """Wait until every step has ended; each step's final state."""
        for job in self.jobs.values():
            job.wait(timeout=timeout, raise_on_failure=False)
        return self.status()

    def cancel(self) -> None:
        """Cancel every step that has not ended."""
        for job in self.jobs.values():
            if not job.refresh().done:
                job.cancel()

    def table(self) -> JobTable:
        return JobTable(job.refresh() for job in self.jobs.values())

    def __repr__(self) -> str:
        states = ", ".join(f"{name} {job.state}" for name, job in self.jobs.items())
        return f"<gpulab Pipeline {self.run}: {states}>"


def submit_pipeline(pipeline: dict | str | os.PathLike, folder: str | os.PathLike | None = None) -> Pipeline:
    """Submit ``pipeline`` (a dict as the YAML above, or the path of such a file) from ``folder`` (default: the
    file's folder, or the current one): every step at once, in dependency order."""
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
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise PipelineError("name: letters, digits, _ . - (at most 63)")
    steps = order(pipeline.get("steps"))
    run = f"{name}-{uuid.uuid4().hex[:8]}"
    directory = folder / ".gpulab-pipelines" / run
    labels = {"gpulab.pipeline": run}
    specs = [(step, step_spec(step, folder, directory, labels)) for step in steps]  # all read before any is sent
    client = default_client()
    directory.mkdir(parents=True, exist_ok=True)
    jobs: dict[str, Job] = {}
    try:
        for step, spec in specs:
            condition = step.get("condition", "afterok")
            spec["depends_on"] = [{"job": jobs[need].id, "condition": condition} for need in step.get("needs", [])]
            jobs[step["name"]] = client.submit(spec)
    except GpulabError:
        for job in jobs.values():  # a half-submitted pipeline is cancelled, not left to run in part
            job.cancel()
        raise
    return Pipeline(client, run, directory, jobs)
