"""The Python API over the gpulab-jobs service, used by the magics and widgets and usable directly.

Configuration comes from the environment the hub gives every user server and kernel:
``GPULAB_JOBS_URL`` (the service's ``/api/v1``), ``JUPYTERHUB_API_TOKEN`` (sent as
``Authorization: token ...``), ``JUPYTERHUB_API_URL`` (to read the token's scopes) and
``GPULAB_MLFLOW_UI_URL`` (MLflow through the hub). Every call carries a W3C ``traceparent``.
Failures raise :class:`GpulabError` subclasses whose message says what to do.
"""

from __future__ import annotations  # JobsClient.list shadows the builtin in annotations

import html
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from .. import scopes, tracing
from ..job_states import TERMINAL_STATES
from ..service.client import APIError, GpulabError, HubServiceClient, NotConfigured, env, service_url

__all__ = [  # with the errors of every hub service client, raised here too
    "APIError",
    "GpulabError",
    "NotConfigured",
    "NoCapacity",
    "WaitTimeout",
    "JobFailed",
    "JobsClient",
    "Job",
    "JobTable",
    "job_spec",
    "notebook_spec",
    "snapshot",
    "discard_snapshot",
    "SnapshotError",
    "default_client",
    "submit",
    "submit_notebook",
    "jobs",
    "job",
]


class NoCapacity(GpulabError):
    """The job asks for more GPUs than its pool has; it stays queued."""


class WaitTimeout(GpulabError, TimeoutError):
    """``Job.wait`` ran out of time; the job goes on."""


class JobFailed(GpulabError):
    """The job ended without succeeding; ``job`` is its final state, ``log_tail`` its last log lines."""

    def __init__(self, job: Job, log_tail: str):
        self.job, self.log_tail = job, log_tail
        message = f"job '{job.name}' ({job.id}) {job.state}: {job.state_reason}"
        if log_tail.strip():
            message += "\nlast log lines:\n" + "\n".join("  " + line for line in log_tail.splitlines())
        super().__init__(message)


class JobsClient(HubServiceClient):
    """Calls to gpulab-jobs (and the hub and MLflow) for the user whose token this process holds."""

    def __init__(self, url: str | None = None, token: str | None = None, timeout: float = 30):
        super().__init__("gpulab-jobs", url or service_url("gpulab-jobs"), token, timeout)
        tracing.setup_tracing("gpulab-kernel")

    def submit(self, spec: dict | None = None, **fields) -> Job:
        """Submit a job: a JobSpec dict, or :func:`job_spec` keyword arguments."""
        body = spec if spec is not None else job_spec(**fields)
        try:
            return Job(self, self.request("POST", "/jobs", json=body).json())
        except GpulabError:
            discard_snapshot(body)  # refused: its inputs' copy would be left for nothing
            raise

    def list(self, state: str | None = None, all: bool = False, limit: int = 50, array: str | None = None) -> JobTable:
        """The newest ``limit`` jobs (``all``: every user's, admins only), optionally in one ``state`` or of one
        job ``array`` (by index)."""
        params = {"limit": limit, "state": state, "all": "true" if all else None, "array": array}
        data = self.request("GET", "/jobs", params=params).json()
        jobs = (Job(self, item) for item in data["jobs"])
        return JobTable(sorted(jobs, key=lambda j: j.data["array"]["index"]) if array else jobs)

    def cancel_array(self, array_id: str) -> JobTable:
        """Cancel every job of a job array that has not ended (waits until they have stopped)."""
        data = self.request("POST", f"/arrays/{array_id}/cancel", timeout=max(self.timeout, 120)).json()
        return JobTable(Job(self, item) for item in data["jobs"])

    def get(self, job_id: str) -> Job:
        """One job, by its id or a unique prefix of it (as ``%jobs`` shows)."""
        job_id = job_id.strip().lower()
        if len(job_id) != 32:
            matches = [j for j in self.list(limit=500) if j.id.startswith(job_id)] if job_id else []
            if not matches:
                raise GpulabError(f"no job of yours starts with {job_id!r}; %jobs lists your jobs")
            if len(matches) > 1:
                raise GpulabError(f"{job_id!r} starts {len(matches)} of your jobs' ids; give more of the id")
            return matches[0]
        return Job(self, self.request("GET", f"/jobs/{job_id}").json())

    def logs(self, job_id: str, tail: int | None = None) -> str:
        """The latest attempt's log (the last ``tail`` lines)."""
        return self.request("GET", f"/jobs/{job_id}/logs", params={"tail": tail}).text

    def log_from(self, job_id: str, offset: int) -> tuple[str, int]:
        """Log text from byte ``offset``, and the offset to continue from."""
        response = self.request("GET", f"/jobs/{job_id}/logs", params={"offset": offset})
        return response.text, int(response.headers.get("X-Log-Offset", offset + len(response.content)))

    def follow(self, job_id: str) -> Iterator[str]:
        """Yield the log as it grows, until the job ends. A stream the service closes at its time limit, or
        while the hub cannot re-check the token, is followed again from where it stopped; one whose token
        no longer holds raises."""
        offset = 0
        while True:
            response = self.request(
                "GET",
                f"/jobs/{job_id}/logs",
                params={"follow": "true", "offset": offset},
                stream=True,
                timeout=(self.timeout, None),
            )
            response.encoding = "utf-8"
            with response:
                event, closed = None, None
                for line in response.iter_lines(decode_unicode=True):
                    if line.startswith("event: "):
                        event = line[7:]
                    elif line.startswith("data: ") and event == "log":
                        data = json.loads(line[6:])
                        offset = data["offset"]
                        yield data["text"]
                    elif line.startswith("data: ") and event == "end":
                        return
                    elif line.startswith("data: ") and event == "closed":
                        closed = json.loads(line[6:])
                        break
            if closed is None:
                return  # the connection ended without a word: as before, stop following
            if closed["code"] not in ("max_duration", "unavailable"):
                raise GpulabError(f"following the log of {job_id} stopped: {closed['message']}")
            offset = closed["offset"]

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued or running job (waits until it has stopped)."""
        return Job(self, self.request("POST", f"/jobs/{job_id}/cancel", timeout=max(self.timeout, 120)).json())

    def pools(self) -> list[dict]:
        """Capacity and use per pool: ``[{"name", "capacity", "used", "queued"}]``."""
        return self.request("GET", "/pools").json()["pools"]

    def quota(self) -> dict:
        """The user's limits and usage, and those of their groups: ``{"limits", "usage", "groups"}``."""
        return self.request("GET", "/quota").json()

    def token_scopes(self) -> set[str]:
        """The scopes the token holds (from the hub), with gpulab's subscopes."""
        hub = env("JUPYTERHUB_API_URL", "the hub's API address").rstrip("/")
        return scopes.expand(self.request("GET", f"{hub}/user").json().get("scopes", []))

    def gpu_limit(self, pool: str = "default") -> tuple[int, str]:
        """The most GPUs a job of this user may ask for in ``pool``, and why no more."""
        if scopes.GPU not in self.token_scopes():
            return 0, f"your account may not request GPUs (needs {scopes.GPU}); ask an admin"
        capacity = {p["name"]: p["capacity"]["gpus"] for p in self.pools()}.get(pool, 0)
        quota = self.quota()
        caps = [q["limits"]["max_gpus"] for q in (quota, *quota.get("groups", {}).values())]
        caps = [c for c in caps if c is not None]
        if caps and min(caps) < capacity:
            return min(caps), f"your GPU quota is {min(caps)}"
        return capacity, f"pool '{pool}' has {capacity} GPUs"

    def mlflow_run(self, run_id: str) -> dict:
        """The MLflow run (``{"info", "data", ...}``), read through the hub."""
        base = env("GPULAB_MLFLOW_UI_URL", "MLflow's address").rstrip("/")
        return self.request("GET", f"{base}/api/2.0/mlflow/runs/get", params={"run_id": run_id}).json()["run"]


def job_spec(
    source: str | None = None,
    entrypoint: list[str] | None = None,
    *,
    name: str | None = None,
    kind: str = "train",
    gpus: int = 0,
    cpus: float = 1.0,
    memory: str | int | None = None,
    pool: str = "default",
    experiment: str | None = None,
    priority: int = 0,
    working_dir: str | None = None,
    notebook: dict | None = None,
    depends_on: list | None = None,
    **extra,
) -> dict:
    """A JobSpec dict: Python ``source``, an argv ``entrypoint`` or a ``notebook`` (see :func:`notebook_spec`), run
    in ``working_dir`` (default: cwd), after the jobs in ``depends_on`` (:class:`Job` objects or ids: each must
    succeed; ``(job, "afternotok")`` or ``(job, "afterany")`` for the other conditions).

    ``extra`` fields (``env``, ``labels``, ``max_runtime``, ``retries``, ``idempotency_key``, ...)
    pass through as they are.
    """
    if notebook is not None:
        if source is not None or entrypoint is not None:
            raise GpulabError("a notebook job runs its notebook: give no source= or entrypoint= with it")
        kind = "notebook"
    elif (source is None) == (entrypoint is None):
        raise GpulabError("give exactly one of source= (Python code) or entrypoint= (a command as a list)")
    if name is None and entrypoint is not None:
        script = next((a for a in entrypoint if a.endswith(".py")), entrypoint[0])
        name = Path(script).stem or "job"
    elif name is None:
        name = Path(os.environ.get("JPY_SESSION_NAME") or "cell").stem or "cell"
    resources = {"gpus": gpus, "cpus": cpus, "pool": pool}
    if memory is not None:
        resources["memory"] = memory
    spec = {
        "name": name,
        "kind": kind,
        "working_dir": working_dir or os.getcwd(),
        "resources": resources,
        "priority": priority,
        **extra,
    }
    if notebook is not None:
        spec["notebook"] = notebook
    else:
        spec["source" if source is not None else "entrypoint"] = source if source is not None else list(entrypoint)
    if experiment:
        spec["tracking"] = {"experiment": experiment}
    if depends_on:
        spec["depends_on"] = [dependency(d) for d in depends_on]
    return spec


def dependency(item) -> dict:
    """A ``depends_on`` entry from a :class:`Job`, an id, ``(job or id, condition)`` or such a dict."""
    if isinstance(item, dict):
        return item
    job, condition = item if isinstance(item, tuple) else (item, "afterok")
    return {"job": getattr(job, "id", job), "condition": condition}


SNAPSHOTS = ".gpulab-snapshots"  # beside the notebook: each job's copy of the files it was given
SNAPSHOT_MAX_BYTES = 100 * 1024 * 1024
SNAPSHOT_MAX_FILES = 10_000
_NOT_SNAPSHOTTED = (SNAPSHOTS, ".gpulab-pipelines", ".ipynb_checkpoints", "__pycache__", ".git")


class SnapshotError(GpulabError):
    """The files to snapshot with a notebook job cannot be: the message says which and why."""

    field = "files"


def _snapshot_sources(folder: Path, files: list[str]) -> list[tuple[Path, PurePosixPath]]:
    """Each file to copy (also those below a chosen folder) with its path relative to ``folder``."""
    found: list[tuple[Path, PurePosixPath]] = []
    for name in files:
        relative = PurePosixPath(name)
        if relative.is_absolute() or ".." in relative.parts:
            raise SnapshotError(f"files: {name!r} must be relative to the notebook's folder, without '..'")
        path = folder / relative
        if path.is_dir():
            for root, dirs, names in os.walk(path):
                dirs[:] = [d for d in dirs if d not in _NOT_SNAPSHOTTED]
                for n in names:
                    file = Path(root) / n
                    found.append((file, PurePosixPath(file.relative_to(folder).as_posix())))
                    if len(found) > SNAPSHOT_MAX_FILES:
                        raise SnapshotError(f"files: over {SNAPSHOT_MAX_FILES} files; choose fewer")
        elif path.is_file():
            found.append((path, PurePosixPath(path.relative_to(folder).as_posix())))
        else:
            raise SnapshotError(f"files: there is no {name} in {folder}")
    return found


def snapshot(folder: Path, files: list[str], name: str, max_bytes: int = SNAPSHOT_MAX_BYTES) -> Path:
    """Copy ``files`` of ``folder`` (paths relative to it; ``"."``: all of it, but gpulab's own folders and
    checkpoints) to a new folder ``<folder>/.gpulab-snapshots/<name>-<id>/``, where the job runs: later edits of
    the originals do not change it, and every retry sees the same inputs. At most ``max_bytes`` in all."""
    sources = _snapshot_sources(folder, files)
    total = sum(path.stat().st_size for path, _ in sources)
    if total > max_bytes:
        raise SnapshotError(
            f"files: {total / 2**20:.1f} MiB is over the snapshot's limit of {max_bytes / 2**20:.0f} MiB; "
            "choose fewer files (or read large data from where it is, by its absolute path)"
        )
    label = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip(".-")[:64] or "job"  # a folder name, whatever the job's
    target = folder / SNAPSHOTS / f"{label}-{uuid.uuid4().hex[:8]}"
    target.mkdir(parents=True)
    for path, relative in dict.fromkeys(sources):
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target / relative)
    return target


def discard_snapshot(spec: dict) -> None:
    """Remove the snapshot :func:`notebook_spec` made for ``spec``, which was not submitted."""
    working_dir = Path(spec.get("working_dir") or "")
    if (spec.get("notebook") or {}).get("files") and working_dir.parent.name == SNAPSHOTS:
        shutil.rmtree(working_dir, ignore_errors=True)


def notebook_spec(
    path: str | os.PathLike,
    parameters: dict | None = None,
    *,
    kernel: str | None = None,
    output: str | None = None,
    html: bool = False,
    name: str | None = None,
    working_dir: str | None = None,
    files: list[str] | str | None = None,
    **fields,
) -> dict:
    """A JobSpec dict of a notebook job: the notebook at ``path`` as it is now (its outputs cleared: they are not
    run), run with papermill on ``kernel`` (default: the notebook's) with ``parameters`` injected after its cell
    tagged ``parameters``, in ``working_dir`` (default: the notebook's folder). The executed notebook goes to
    ``output`` (default: ``<name>-<job id prefix>.ipynb`` beside it), with an HTML copy if ``html``. ``fields``
    as for :func:`job_spec` (``gpus``, ``pool``, ``experiment``, ...).

    ``files`` (paths relative to the notebook's folder, ``"."`` for all of it) are copied now with the notebook
    (:func:`snapshot`), and the job runs in that copy, as jupyter-scheduler's input folders do."""
    notebook = Path(path).expanduser().absolute()
    try:
        content = json.loads(notebook.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GpulabError(f"there is no notebook at {notebook}") from None
    except (ValueError, UnicodeDecodeError):
        raise GpulabError(f"{notebook} is not a notebook (not JSON)") from None
    if not isinstance(content, dict) or not isinstance(content.get("cells"), list):
        raise GpulabError(f"{notebook} is not a notebook (no cells)")
    for cell in content["cells"]:
        if isinstance(cell, dict) and cell.get("cell_type") == "code":
            cell.update(outputs=[], execution_count=None)
    files = [files] if isinstance(files, str) else list(files or [])
    if files and working_dir:
        raise GpulabError("a notebook job with files= runs in their snapshot: give no working_dir= with it")
    program = {
        "path": str(notebook),
        "content": content,
        "parameters": parameters or {},
        "kernel": kernel,
        "output": str(Path(output).expanduser().absolute()) if output else None,
        "formats": ["ipynb", "html"] if html else ["ipynb"],
        "files": files,
    }
    if files:
        working_dir = str(snapshot(notebook.parent, files, name or notebook.stem))
    return job_spec(
        name=name or notebook.stem, working_dir=working_dir or str(notebook.parent), notebook=program, **fields
    )


class Job:
    """A handle on one job; ``data`` is the service's latest view of it (refresh with :meth:`refresh`)."""

    def __init__(self, client: JobsClient, data: dict):
        self.client, self.data = client, data
        self._experiment_id: str | None = None

    id = property(lambda self: self.data["id"])
    name = property(lambda self: self.data["name"])
    state = property(lambda self: self.data["state"])
    state_reason = property(lambda self: self.data["state_reason"])
    progress = property(lambda self: self.data["progress"])
    mlflow_run_id = property(lambda self: self.data.get("mlflow_run_id"))
    wandb_run_path = property(lambda self: self.data.get("wandb_run_path"))
    output_notebook = property(lambda self: self.data.get("output_notebook"))

    @property
    def done(self) -> bool:
        return self.state in TERMINAL_STATES

    def refresh(self) -> Job:
        self.data = self.client.request("GET", f"/jobs/{self.id}").json()
        return self

    def change(self, priority: int | None = None, **resources) -> Job:
        """Change a queued job's ``priority`` or ``resources`` (``gpus=``, ``cpus=``, ``memory=``, ``pool=``; the
        others stay as they are)."""
        body = {"priority": priority, "resources": resources or None}
        return self._patch({k: v for k, v in body.items() if v is not None})

    def hold(self) -> Job:
        """Keep a queued job from starting until :meth:`release`."""
        return self._patch({"held": True})

    def release(self) -> Job:
        return self._patch({"held": False})

    def _patch(self, body: dict) -> Job:
        self.data = self.client.request("PATCH", f"/jobs/{self.id}", json=body).json()
        return self

    def wait(self, timeout: float | None = None, poll: float = 1.0, raise_on_failure: bool = True) -> Job:
        """Block until the job ends; return it. Raises :class:`JobFailed` unless it succeeded
        (with ``raise_on_failure``), :class:`WaitTimeout` after ``timeout`` s, and
        :class:`NoCapacity` if it waits for GPUs its pool does not have."""
        deadline = None if timeout is None else time.monotonic() + timeout
        checked_capacity = False
        while not self.refresh().done:
            if not checked_capacity and self.state_reason.startswith("waiting: no GPU capacity"):
                checked_capacity = True
                self._check_capacity()
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(
                    f"job '{self.name}' ({self.id}) is still {self.state} after {timeout:g}s; wait again, or cancel it"
                )
            time.sleep(poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic())))
        if raise_on_failure and self.state != "succeeded":
            raise JobFailed(self, self.logs(tail=20))
        return self

    def _check_capacity(self) -> None:
        pool, gpus = self.data["pool"], self.data["resources"]["gpus"]
        have = {p["name"]: p["capacity"]["gpus"] for p in self.client.pools()}.get(pool, 0)
        if have < gpus:
            raise NoCapacity(
                f"no GPU capacity in pool '{pool}' ({have} GPUs, {gpus} requested); job {self.id} "
                "stays queued: cancel it, or submit it to a pool with GPUs"
            )

    def logs(self, tail: int | None = None) -> str:
        return self.client.logs(self.id, tail)

    def follow(self) -> Iterator[str]:
        return self.client.follow(self.id)

    def cancel(self) -> Job:
        self.data = self.client.cancel(self.id).data
        return self

    def mlflow_run(self) -> dict | None:
        """The job's MLflow run (``{"info", "data", ...}``), or None before the job has one."""
        return self.client.mlflow_run(self.mlflow_run_id) if self.mlflow_run_id else None

    @property
    def mlflow_url(self) -> str | None:
        """The MLflow UI page of the job's run, through the hub."""
        base = os.environ.get("GPULAB_MLFLOW_UI_URL")
        if not (base and self.mlflow_run_id):
            return None
        if self._experiment_id is None:
            try:
                self._experiment_id = self.mlflow_run()["info"]["experiment_id"]
            except GpulabError:
                return f"{base.rstrip('/')}/#/runs/{self.mlflow_run_id}"  # MLflow finds the experiment
        return f"{base.rstrip('/')}/#/experiments/{self._experiment_id}/runs/{self.mlflow_run_id}"

    @property
    def percent(self) -> str:
        fraction = self.progress.get("fraction")
        return "" if fraction is None else f"{fraction:.0%}"

    def __repr__(self) -> str:
        return f"<gpulab Job {self.id[:8]} '{self.name}' {self.state}{' ' + self.percent if self.percent else ''}>"

    def _repr_html_(self) -> str:
        return JobTable([self])._repr_html_()


class JobTable(list):
    """A list of :class:`Job` that shows as a table (HTML in notebooks, text elsewhere)."""

    COLUMNS = ("id", "name", "kind", "state", "progress", "gpus", "created", "reason")

    def rows(self) -> list[tuple[str, ...]]:
        return [
            (
                j.id[:8],
                j.name,
                j.data["kind"],
                j.state,
                j.percent,
                str(j.data["resources"]["gpus"]),
                j.data["created_at"][:19].replace("T", " "),
                j.state_reason,
            )
            for j in self
        ]

    def __repr__(self) -> str:
        if not self:
            return "no jobs"
        table = [self.COLUMNS, *self.rows()]
        widths = [max(len(row[i]) for row in table) for i in range(len(self.COLUMNS) - 1)]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1] for row in table)

    def _repr_html_(self) -> str:
        if not self:
            return "<p>no jobs</p>"
        head = "".join(f"<th>{c}</th>" for c in self.COLUMNS)
        body = []
        for job, row in zip(self, self.rows()):
            cells = [f'<td title="{job.id}"><code>{row[0]}</code></td>']
            cells += [f"<td>{html.escape(c)}</td>" for c in row[1:]]
            body.append(f'<tr class="gpulab-job gpulab-{job.state}">{"".join(cells)}</tr>')
        return f'<table class="gpulab-jobs"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


_default: JobsClient | None = None


def default_client() -> JobsClient:
    """The client for the current environment (made again when its variables change)."""
    global _default
    if _default is None or (_default.url, _default.token) != (
        os.environ.get("GPULAB_JOBS_URL", "").rstrip("/"),
        os.environ.get("JUPYTERHUB_API_TOKEN"),
    ):
        _default = JobsClient()
    return _default


def submit(source: str | None = None, entrypoint: list[str] | None = None, **fields) -> Job:
    """Submit a job: ``submit(entrypoint=["python", "train.py"], gpus=1, experiment="digits")``."""
    return default_client().submit(job_spec(source, entrypoint, **fields))


def submit_notebook(path: str | os.PathLike, parameters: dict | None = None, **fields) -> Job:
    """Run a notebook as a job: ``submit_notebook("train.ipynb", {"lr": 0.01}, gpus=1)`` (see :func:`notebook_spec`);
    the job's ``output_notebook`` is where the executed notebook is."""
    return default_client().submit(notebook_spec(path, parameters, **fields))


def jobs(state: str | None = None, all: bool = False, limit: int = 50) -> JobTable:
    """Your newest jobs (every user's with ``all=True``, admins only)."""
    return default_client().list(state=state, all=all, limit=limit)


def job(job_id: str) -> Job:
    """The job with this id (or unique id prefix)."""
    return default_client().get(job_id)
