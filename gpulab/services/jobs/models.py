"""Pydantic bodies of the jobs API: submission (:class:`JobSpec`), responses, errors, attestation."""

import fnmatch
import functools
import json
import re
import secrets
from pathlib import PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator, model_validator
from pydantic_core import PydanticCustomError

from gpulab import pipeline_graph, sweeps
from gpulab.attestation.nras import ARCHES, DEVICES
from gpulab.attestation.service import NODE_NAME, PURPOSE
from gpulab.attestation.verifier import AttestedDevice
from gpulab.job_states import TERMINAL_STATES, JobState
from gpulab.text import CONTROL

from . import cron

DENIED_ENV = (
    "JUPYTERHUB_*",
    "GPULAB_*",
    "*_TOKEN",
    "*_SECRET",
    "*_KEY",
    "*PASSWORD*",
    "AWS_*",
    "WANDB_API_KEY",
)
MAX_SOURCE_BYTES = 1024 * 1024
MAX_RUNTIME = 366 * 24 * 3600  # seconds: a year, which any schedule's arithmetic takes
MAX_MEMORY = 2**50  # bytes: 1 PiB, beyond any machine's
MAX_CPUS = 4096
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_LABEL_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_./-]{0,62}")
_MEMORY = re.compile(r"(\d{1,20}(?:\.\d{1,9})?)\s*(Ki|Mi|Gi|Ti|K|k|M|G|T)?")
_UNITS = {None: 1, "K": 10**3, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_UNITS.update({"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40})


def memory_bytes(value: int | str) -> int:
    """Bytes from a number of them or a size like "4Gi", "512Mi" or "2G" (more than 0, at most 1 PiB); a
    ``ValueError`` saying what is wrong otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError("must be a number of bytes or a string like '4Gi' or '512Mi'")
    if isinstance(value, str):
        match = _MEMORY.fullmatch(value.strip())
        if not match:
            raise ValueError("must be a number of bytes or a string like '4Gi' or '512Mi'")
        value = int(float(match[1]) * _UNITS[match[2]])
    if not 0 < value <= MAX_MEMORY:
        raise ValueError("must be greater than 0 and at most 1 PiB")
    return value


def _error(code: str, message: str, **ctx) -> PydanticCustomError:
    return PydanticCustomError(code, message, ctx or None)


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise _error("nul_byte", "must not contain NUL bytes")
    return value


def _no_control(value: str) -> str:
    if CONTROL.search(value):
        raise _error("control_character", "must not contain control characters")
    return value


MAX_BODY = 1024 * 1024
"""Bytes of a request body gpulab-jobs takes (larger: 413); the server extension refuses larger ones itself."""


Arg = Annotated[str, Field(min_length=1)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Resources(_Body):
    """What one attempt needs; ``memory`` accepts bytes or "4Gi"/"512Mi"/"2G" and is stored as bytes."""

    gpus: int = Field(0, ge=0, le=64, strict=True)  # strict: false is no GPU count
    cpus: float = Field(1.0, ge=0.01, le=MAX_CPUS, allow_inf_nan=False, strict=True)
    memory: Annotated[
        int | None,
        WithJsonSchema(
            {
                "anyOf": [
                    {"type": "integer", "exclusiveMinimum": 0, "maximum": MAX_MEMORY},
                    {"type": "string", "pattern": rf"^\s*{_MEMORY.pattern}\s*$", "description": "at most 1 PiB"},
                    {"type": "null"},
                ]
            }
        ),
    ] = None
    pool: str = Field("default", min_length=1, max_length=64)

    @field_validator("pool")
    @classmethod
    def _pool(cls, value):
        return _no_control(value)

    @field_validator("memory", mode="before")
    @classmethod
    def _memory_bytes(cls, value):
        if value is None:
            return None
        try:
            return memory_bytes(value)
        except ValueError as e:
            raise _error("memory", str(e)) from None


class Tracking(_Body):
    experiment: str | None = Field(None, min_length=1, max_length=200)
    wandb_project: str | None = Field(None, min_length=1, max_length=200)


MAX_PARAMETERS = 64
_PARAMETER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_KERNEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
ParameterValue = str | int | float | bool | None | list[str | int | float | bool | None]


class NotebookSpec(_Body):
    """A notebook job: ``content``, the notebook as it was when submitted (nbformat 4 JSON, its outputs may be
    cleared), run top to bottom by papermill on ``kernel`` (default: the notebook's own) with ``parameters``
    injected after the cell tagged ``parameters``. The executed notebook is written to ``output`` (default:
    ``<name>-<job id prefix>.ipynb`` beside where the notebook was, ``path``), with an HTML copy where ``formats``
    asks for one, and logged to the job's MLflow run."""

    path: str = Field(min_length=1, max_length=1024, description="Where the notebook was (absolute).")
    content: dict[str, Any]
    parameters: dict[str, ParameterValue] = Field(default_factory=dict, max_length=MAX_PARAMETERS)
    kernel: str | None = Field(None, description="A kernel spec name, e.g. python3 or gpulab-rapids.")
    output: str | None = Field(None, max_length=1024, description="Absolute path of the executed notebook.")
    formats: list[Literal["ipynb", "html"]] = Field(default_factory=lambda: ["ipynb"], min_length=1, max_length=2)
    files: list[str] = Field(
        default_factory=list,
        max_length=256,
        description="The files of the notebook's folder copied with it when submitted (relative; '.': all of it); "
        "the job runs in that copy (its working_dir).",
    )

    def output_for(self, job_id: str) -> str:
        """Where the executed notebook goes: ``output``, else ``<name>-<job id prefix>.ipynb`` beside ``path`` (each
        job its own file, as papermill users name outputs)."""
        if self.output:
            return self.output
        path = PurePosixPath(self.path)
        return str(path.with_name(f"{path.stem}-{job_id[:8]}.ipynb"))

    @field_validator("path", "output")
    @classmethod
    def _absolute(cls, value):
        if value is not None and not value.startswith("/"):
            raise _error("notebook_path", "must be an absolute path")
        return None if value is None else _no_control(value)

    @field_validator("content")
    @classmethod
    def _content(cls, value):
        if value.get("nbformat") != 4 or not isinstance(value.get("cells"), list):
            raise _error("notebook_format", "must be a notebook in nbformat 4 (with 'nbformat': 4 and 'cells')")
        if len(json.dumps(value).encode()) > MAX_SOURCE_BYTES:
            raise _error("notebook_too_large", "must be at most 1 MiB as JSON; clear its outputs first")
        return value

    @field_validator("parameters")
    @classmethod
    def _parameters(cls, value):
        for name in value:
            if not _PARAMETER.fullmatch(name):
                raise _error("parameter_name", "parameter '{name}' is not a Python identifier", name=name[:64])
        return value

    @field_validator("files")
    @classmethod
    def _files(cls, value):
        for name in value:
            path = PurePosixPath(name)
            if not name or len(name) > 1024 or path.is_absolute() or ".." in path.parts:
                raise _error("notebook_files", "each must be relative to the notebook's folder, without '..'")
            _no_control(name)
        return value

    @field_validator("kernel")
    @classmethod
    def _kernel(cls, value):
        if value is not None and not _KERNEL_NAME.fullmatch(value):
            raise _error("kernel_name", "must be a kernel spec name (letters, digits, . _ -)")
        return value


MAX_DEPENDENCIES = 32
MAX_LABELS = 32


class Dependency(_Body):
    """A job this one waits for, with Slurm's conditions: ``afterok`` (it succeeded), ``afternotok`` (it failed,
    was cancelled or timed out), ``afterany`` (it ended). One that can no longer be met cancels the waiting job."""

    job: str = Field(pattern=r"^[0-9a-f]{32}$", description="The id of a job of the same owner.")
    condition: Literal["afterok", "afternotok", "afterany"] = "afterok"

    def waiting_reason(self) -> str:
        """A waiting job's reason while this dependency is not met yet."""
        goal = {"afterok": "to succeed", "afternotok": "to fail", "afterany": "to end"}[self.condition]
        return f"waiting for job {self.job[:8]} {goal}"


MAX_ARRAY = sweeps.MAX_TRIALS  # jobs of one array (500): GET /jobs?array= lists them all in one page


class ArraySpec(_Body):
    """A job array, as Slurm's ``--array=0-<count-1>%<max_concurrent>``: ``count`` jobs of the same submission,
    each with its ``GPULAB_ARRAY_INDEX`` (0..count-1), at most ``max_concurrent`` of them running at once."""

    count: int = Field(ge=1, le=MAX_ARRAY)
    max_concurrent: int | None = Field(None, ge=1, le=MAX_ARRAY, description="Default: no limit but the quotas'")

    @model_validator(mode="after")
    def _within(self):
        if self.max_concurrent is not None and self.max_concurrent > self.count:
            raise _error("array_max", "max_concurrent is at most count", field="max_concurrent")
        return self


SweepValue = str | int | float | bool | None


class SweepSpec(_Body):
    """A hyperparameter sweep (:mod:`gpulab.sweeps`): the job runs as a job array, one job per trial, each with its
    parameters in ``GPULAB_TRIAL_PARAMS`` (JSON; ``gpulab.trial_params()``). ``parameters``: name -> a list of
    values, or a range ``{"low", "high", "log", "int", "count"}`` (``count`` points in a grid). ``grid``: every
    combination; ``random``: ``trials`` draws with ``seed`` (default: one chosen at submission, then kept)."""

    parameters: dict[str, list[SweepValue] | dict[str, float | int | bool]]
    strategy: Literal["grid", "random"] = "grid"
    trials: int | None = Field(None, ge=1, le=MAX_ARRAY)
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    max_concurrent: int | None = Field(None, ge=1, le=MAX_ARRAY, description="Trials running at once at most")

    @model_validator(mode="after")
    def _space(self):
        try:
            count = sweeps.check(self.parameters, self.strategy, self.trials)
        except sweeps.SpaceError as e:
            raise _error("sweep", f"{e.field}: {e}") from None
        if self.max_concurrent is not None and self.max_concurrent > count:
            raise _error("sweep", f"max_concurrent: at most the {count} trials")
        if self.strategy == "random" and self.seed is None:
            self.seed = secrets.randbelow(2**32)  # kept with the job: every attempt sees the same trials
        return self

    def expand(self) -> list[dict]:
        """Each trial's parameters, by array index (kept for the sweeps seen lately: a listing of an array's jobs
        asks this of each)."""
        return _trials(json.dumps(self.model_dump(mode="json")))


@functools.lru_cache(maxsize=64)
def _trials(sweep_json: str) -> list[dict]:
    sweep = json.loads(sweep_json)
    return sweeps.expand(sweep["parameters"], sweep["strategy"], sweep["trials"], sweep["seed"])


class ArrayMember(BaseModel):
    """Where a job stands in its array."""

    id: str = Field(
        description="The array's id: GET /jobs?array=<id> lists its jobs, POST /arrays/<id>/cancel stops them"
    )
    index: int
    count: int
    max_concurrent: int | None
    params: dict[str, SweepValue] | None = Field(None, description="A sweep's trial: its parameters")


# Exactly one of entrypoint, source and notebook, in the schema as in the validator below (null counts as absent)
EXACTLY_ONE_PROGRAM = {
    "oneOf": [
        {"required": ["entrypoint"], "properties": {"entrypoint": {"type": "array"}}},
        {"required": ["source"], "properties": {"source": {"type": "string"}}},
        {"required": ["notebook"], "properties": {"notebook": {"type": "object"}}},
    ]
}


class JobSpec(_Body, json_schema_extra=EXACTLY_ONE_PROGRAM):
    """A job submission: ``entrypoint`` (argv), ``source`` (Python code) or ``notebook``, exactly one; a
    notebook's kind is ``notebook``."""

    name: str = Field(min_length=1, max_length=200)
    kind: Literal["train", "preprocess", "notebook"] = "train"
    entrypoint: list[Arg] | None = Field(None, min_length=1)
    source: str | None = None
    notebook: NotebookSpec | None = None
    working_dir: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    resources: Resources = Field(default_factory=Resources)
    priority: int = Field(
        0,
        ge=-100,
        le=100,
        description="Orders the submitter's own queued jobs (highest "
        "first); among all users' jobs only when an admin submits, so that fair share between "
        "users holds.",
    )
    max_runtime: int | None = Field(None, gt=0, le=MAX_RUNTIME)
    retries: int = Field(0, ge=0, le=10)
    tracking: Tracking = Field(default_factory=Tracking)
    idempotency_key: str | None = Field(None, min_length=1, max_length=200)
    labels: dict[str, str] = Field(default_factory=dict, max_length=MAX_LABELS)
    attestation: Literal["none", "required"] = "none"
    depends_on: list[Dependency] = Field(default_factory=list, max_length=MAX_DEPENDENCIES)
    array: ArraySpec | None = None
    preemptible: bool = Field(
        False,
        strict=True,
        description="May be stopped (SIGTERM, JobQueue.preemption_grace s, SIGKILL) and requeued, without using a "
        "retry, for a job of a group reclaiming its quota or of a higher priority; the next attempt sees "
        "GPULAB_PREEMPTED=1 and resumes from GPULAB_CHECKPOINT_DIR",
    )
    sweep: SweepSpec | None = Field(None, description="Run as a hyperparameter sweep: a job array, a job a trial")
    group: str | None = Field(
        None,
        min_length=1,
        max_length=255,
        description="The group (one of yours, in a cohort of JobQueue.cohorts) whose quota the job uses; "
        "default: the first of your groups in a cohort",
    )

    @field_validator("depends_on")
    @classmethod
    def _distinct(cls, value):
        jobs = [d.job for d in value]
        if len(set(jobs)) != len(jobs):
            raise _error("dependency_repeated", "names a job more than once")
        return value

    @field_validator("name", "idempotency_key")
    @classmethod
    def _plain(cls, value):
        return None if value is None else _no_control(value)

    @field_validator("entrypoint")
    @classmethod
    def _entrypoint(cls, value):
        return None if value is None else [_no_nul(arg) for arg in value]

    @field_validator("source")
    @classmethod
    def _source(cls, value):
        if value is not None and len(value.encode()) > MAX_SOURCE_BYTES:
            raise _error("source_too_large", "must be at most 1 MiB (UTF-8)")
        return value

    @field_validator("working_dir")
    @classmethod
    def _working_dir(cls, value):
        if value is not None and not value.startswith("/"):
            raise _error("working_dir", "must be an absolute path")
        return None if value is None else _no_nul(value)

    @field_validator("env")
    @classmethod
    def _env(cls, value):
        for name, val in value.items():
            if not _ENV_NAME.fullmatch(name):
                raise _error("env_name", "env variable name '{name}' is not valid", name=name)
            for pattern in DENIED_ENV:
                if fnmatch.fnmatchcase(name.upper(), pattern):
                    raise _error(
                        "env_denied",
                        "env variable '{name}' is not allowed (matches {pattern})",
                        name=name,
                        pattern=pattern,
                    )
            _no_nul(val)
        return value

    @field_validator("labels")
    @classmethod
    def _labels(cls, value):
        for key, val in value.items():
            if not _LABEL_KEY.fullmatch(key):
                raise _error(
                    "label_key",
                    "label key '{key}' must be 1-63 characters of letters, digits and _ . / -, "
                    "starting with a letter or digit",
                    key=key,
                )
            if len(val) > 256:
                raise _error("label_value", "label '{key}': value longer than 256 characters", key=key)
        return value

    @model_validator(mode="before")
    @classmethod
    def _notebook_kind(cls, value):
        if isinstance(value, dict) and value.get("notebook") is not None and "kind" not in value:
            return {**value, "kind": "notebook"}
        return value

    @model_validator(mode="after")
    def _one_program(self):
        given = [f for f in ("entrypoint", "source", "notebook") if getattr(self, f) is not None]
        if len(given) != 1:
            field = given[-1] if given else "entrypoint"
            raise _error(
                "entrypoint_xor_source", "give exactly one of 'entrypoint', 'source' or 'notebook'", field=field
            )
        if (self.kind == "notebook") != (self.notebook is not None):
            raise _error("notebook_kind", "kind 'notebook' goes with a 'notebook' and only with one", field="kind")
        if self.sweep is not None:  # a sweep is the array of its trials (a stored spec has both, the same)
            trials = ArraySpec(count=len(self.sweep.expand()), max_concurrent=self.sweep.max_concurrent)
            if self.array is not None and self.array != trials:
                raise _error("sweep_xor_array", "give either a sweep or an array: a sweep is its array", field="array")
            self.array = trials
        return self


class JobUpdate(_Body):
    """``PATCH /jobs/{id}``: change a queued job (one that started keeps what it started with): its ``priority``,
    its ``resources`` (the fields given; the others stay), or hold it (``held``: no candidate of the scheduling
    pass until released)."""

    priority: int | None = Field(None, ge=-100, le=100, strict=True)
    resources: Resources | None = None
    held: bool | None = Field(None, strict=True)


class Progress(BaseModel):
    step: int | None = None
    total: int | None = None
    fraction: float | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)


class ProgressUpdate(_Body):
    """Body of ``POST /jobs/{id}/progress`` (from the runner)."""

    step: int = Field(ge=0)
    total: int | None = Field(None, gt=0)
    metrics: dict[str, float] = Field(default_factory=dict)


class TrackingUpdate(_Body):
    """Body of ``POST /jobs/{id}/tracking`` (from the runner)."""

    mlflow_run_id: str | None = Field(None, max_length=64)
    mlflow_experiment_id: str | None = Field(None, max_length=64)
    wandb_run_path: str | None = Field(None, max_length=255)


class JobIdentity(BaseModel):
    """Whose a job token is (``GET /jobs/{id}/identity``): services that take jobs' tokens ask here."""

    job_id: str
    owner: str
    groups: list[str]  # the owner's hub groups when the job was submitted
    attempt: int


class JobCredentials(BaseModel):
    """``POST /jobs/{id}/credentials``: the secrets an executor whose environments others can read (Ray) was not
    given, for the attempt's runner (``GPULAB_JOB_TOKEN``, ``MLFLOW_TRACKING_TOKEN``, ...)."""

    env: dict[str, str]


class Job(BaseModel):
    """A job as the API returns it; times are ISO 8601 UTC strings ("...Z")."""

    id: str
    owner: str
    name: str
    kind: str
    state: JobState
    state_reason: str
    spec: JobSpec
    priority: int
    pool: str
    resources: Resources
    attempt: int
    max_retries: int
    created_at: str
    updated_at: str
    started_at: str | None
    finished_at: str | None
    exit_code: int | None
    progress: Progress
    mlflow_run_id: str | None
    wandb_run_path: str | None
    labels: dict[str, str]
    log_size: int
    attestation_fingerprint: str | None = Field(
        description="SHA-256 hex of the NRAS token that attested the node of the latest dispatch "
        "(attestation: required jobs)"
    )
    attestation_node: str | None = Field(description="The node whose attestation let the latest attempt start")
    output_notebook: str | None = Field(
        None, description="A notebook job's executed notebook: its path where the job runs (kept when it fails)"
    )
    schedule_id: str | None = Field(None, description="The schedule whose run this job is")
    pipeline_id: str | None = Field(None, description="The pipeline whose step this job is")
    array: ArrayMember | None = Field(None, description="Its place in its job array")
    held: bool = Field(False, description="Held (PATCH held): not started until released")
    preemptions: int = Field(0, description="Attempts stopped by preemption (and requeued without using a retry)")
    queue_position: int | None = Field(
        None,
        description="A queued job's place among its pool's due queued jobs by admin priority and age (1: next; "
        "fair share, quotas and each owner's own priorities can reorder them); GET /jobs/{id} only",
    )
    estimated_start: str | None = Field(
        None,
        description="When a queued job holding a reservation (backfill, of its pool or its cohort's quota) starts "
        "at the latest, as the running jobs' max_runtime says; None when it cannot be computed; GET /jobs/{id} only",
    )


class JobEvent(BaseModel):
    job_id: str
    at: str
    from_state: JobState | None
    to_state: JobState
    reason: str


class JobList(BaseModel):
    jobs: list[Job]
    next_cursor: str | None


MAX_STEP_LABELS = MAX_LABELS - 2  # gpulab.pipeline and gpulab.step


class PipelineStep(_Body):
    """One step of a pipeline: a job (as ``POST /jobs`` takes, but for ``depends_on``) that waits for the steps it
    ``needs``, with Slurm's ``condition`` (``afterok``: each succeeded; ``afternotok``: each failed; ``afterany``)."""

    name: str = Field(pattern=f"^{pipeline_graph.STEP_NAME.pattern}$")
    needs: list[str] = Field(default_factory=list, max_length=MAX_DEPENDENCIES)
    condition: Literal["afterok", "afternotok", "afterany"] = "afterok"
    job: JobSpec

    @field_validator("job")
    @classmethod
    def _no_dependencies(cls, value):
        if value.depends_on:
            raise _error("step_dependency", "a step waits for the steps it needs, not for depends_on")
        if value.idempotency_key:
            raise _error("step_idempotency", "a step has no idempotency_key (the pipeline may have one)")
        if value.array:
            raise _error("step_array", "a step is one job, not an array")
        if len(value.labels) > MAX_STEP_LABELS:
            raise _error("step_labels", f"a step's job has at most {MAX_STEP_LABELS} labels (the pipeline adds two)")
        return value


class PipelineSpec(_Body):
    """``POST /pipelines``: a small DAG of steps submitted at once (all of them or, refused, none). Each run gets a
    directory shared by its steps, ``<directory>/<name>-<run id>`` (``$PIPELINE_DIR`` in each, made by the first
    step that starts); a step whose ``needs`` can no longer be met is cancelled with the reason."""

    name: str = Field(pattern=f"^{pipeline_graph.STEP_NAME.pattern}$")
    directory: str = Field(min_length=2, max_length=1024, description="Absolute: where each run's directory is made")
    steps: list[PipelineStep] = Field(min_length=1, max_length=pipeline_graph.MAX_STEPS)
    idempotency_key: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="A retried submission with the same key returns the pipeline it made",
    )

    @field_validator("idempotency_key")
    @classmethod
    def _plain(cls, value):
        return None if value is None else _no_control(value)

    @field_validator("directory")
    @classmethod
    def _absolute(cls, value):
        if not value.startswith("/"):
            raise _error("directory", "must be an absolute path")
        return _no_control(value)

    @model_validator(mode="after")
    def _graph(self):
        try:
            pipeline_graph.order([(step.name, step.needs) for step in self.steps])
        except pipeline_graph.GraphError as e:
            raise _error("pipeline_graph", str(e), field=e.field) from None
        return self

    def ordered(self) -> list[PipelineStep]:
        """The steps, each after those it needs."""
        return [self.steps[i] for i in pipeline_graph.order([(s.name, s.needs) for s in self.steps])]


class PipelineStepStatus(BaseModel):
    name: str
    needs: list[str]
    condition: Literal["afterok", "afternotok", "afterany"]
    job_id: str
    state: JobState | None = Field(description="Its job's state (null: the job was deleted)")
    state_reason: str | None


class Pipeline(BaseModel):
    """A pipeline run as the API returns it. ``state``: queued (no step started), running (a step has not ended),
    else succeeded (every step did, or was skipped as its conditions said), failed (a step failed or timed out) or
    cancelled (a step was cancelled by someone)."""

    id: str
    owner: str
    name: str
    state: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    directory: str = Field(description="The directory its steps share ($PIPELINE_DIR)")
    schedule_id: str | None = Field(None, description="The schedule whose run it is")
    steps: list[PipelineStepStatus]
    created_at: str


class PipelineList(BaseModel):
    pipelines: list[Pipeline]


MAX_CONCURRENT_RUNS = 100


class _When(_Body):
    """The checks of a schedule's ``cron`` and ``timezone``, for the bodies that carry them."""

    @field_validator("cron", check_fields=False)
    @classmethod
    def _cron(cls, value):
        if value is not None and (error := cron.cron_error(value)):
            raise _error("cron", error)
        return None if value is None else " ".join(value.split())

    @field_validator("timezone", check_fields=False)
    @classmethod
    def _timezone(cls, value):
        if value is not None and (error := cron.timezone_error(value)):
            raise _error("timezone", error)
        return value


class ScheduleSettings(_When):
    """What a schedule's runs do when one is due: ``max_concurrent`` runs at once, and a due run past it is
    skipped or, with ``overlap: queue``, started when one ends (one run waits at most); runs missed while the
    service was down are run once when it is back (``catch_up: once``) or skipped."""

    max_concurrent: int = Field(1, ge=1, le=MAX_CONCURRENT_RUNS)
    overlap: Literal["skip", "queue"] = "skip"
    catch_up: Literal["once", "skip"] = "once"


class ScheduleSpec(ScheduleSettings, json_schema_extra={"oneOf": [{"required": ["job"]}, {"required": ["pipeline"]}]}):
    """``POST /schedules``: run ``job`` (a job submission, as ``POST /jobs`` takes) or ``pipeline`` (as ``POST
    /pipelines`` takes), exactly one, at the times ``cron`` (five fields, or @hourly/@daily/@weekly/@monthly/@yearly)
    gives in ``timezone`` (IANA, e.g. Europe/Berlin)."""

    name: str = Field(min_length=1, max_length=200)
    cron: str = Field(min_length=1, max_length=120)
    timezone: str = Field("UTC", min_length=1, max_length=64)
    job: JobSpec | None = None
    pipeline: PipelineSpec | None = None
    paused: bool = Field(False, strict=True)

    @model_validator(mode="after")
    def _one_template(self):
        if (self.job is None) == (self.pipeline is None):
            raise _error("schedule_template", "give exactly one of 'job' or 'pipeline'", field="job")
        return self

    @field_validator("job")
    @classmethod
    def _no_dependencies(cls, value):
        if value is not None and value.depends_on:
            raise _error("schedule_dependency", "a schedule's runs cannot depend on jobs (each would wait on the same)")
        return value

    @field_validator("name")
    @classmethod
    def _plain(cls, value):
        return _no_control(value)


class ScheduleUpdate(_When):
    """``PATCH /schedules/{id}``: pause or resume, or change when and how it runs (its job stays as it is)."""

    paused: bool | None = Field(None, strict=True)
    cron: str | None = Field(None, min_length=1, max_length=120)
    timezone: str | None = Field(None, min_length=1, max_length=64)
    max_concurrent: int | None = Field(None, ge=1, le=MAX_CONCURRENT_RUNS)
    overlap: Literal["skip", "queue"] | None = None
    catch_up: Literal["once", "skip"] | None = None


class Schedule(BaseModel):
    """A schedule as the API returns it; times are ISO 8601 UTC strings ("...Z")."""

    id: str
    owner: str
    name: str
    cron: str
    timezone: str
    state: Literal["active", "paused"]
    job: JobSpec | None = Field(description="What each run submits (or pipeline)")
    pipeline: PipelineSpec | None = Field(None, description="The pipeline each run submits (or job)")
    max_concurrent: int
    overlap: Literal["skip", "queue"]
    catch_up: Literal["once", "skip"]
    next_run_at: str | None = Field(description="When it runs next (null while paused)")
    last_run_at: str | None = Field(description="When its latest run was due")
    last_job_id: str | None
    last_pipeline_id: str | None = Field(None, description="The latest run's pipeline (a pipeline's schedule)")
    pending_run: bool = Field(description="A due run waits for one of the running ones to end (overlap: queue)")
    runs: int = Field(description="Runs started")
    skipped: int = Field(description="Due runs skipped: over max_concurrent, or missed while the service was down")
    last_error: str | None = Field(description="Why the latest due run did not start (the owner's queue was full)")
    created_at: str
    updated_at: str


class ScheduleList(BaseModel):
    schedules: list[Schedule]


class PoolResources(BaseModel):
    gpus: int
    cpus: float


class PoolStatus(BaseModel):
    name: str
    capacity: PoolResources
    used: PoolResources
    queued: int
    draining: bool = Field(False, description="An admin drains it: nothing new starts there, running jobs finish")


class PoolUpdate(_Body):
    """``PUT /pools/{name}`` (admins): drain a pool (nothing new starts there; running jobs finish), or undrain it."""

    draining: bool = Field(strict=True)


class QuotaLimits(BaseModel):
    """``None`` = no limit."""

    max_jobs: int | None
    max_gpus: int | None


class QuotaUsage(BaseModel):
    """Running and dispatching jobs."""

    jobs: int
    gpus: int


class QuotaStatus(BaseModel):
    limits: QuotaLimits
    usage: QuotaUsage


class CohortResource(BaseModel):
    """A group's quota of one resource in one pool of its cohort, and its use (running and dispatching jobs):
    ``borrowed`` is its use beyond ``nominal``; ``lent``, its share of what other groups borrow from its unused
    quota. Memory in bytes; a limit of None is no limit."""

    nominal: float
    borrowing_limit: float | None
    lending_limit: float | None
    used: float
    borrowed: float
    lent: float


class CohortStatus(BaseModel):
    """A cohort's groups: group -> pool -> resource (gpus, cpus, memory) -> its quota and use; and each group's
    fair share: its past use, decayed (``JobQueue.usage_half_life``), and its weight."""

    groups: dict[str, dict[str, dict[str, CohortResource]]]
    decayed_usage: dict[str, float] = Field(
        default_factory=dict, description="Group -> weighted resource-seconds, decayed; less goes first"
    )
    weights: dict[str, float] = Field(default_factory=dict, description="Group -> fair-share weight")


class Quota(QuotaStatus):
    """The owner's quota, that of each of the owner's groups that has one, and the cohorts of the owner's groups
    (every cohort, for admins) with what each of their groups uses, borrows and lends; ``cohort_group``: the group
    whose cohort quota the owner's jobs use unless they ask for another (``group``)."""

    groups: dict[str, QuotaStatus] = Field(default_factory=dict)
    cohorts: dict[str, CohortStatus] = Field(default_factory=dict)
    cohort_group: str | None = None
    decayed_usage: float = Field(
        0.0, description="The owner's past use, in weighted resource-seconds decayed with JobQueue.usage_half_life"
    )


Node = Annotated[str, Field(pattern=f"^{NODE_NAME.pattern}$", description="GPU node name")]
Purpose = Annotated[str, Field(PURPOSE, pattern=r"^[a-z0-9._-]{1,64}$", description="What the nonce is for")]


class NonceRequest(_Body):
    """Body of ``POST /attestation/nonce``."""

    node: Node
    purpose: Purpose


class AttestationNonce(BaseModel):
    """A single-use nonce (64 hex digits) for one (user, node, purpose); times are ISO 8601 UTC."""

    nonce: str
    expires_at: str


class VerifyRequest(_Body):
    """Body of ``POST /attestation/verify``: NRAS's detached EAT answering ``nonce``."""

    node: Node
    nonce: str = Field(min_length=1, max_length=128)
    purpose: Purpose
    token: str | list[Any] = Field(
        description='The detached EAT [["JWT", overall], {"GPU-0": jwt, ...}], as JSON or as its JSON text'
    )


class Evidence(_Body):
    """One device's evidence as NVIDIA's tools collect it (base64 SPDM report and certificate chain)."""

    evidence: str = Field(min_length=1, max_length=256 * 1024)
    certificate: str = Field(min_length=1, max_length=256 * 1024)


class EvidenceRequest(_Body):
    """Body of ``POST /attestation/evidence``: a node's evidence answering ``nonce``, relayed to NRAS."""

    node: Node
    nonce: str = Field(min_length=1, max_length=128)
    purpose: Purpose
    evidence_list: list[Evidence] = Field(min_length=1, max_length=16)
    device: Literal[DEVICES] = "gpu"
    arch: Literal[ARCHES] = "HOPPER"


class AttestationResult(BaseModel):
    """A verified attestation (refusals are errors whose code is the reason)."""

    verdict: Literal[True]
    reason: Literal["ok"]
    node: str
    fingerprint: str = Field(description="SHA-256 hex of the overall token")
    claims_version: str
    issuer: str
    kid: str
    jti: str
    issued_at: str
    expires_at: str
    devices: dict[str, AttestedDevice]


class AttestationNode(BaseModel):
    """A node's last attestation state; valid: it may run attestation-required jobs now."""

    node: str
    valid: bool
    problem: str | None = Field(description="Why the node is not valid")
    user: str | None = Field(description="Who made the last successful verification")
    verified_at: str | None
    expires_at: str | None
    fingerprint: str | None
    revoked: bool
    last_checked_at: str
    last_reason: str = Field(description='"ok" or the reason code of the last verification')
    devices: dict[str, AttestedDevice]
    nvidia_errors: dict[str, dict[str, Any]] | None = Field(
        None, description="NRAS's x-nvidia-error-details per device of its last failure verdict (until a success)"
    )


class AttestationNodeList(BaseModel):
    nodes: list[AttestationNode]
    max_age: float = Field(description="Seconds a verification stays valid for job gating")


class EnrolRequest(_Body):
    """Body of ``POST /attestation/enrolments``: the GPUs the node must present, by UEID or by count
    (the node's first attestation then pins their UEIDs)."""

    node: Node
    gpus: int | None = Field(None, ge=1, le=16, description="How many GPUs (UEIDs pinned on first attestation)")
    ueids: list[Annotated[str, Field(pattern=r"^[0-9]{1,80}$")]] | None = Field(
        None, min_length=1, max_length=16, description="The GPUs' UEIDs (decimal, as NRAS reports them)"
    )

    @model_validator(mode="after")
    def _one_of(self):
        if (self.gpus is None) == (self.ueids is None):
            raise _error("gpus_xor_ueids", "give exactly one of 'gpus' or 'ueids'", field="gpus")
        return self


class NodeEnrolment(BaseModel):
    """An enrolled node; ``ueids`` is null until a node enrolled by count first attests."""

    node: str
    gpus: int
    ueids: list[str] | None
    enrolled_at: str
    enrolled_by: str


class NewNodeEnrolment(NodeEnrolment):
    """The answer to an enrolment: the node's credential, shown this once (only its hash is kept)."""

    credential: str = Field(description="node:<name>:<secret>; the node sends 'Authorization: token <credential>'")


class NodeEnrolmentList(BaseModel):
    nodes: list[NodeEnrolment]


_EMAIL = re.compile(r"[^@\s]{1,64}@[^@\s]{1,255}\.[^@\s]{1,63}")
DEFAULT_NOTIFIED = [JobState.SUCCEEDED, JobState.FAILED, JobState.TIMED_OUT]


class NotificationPrefs(_Body):
    """``PUT /notifications``: which final states of your jobs you are told of, and where."""

    states: list[JobState] = Field(default_factory=lambda: list(DEFAULT_NOTIFIED), max_length=4)
    lab: bool = Field(True, strict=True, description="Tell every open JupyterLab of yours (GET /notifications/feed).")
    webhook_url: str | None = Field(None, max_length=2048)
    email: str | None = Field(None, max_length=320)

    @field_validator("states")
    @classmethod
    def _final(cls, value):
        if not set(value) <= set(TERMINAL_STATES):
            raise _error("final_states", "only final states are told: " + ", ".join(TERMINAL_STATES))
        return sorted(set(value))

    @field_validator("webhook_url")
    @classmethod
    def _url(cls, value):
        if value is not None and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", value):
            raise _error("url", "must be an http:// or https:// URL")
        return value

    @field_validator("email")
    @classmethod
    def _email(cls, value):
        if value is not None and not _EMAIL.fullmatch(value):
            raise _error("email", "must be an e-mail address")
        return value


class NotificationSettings(BaseModel):
    """A user's notification preferences as the API returns them."""

    states: list[JobState]
    lab: bool
    webhook_url: str | None
    email: str | None
    pending: int = Field(description="Notifications of yours not delivered yet")
    failed: int = Field(description="Notifications of yours given up on after Notifier.max_attempts")


class EndedJob(BaseModel):
    """What a notification says of the job that ended (the webhook's ``job``, a feed entry's ``job``)."""

    id: str
    name: str
    owner: str
    kind: str
    state: JobState
    state_reason: str
    exit_code: int | None
    created_at: str
    finished_at: str | None
    mlflow_run_id: str | None
    schedule_id: str | None
    output_notebook: str | None = Field(None, description="A notebook job's executed notebook (absolute path).")


class EndedPipeline(Pipeline):
    """What a notification says of a pipeline whose last step ended (the webhook's ``pipeline``, a feed entry's)."""

    finished_at: str


class FeedEntry(BaseModel):
    """One job, or pipeline, of yours that ended in a state you are told of (a pipeline's steps are told as the
    pipeline, once its last one has ended)."""

    id: int = Field(description="Increasing; pass the last one seen as ?after= to get only newer ones.")
    created_at: str
    job: EndedJob | None = None
    pipeline: EndedPipeline | None = None


class NotificationFeed(BaseModel):
    """``GET /notifications/feed``: what JupyterLab shows as notifications."""

    notifications: list[FeedEntry]
    cursor: int = Field(description="The id to pass as ?after= next time (the newest one there is, without ?after=).")
