"""Pipelines: a small DAG of steps submitted at once, each step an ordinary job that waits for the steps it needs
(``depends_on``, resolved by :mod:`.dependencies`).

- :class:`PipelineStore` holds the ``pipelines`` table's queries: a pipeline and all its steps' jobs are written in
  one transaction, so a refused pipeline leaves nothing queued and a crash leaves no half of one;
- :func:`pipeline_state` is the rule that makes one state of the steps' states.

The service keeps pipelines so that a schedule can run one (:mod:`.schedules`), a user can cancel one as a whole,
and JupyterLab can draw one without reading every job.
"""

import uuid

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from gpulab.job_states import TERMINAL_STATES
from gpulab.service.storage import utcnow

from . import dependencies
from .models import Dependency, EndedPipeline, Pipeline, PipelineSpec, PipelineStepStatus
from .store import JobRow, JobStore, PipelineRow, iso, new_job_row

MAX_LIST = 200


class PipelineNotFound(LookupError):
    """No pipeline with this id."""


def pipeline_state(steps: list[tuple[str | None, str | None]]) -> str:
    """The state of a pipeline whose steps are in these (state, reason): queued until a step starts, running until
    every step has ended, then failed if one failed or timed out, cancelled if one was cancelled other than by its
    conditions (a step whose ``needs`` cannot be met is skipped as written), else succeeded. A step whose job was
    deleted (state None) counts as ended."""
    states = [state for state, _ in steps]
    if all(state == "queued" for state in states):
        return "queued"
    if any(state is not None and state not in TERMINAL_STATES for state in states):
        return "running"
    if any(state in ("failed", "timed_out") for state in states):
        return "failed"
    if any(state == "cancelled" and not dependencies.unmet(reason or "") for state, reason in steps):
        return "cancelled"
    return "succeeded"


class PipelineStore:
    """The ``pipelines`` table, in the jobs database of ``store``."""

    def __init__(self, store: JobStore):
        self.store = store

    def create(
        self,
        owner: str,
        groups: list[str],
        admin: bool,
        spec: PipelineSpec,
        max_queued: int | None,
        schedule_id: str | None = None,
        idempotency_key: str | None = None,
    ) -> tuple[PipelineRow, bool]:
        """Queue every step of ``spec`` as a job of ``owner`` (each after those it needs), in one transaction;
        with ``idempotency_key`` an existing pipeline of the owner wins. Raises ``QueueFull`` when the steps would
        take the owner past ``max_queued``. Returns ``(row, created)``."""
        key = idempotency_key or spec.idempotency_key
        pipeline_id = uuid.uuid4().hex
        directory = f"{spec.directory.rstrip('/')}/{spec.name}-{pipeline_id[:8]}"
        try:
            with self.store.session() as session, session.begin():
                if key and (existing := session.scalar(self._key_query(owner, key))):
                    return existing, False
                self.store.check_room(session, owner, max_queued, len(spec.steps))
                job_ids: dict[str, str] = {}
                rows = []
                for step in spec.ordered():
                    job = step.job.model_copy(
                        update={
                            "env": {**step.job.env, "PIPELINE_DIR": directory},
                            "labels": {**step.job.labels, "gpulab.pipeline": pipeline_id, "gpulab.step": step.name},
                            "depends_on": [Dependency(job=job_ids[n], condition=step.condition) for n in step.needs],
                        }
                    )
                    rows.append(
                        new_job_row(owner, groups, job, admin, schedule_id=schedule_id, pipeline_id=pipeline_id)
                    )
                    job_ids[step.name] = rows[-1].id
                self.store.add_jobs(session, rows)
                pipeline = PipelineRow(
                    id=pipeline_id,
                    owner=owner,
                    name=spec.name,
                    directory=directory,
                    steps=[
                        {"name": s.name, "needs": s.needs, "condition": s.condition, "job_id": job_ids[s.name]}
                        for s in spec.steps
                    ],
                    schedule_id=schedule_id,
                    idempotency_key=key,
                    created_at=utcnow(),
                )
                session.add(pipeline)
        except IntegrityError:
            if key and (existing := self._by_key(owner, key)):
                return existing, False  # a concurrent submission with the same key won
            raise
        return pipeline, True

    @staticmethod
    def _key_query(owner: str, key: str):
        return select(PipelineRow).where(PipelineRow.owner == owner, PipelineRow.idempotency_key == key)

    def _by_key(self, owner: str, key: str) -> PipelineRow | None:
        with self.store.session() as session:
            return session.scalar(self._key_query(owner, key))

    def get(self, pipeline_id: str) -> PipelineRow:
        with self.store.session() as session:
            row = session.get(PipelineRow, pipeline_id)
        if row is None:
            raise PipelineNotFound(pipeline_id)
        return row

    def listed(self, owner: str | None, schedule_id: str | None = None, limit: int = 50) -> list[PipelineRow]:
        """The newest ``limit`` pipelines of ``owner`` (everyone's for None), of one schedule if given."""
        query = select(PipelineRow).order_by(PipelineRow.created_at.desc(), PipelineRow.id.desc()).limit(limit)
        if owner is not None:
            query = query.where(PipelineRow.owner == owner)
        if schedule_id is not None:
            query = query.where(PipelineRow.schedule_id == schedule_id)
        with self.store.session() as session:
            return list(session.scalars(query))

    def models(self, rows: list[PipelineRow]) -> list[Pipeline]:
        """The API views of ``rows``, their steps' jobs read in one query."""
        ids = [step["job_id"] for row in rows for step in row.steps]
        if not ids:
            return []
        query = select(JobRow.id, JobRow.state, JobRow.state_reason).where(JobRow.id.in_(ids))
        with self.store.session() as session:
            jobs = {job.id: (job.state, job.state_reason) for job in session.execute(query)}
        return [pipeline_model(row, jobs) for row in rows]


def pipeline_model(row: PipelineRow, jobs: dict[str, tuple[str, str]]) -> Pipeline:
    """The API view of ``row``, given its steps' jobs' (state, reason) by id (a deleted job's is absent)."""
    steps = []
    for step in row.steps:
        state, reason = jobs.get(step["job_id"], (None, None))
        steps.append(PipelineStepStatus(**step, state=state, state_reason=reason))
    return Pipeline(
        id=row.id,
        owner=row.owner,
        name=row.name,
        state=pipeline_state([(s.state, s.state_reason) for s in steps]),
        directory=row.directory,
        schedule_id=row.schedule_id,
        steps=steps,
        created_at=iso(row.created_at),
    )


def ended(session: Session, pipeline_id: str) -> EndedPipeline | None:
    """In the transaction that ends one of its steps: the pipeline, if that was the last of its steps to end, else
    None. Its row is locked first, so that of two steps ending at once exactly one is the last."""
    row = session.get(PipelineRow, pipeline_id, with_for_update=True)
    if row is None:
        return None
    query = select(JobRow.id, JobRow.state, JobRow.state_reason).where(JobRow.pipeline_id == pipeline_id)
    jobs = {job.id: (job.state, job.state_reason) for job in session.execute(query)}
    if any(state not in TERMINAL_STATES for state, _ in jobs.values()):
        return None
    return EndedPipeline(**pipeline_model(row, jobs).model_dump(), finished_at=iso(utcnow()))
