"""What an attempt of a job starts with: its directories, argv and environment (docs/jobs.md "Job
environment"), and the one-time ticket with which an attempt started without its secrets (Ray) claims them.

:class:`Attempts` is the attempt launcher of a :class:`~.queue.JobQueue`, whose settings (``c.JobQueue.data_dir``,
``inherit_env``, ``wandb_env``, ``mlflow_tracking_uri``, ``mlflow_job_token``, ``jobs_api_url``,
``wrap_with_runner``) it reads; the queue decides when an attempt starts, this module what it starts with.
"""

import asyncio
import hashlib
import hmac
import json
import os
import sys
from pathlib import Path

from gpulab import tracing
from gpulab.attestation import NodeState
from gpulab.notebook_job import ENV_VAR as NOTEBOOK_ENV
from gpulab.secrets import JOB_SECRET_ENV, persistent_secret

from .executors.base import Launch
from .models import JobSpec, NotebookSpec
from .store import JobRow


class Attempts:
    def __init__(self, settings):
        self.settings = settings  # the JobQueue: its settings may change after this is made (tests do)
        self._claim_key: bytes | None = None  # read on first use (:meth:`ticket`)

    def job_dir(self, row: JobRow) -> Path:
        """The service's directory of a job: its logs, handle and source (the job cannot write here)."""
        return Path(self.settings.data_dir) / "jobs" / row.owner / row.id

    def work_dir(self, row: JobRow) -> Path:
        """The job's own directory (``GPULAB_JOB_DIR``, its default working dir), owned by the job's account."""
        return self.job_dir(row) / "work"

    def log_path(self, row: JobRow, attempt: int | None = None) -> Path:
        return self.job_dir(row) / f"attempt-{attempt or row.attempt}.log"

    async def launch(
        self, row: JobRow, attempt: int, token: str | None, gpu_ids: list[int], attested: NodeState | None
    ) -> Launch:
        """Attempt ``attempt`` of ``row`` as the executor starts it, its directories made (and a cell's source
        written). ``token``: the attempt's job token, or None for an executor whose environments others can
        read (the runner then claims the secrets with the ticket in ``GPULAB_CREDENTIALS_TICKET``); the current
        span becomes the attempt's ``TRACEPARENT``."""
        spec = JobSpec.model_validate(row.spec)
        job_dir, work_dir = self.job_dir(row), self.work_dir(row)
        await asyncio.to_thread(_make_job_dirs, job_dir, work_dir)
        argv, source = spec.entrypoint, None
        if spec.source is not None:
            source = job_dir / "source.py"
            await asyncio.to_thread(source.write_text, spec.source)
            argv = [sys.executable, str(source)]
        elif spec.notebook is not None:  # the snapshot is handed to the job's account as a cell's source is
            source = job_dir / "notebook.ipynb"
            await asyncio.to_thread(source.write_text, json.dumps(spec.notebook.content))
            argv = [sys.executable, "-m", "gpulab.notebook_job", str(source)]
        if self.settings.wrap_with_runner:
            argv = [sys.executable, "-m", "gpulab.runner", "--", *argv]
        env = self.env(row, spec)
        if token:
            env.update(self.token_env(row, token))
        else:
            env = {name: value for name, value in env.items() if name not in JOB_SECRET_ENV}
            env["GPULAB_CREDENTIALS_TICKET"] = self.ticket(row.id, attempt)
        env.update(GPULAB_JOB_ATTEMPT=str(attempt), GPULAB_WORKING_DIR=spec.working_dir or str(work_dir))
        if attested:
            env["GPULAB_ATTESTATION_FINGERPRINT"] = attested.fingerprint
        if traceparent := tracing.inject({}).get("traceparent"):
            env["TRACEPARENT"] = traceparent
        return Launch(
            job_id=row.id,
            attempt=attempt,
            owner=row.owner,
            argv=argv,
            working_dir=spec.working_dir or str(work_dir),
            work_dir=work_dir,
            source=source,
            env=env,
            gpus=row.gpus,
            cpus=row.cpus,
            memory=row.memory,
            pool=row.pool,
            log_path=self.log_path(row),
            gpu_ids=gpu_ids,
        )

    def env(self, row: JobRow, spec: JobSpec) -> dict[str, str]:
        """The attempt's environment but for its token (:meth:`token_env`); the executor adds GPU ids. Secrets
        may come from any source here (inherited, W&B, the spec)."""
        settings = self.settings
        env = {name: os.environ[name] for name in settings.inherit_env if name in os.environ}
        env.update({"PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", **settings.wandb_env, **spec.env})
        env.update(
            WANDB_DIR=str(self.work_dir(row)),  # W&B writes <WANDB_DIR>/wandb/
            MLFLOW_EXPERIMENT_NAME=spec.tracking.experiment or row.name,
            GPULAB_JOB_ID=row.id,
            GPULAB_JOB_NAME=row.name,
            GPULAB_JOB_OWNER=row.owner,
            GPULAB_JOB_DIR=str(self.work_dir(row)),
            GPULAB_CHECKPOINT_DIR=str(self.work_dir(row) / "checkpoints"),  # kept across attempts
            GPULAB_RESTART_COUNT=str(max(row.attempt - 1, 0)),  # attempts before this one
            GPULAB_PREEMPTED="1" if row.preempted else "0",  # the attempt before this one was preempted
        )
        if row.array_id and spec.array:  # as Slurm's SLURM_ARRAY_JOB_ID / _TASK_ID / _TASK_COUNT
            env.update(
                GPULAB_ARRAY_ID=row.array_id,
                GPULAB_ARRAY_INDEX=str(row.array_index),
                GPULAB_ARRAY_COUNT=str(spec.array.count),
            )
            if spec.sweep is not None:  # gpulab.trial_params()
                env["GPULAB_TRIAL_PARAMS"] = json.dumps(spec.sweep.expand()[row.array_index])
        if spec.tracking.wandb_project:
            env["WANDB_PROJECT"] = spec.tracking.wandb_project
        if spec.notebook is not None:
            env[NOTEBOOK_ENV] = json.dumps(
                {**notebook_settings(spec.notebook), "output": spec.notebook.output_for(row.id)}
            )
        if settings.mlflow_tracking_uri:
            env["MLFLOW_TRACKING_URI"] = settings.mlflow_tracking_uri
        if settings.jobs_api_url:
            env["GPULAB_JOBS_URL"] = settings.jobs_api_url
        return env

    def token_env(self, row: JobRow, token: str) -> dict[str, str]:
        """The attempt's own token, for the job API and (as ``job:<id>:<token>``) for MLflow."""
        env = {"GPULAB_JOB_TOKEN": token}
        if self.settings.mlflow_tracking_uri and self.settings.mlflow_job_token:
            env["MLFLOW_TRACKING_TOKEN"] = f"job:{row.id}:{token}"
        return env

    def ticket(self, job_id: str, attempt: int) -> str:
        """The attempt's one-time credentials ticket: an HMAC under a key of this service's data, so that it
        holds across restarts without being stored."""
        if self._claim_key is None:
            self._claim_key = persistent_secret(Path(self.settings.data_dir) / "jobs" / ".claim-key").encode()
        return hmac.new(self._claim_key, f"{job_id}:{attempt}".encode(), hashlib.sha256).hexdigest()


def _make_job_dirs(job_dir: Path, work_dir: Path) -> None:
    """``jobs/<owner>/<id>/`` for the service (others may pass, not list) and its ``work/`` for the job."""
    for d in (job_dir.parent, job_dir):
        d.mkdir(parents=True, exist_ok=True)
        d.chmod(0o711)  # explicitly: gpulab up's umask is 077
    work_dir.mkdir(exist_ok=True, mode=0o700)


def notebook_settings(notebook: NotebookSpec) -> dict:
    """What :mod:`gpulab.notebook_job` runs with, but the content (its program file)."""
    return notebook.model_dump(include={"path", "parameters", "kernel", "formats"})
