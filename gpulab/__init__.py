"""gpulab: a Jupyter-centric platform for GPU machine learning.

In a notebook: ``%load_ext gpulab``, then ``%%train``, ``%jobs``, or ``gpulab.submit(...)``.
In a job: ``gpulab.progress(step, total, **metrics)``, ``gpulab.checkpoint_dir()``.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("gpulab")  # labextension/package.json's, the one place the version is written
except PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0+unknown"


def progress(step: int, total: int | None = None, **metrics) -> None:
    """Report a running job's progress and metrics (to the job service, MLflow and W&B)."""
    from .reporting import progress as report

    report(step, total, **metrics)


def checkpoint_dir():
    """The directory to keep a job's checkpoints in, kept across its attempts (``GPULAB_CHECKPOINT_DIR``), made if
    need be; outside a job, ``./checkpoints``. A preempted attempt gets SIGTERM and ``JobQueue.preemption_grace``
    seconds to write one; the next sees ``GPULAB_PREEMPTED=1`` and ``GPULAB_RESTART_COUNT``, and resumes from it."""
    import os
    from pathlib import Path

    path = Path(os.environ.get("GPULAB_CHECKPOINT_DIR") or "checkpoints")
    path.mkdir(parents=True, exist_ok=True)
    return path


def sweep(parameters: dict, source: str | None = None, entrypoint: list[str] | None = None, **fields):
    """Submit a hyperparameter sweep: ``sweep({"lr": [0.1, 0.01], "depth": {"low": 2, "high": 8, "int": True,
    "count": 4}}, entrypoint=["python", "train.py"])``, a job per trial (``strategy="random"``, ``trials=N`` for
    a random search); returns a :class:`~gpulab.kernels.sweeps.Sweep` (``.best("loss")``, ``.cancel()``)."""
    from .kernels.sweeps import sweep as _sweep

    return _sweep(parameters, source, entrypoint, **fields)


def trial_params() -> dict:
    """In a sweep's trial: its parameters (``{}`` outside one)."""
    from .kernels.sweeps import trial_params as _params

    return _params()


def submit(source: str | None = None, entrypoint: list[str] | None = None, **fields):
    """Submit a job (cell ``source`` or an ``entrypoint`` argv); returns a :class:`Job` handle."""
    from .kernels.client import submit as _submit

    return _submit(source, entrypoint, **fields)


def submit_notebook(path, parameters: dict | None = None, **fields):
    """Run the notebook at ``path`` as a job with papermill ``parameters``; returns a :class:`Job` handle whose
    ``output_notebook`` is where the executed notebook goes (``kernel=``, ``output=``, ``html=True``,
    ``files=["data.csv", "utils.py"]`` or ``files="."`` to copy those of its folder with it, and the fields of
    :func:`submit`)."""
    from .kernels.client import submit_notebook as _submit_notebook

    return _submit_notebook(path, parameters, **fields)


def jobs(state: str | None = None, all: bool = False, limit: int = 50):
    """Your jobs (every user's with ``all=True`` for admins), newest first."""
    from .kernels.client import jobs as _jobs

    return _jobs(state=state, all=all, limit=limit)


def job(job_id: str):
    """The job with this id (or unique id prefix)."""
    from .kernels.client import job as _job

    return _job(job_id)


def schedule(cron: str, source: str | None = None, entrypoint: list[str] | None = None, **fields):
    """Run a job at the times of ``cron`` (in ``timezone=``, default UTC): ``source``, ``entrypoint``,
    ``notebook=`` with ``parameters=``, or a ``pipeline=`` (a YAML file's path or its dict); kept and run by the job
    service whether or not your server is up.
    Returns a :class:`~gpulab.kernels.schedules.Schedule` (``pause()``, ``resume()``, ``run_now()``, ``runs()``)."""
    from .kernels.schedules import schedule as _schedule

    return _schedule(cron, source, entrypoint, **fields)


def schedules(all: bool = False):
    """Your schedules (every user's with ``all=True`` for admins), newest first."""
    from .kernels.schedules import schedules as _schedules

    return _schedules(all=all)


def pipeline(pipeline, folder=None):
    """Submit a pipeline (a dict of ``name`` and ``steps``, or a YAML file's path): every step a job that waits for
    the steps it ``needs``; returns a :class:`~gpulab.kernels.pipelines.Pipeline` (``status()``, ``wait()``,
    ``cancel()``)."""
    from .kernels.pipelines import submit_pipeline

    return submit_pipeline(pipeline, folder)


def deploy(source: str, name: str, backend: str | None = None):
    """Deploy an MLflow model (``runs:/<id>/model``, ``models:/<name>/<version>`` or a run id) to Triton."""
    from .kernels.inference import deploy as _deploy

    return _deploy(source, name, backend)


def models():
    """The deployed models: versions, readiness, inputs and outputs."""
    from .kernels.inference import models as _models

    return _models()


def infer(model, inputs, outputs: list[str] | None = None, version: int | None = None):
    """Call a deployed model over gRPC through the platform's gateway; returns {output name: array}."""
    from .kernels.inference import infer as _infer

    return _infer(model, inputs, outputs, version)


def triton_client(aio: bool = False):
    """A stock ``tritonclient.grpc`` client for the gateway that sends your token on every call."""
    from .kernels.inference import triton_client as _client

    return _client(aio)


def rest_client():
    """A stock ``tritonclient.http`` client for the gateway's KServe v2 REST port that sends your token on every
    call."""
    from .kernels.inference import rest_client as _client

    return _client()


def load_ipython_extension(ipython) -> None:
    """``%load_ext gpulab``: %train, %jobs, %job, %logs, %cancel, %preprocess, %deploy, %infer."""
    from .kernels import load_ipython_extension as load

    load(ipython)
