"""``/gpulab/api/v1/notebooks/...`` in the user's server: what JupyterLab's "Run as job…" needs of a notebook.

- ``GET /notebooks/parameters?path=`` reads the notebook's cell tagged ``parameters`` with papermill's own
  inspection (the names, inferred types, defaults and ``# comments`` papermill users write there) and its kernel.
- ``POST /notebooks/jobs`` submits it as a notebook job, built by :func:`gpulab.kernels.client.notebook_spec`
  exactly as ``%notebook`` and ``gpulab.submit_notebook`` build one, from the notebook as it is saved now;
  ``POST /notebooks/schedules`` makes a schedule of that job (``cron``, ``timezone``), as ``%schedule`` does.

Paths are relative to the server's root, as JupyterLab's file browser gives them; the server reads them as its
user, so nothing here reaches what that user could not.
"""

import ast
import asyncio
import json
from pathlib import Path, PurePosixPath
from typing import Literal

from jupyter_client.kernelspec import NoSuchKernel
from pydantic import BaseModel, ConfigDict, Field
from tornado import web

from ..kernels.client import GpulabError, SnapshotError, discard_snapshot, notebook_spec
from ..service.errors import APIError
from ..services.jobs.models import MAX_CONCURRENT_RUNS, MAX_PARAMETERS, ParameterValue
from .jobs_api import JobsProxyHandler


class NotebookParameter(BaseModel):
    name: str
    type: str = Field(description="The annotation (lr: float = ...), else the default's type; '' if not a literal.")
    default: str = Field(description="The default as written in the notebook (Python source).")
    value: ParameterValue = Field(description="The default as a JSON value, where it is a literal; else null.")
    literal: bool = Field(description="Whether value is the default (false: an expression, kept unless given).")
    help: str


class NotebookParameters(BaseModel):
    path: str
    kernel: str | None = Field(description="The notebook's kernel spec name.")
    parameters: list[NotebookParameter] = Field(description="Empty when no cell is tagged parameters.")


class NotebookJobRequest(BaseModel):
    """``POST /notebooks/jobs``: run the notebook at ``path`` (relative to the server's root) as a job."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1, max_length=1024)
    name: str | None = Field(None, min_length=1, max_length=200)
    parameters: dict[str, ParameterValue] = Field(default_factory=dict, max_length=MAX_PARAMETERS)
    kernel: str | None = Field(None, min_length=1, max_length=64)
    gpus: int = Field(0, ge=0, le=64)
    html: bool = Field(False, strict=True)
    experiment: str | None = Field(None, min_length=1, max_length=200)
    files: list[str] = Field(
        default_factory=list,
        max_length=256,
        description="Files or folders of the notebook's folder to copy with it ('.': all of it); it runs in the copy.",
    )


class NotebookScheduleRequest(NotebookJobRequest):
    """``POST /notebooks/schedules``: run it at the times of ``cron`` in ``timezone`` (checked by the job service)."""

    cron: str = Field(min_length=1, max_length=120)
    timezone: str = Field("UTC", min_length=1, max_length=64)
    max_concurrent: int = Field(1, ge=1, le=MAX_CONCURRENT_RUNS)
    overlap: Literal["skip", "queue"] = "skip"


def literal(source: str) -> tuple[bool, object]:
    """(True, value) where ``source`` is a JSON-able Python literal, else (False, None)."""
    try:
        value = ast.literal_eval(source)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return False, None
    scalar = (str, int, float, bool, type(None))
    if isinstance(value, scalar) or (isinstance(value, list) and all(isinstance(v, scalar) for v in value)):
        return True, value
    return False, None


def inspect(file: Path, relative: str) -> NotebookParameters:
    """The parameters of the notebook ``file`` (at ``relative`` below the root) and its kernel (blocking)."""
    import papermill  # imported here: it takes a while, and only this needs it

    try:
        kernel = json.loads(file.read_text(encoding="utf-8")).get("metadata", {}).get("kernelspec", {}).get("name")
        found = papermill.inspect_notebook(str(file))
    except (ValueError, UnicodeDecodeError, AttributeError) as e:
        raise APIError(422, f"path: {relative} is not a notebook ({type(e).__name__})", field="path") from None
    parameters = []
    for p in found.values():
        ok, value = literal(p["default"])
        annotated = p["inferred_type_name"] != "None"  # papermill reads the type from an annotation only
        parameters.append(
            NotebookParameter(
                name=p["name"],
                type=p["inferred_type_name"] if annotated else (type(value).__name__ if ok else ""),
                default=p["default"],
                value=value,
                literal=ok,
                help=p["help"],
            )
        )
    return NotebookParameters(path=relative, kernel=kernel, parameters=parameters)


def server_file(handler, path: str, suffixes: tuple[str, ...], what: str) -> Path:
    """The file at ``path`` below the server's root, one of ``suffixes``; a 4xx naming ``path`` otherwise."""
    relative = PurePosixPath(path)
    if relative.is_absolute() or ".." in relative.parts:
        raise APIError(422, "path: must be relative to the server's root, without '..'", field="path")
    if relative.suffix not in suffixes:
        raise APIError(422, f"path: must name {what}", field="path")
    file = Path(handler.settings["server_root_dir"]).expanduser() / relative
    if not file.is_file():
        raise APIError(404, f"path: there is no file {path}", field="path", code="not_found")
    return file


class NotebookHandler(JobsProxyHandler):
    def notebook(self, path: str) -> Path:
        """The notebook at ``path`` below the server's root; a 4xx naming ``path`` otherwise."""
        return server_file(self, path, (".ipynb",), "a notebook (.ipynb)")

    def check_kernel(self, name: str) -> None:
        try:
            self.kernel_spec_manager.get_kernel_spec(name)
        except NoSuchKernel:
            raise APIError(422, f"kernel: this server has no kernel {name!r}", field="kernel") from None


class ParametersHandler(NotebookHandler):
    @web.authenticated
    async def get(self):
        path = self.get_argument("path", "")
        if not path:
            raise APIError(400, "path: give the notebook's path (?path=...)", field="path")
        file = self.notebook(path)
        self.write_json(await asyncio.to_thread(inspect, file, path))


class SubmitHandler(NotebookHandler):
    async def job_spec(self, request: NotebookJobRequest) -> dict:
        """The job of ``request``, as ``%notebook`` makes it; 4xx naming the path or kernel at fault."""
        file = self.notebook(request.path)
        if request.kernel:
            await asyncio.to_thread(self.check_kernel, request.kernel)
        try:
            return await asyncio.to_thread(
                notebook_spec,
                file,
                request.parameters,
                kernel=request.kernel,
                html=request.html,
                name=request.name,
                gpus=request.gpus,
                experiment=request.experiment,
                files=request.files,
            )
        except SnapshotError as e:
            raise APIError(422, str(e), field=e.field) from None
        except GpulabError as e:
            raise APIError(422, f"path: {e}", field="path") from None

    async def submit(self, path: str, body: dict, spec: dict) -> None:
        """Forward ``body`` to ``path`` of the job service; a refusal discards the snapshot made for ``spec``."""

        async def answered(response):
            if response.code >= 400:
                await asyncio.to_thread(discard_snapshot, spec)

        try:
            await self.forward(path, body=json.dumps(body).encode(), answered=answered)
        except Exception:  # not sent (too large) or no answer
            await asyncio.to_thread(discard_snapshot, spec)
            raise

    @web.authenticated
    async def post(self):
        spec = await self.job_spec(self.parse(NotebookJobRequest))
        await self.submit("/jobs", spec, spec)


class ScheduleHandler(SubmitHandler):
    @web.authenticated
    async def post(self):
        request = self.parse(NotebookScheduleRequest)
        job = await self.job_spec(request)
        schedule = {
            "name": job["name"],
            "cron": request.cron,
            "timezone": request.timezone,
            "max_concurrent": request.max_concurrent,
            "overlap": request.overlap,
            "job": job,
        }
        await self.submit("/schedules", schedule, job)


ROUTES = [
    ("/notebooks/parameters", ParametersHandler),
    ("/notebooks/jobs", SubmitHandler),
    ("/notebooks/schedules", ScheduleHandler),
]
