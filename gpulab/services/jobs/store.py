"""Persistent job state: the ``jobs``, ``job_events``, ``schedules`` and ``pipelines`` tables (SQLite WAL or PostgreSQL).

The schema is managed by alembic (``migrations/``); :class:`JobStore` upgrades it on start.
Times are naive UTC (:func:`gpulab.events.utcnow`). Every state change goes through
:meth:`JobStore.transition`, which writes the ``job_events`` row in the same transaction.
"""

import base64
import hashlib
import hmac
import json
import uuid
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

from sqlalchemy import (
    JSON,
    BigInteger,
    Float,
    ForeignKey,
    Index,
    String,
    Text,
    UniqueConstraint,
    and_,
    case,
    cast,
    false,
    func,
    not_,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Row, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.sql import ColumnElement
from traitlets import Unicode
from traitlets.config import LoggingConfigurable

from gpulab.events import subscriber as applied_events
from gpulab.job_states import ACTIVE_STATES, TERMINAL_STATES, TRANSITIONS
from gpulab.service.storage import DatabaseThread, Schema, make_engine, utcnow

from .executors.base import PoolCapacity
from .fair_share import decayed
from .models import ArrayMember, Job, JobEvent, JobSpec, JobUpdate, NotebookSpec, Progress, Resources
from .policy import CPU_SLACK, Ledger, Limits, Usage

MIGRATIONS = Path(__file__).with_name("migrations")
VERSION_TABLE = "gpulab_jobs_alembic_version"


class JobNotFound(LookupError):
    """No job with this id."""


class JobStateError(ValueError):
    """The job's state does not allow this (illegal transition, deleting an unfinished job)."""


class QueueFull(Exception):
    """The owner has as many queued jobs as they may (``JobQueue.max_queued``)."""


class BadDependency(ValueError):
    """A job the submission depends on is not one of the owner's: ``field`` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class Base(DeclarativeBase):
    """Declarative base of the job tables."""


class JobRow(Base):
    """One job (see docs/jobs.md); ``spec`` is the JSON of its :class:`JobSpec`."""

    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("owner", "idempotency_key", name="uq_jobs_owner_idempotency_key"),
        Index("ix_jobs_owner_created", "owner", "created_at"),
        Index("ix_jobs_state", "state"),
        Index("ix_jobs_created", "created_at", "id"),
        Index("ix_jobs_schedule_state", "schedule_id", "state"),
        Index("ix_jobs_pipeline", "pipeline_id"),
        Index("ix_jobs_array", "array_id", "array_index"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner: Mapped[str] = mapped_column(String(255))
    groups: Mapped[list] = mapped_column(JSON)  # the owner's groups at submission (group quotas)
    name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(16))
    spec: Mapped[dict] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(16))
    state_reason: Mapped[str] = mapped_column(Text)
    priority: Mapped[int]
    pool: Mapped[str] = mapped_column(String(64))
    gpus: Mapped[int]
    cpus: Mapped[float] = mapped_column(Float)
    memory: Mapped[int | None] = mapped_column(BigInteger)
    attempt: Mapped[int]
    max_retries: Mapped[int]
    not_before: Mapped[datetime | None]
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    labels: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    started_at: Mapped[datetime | None]  # start of the latest attempt
    finished_at: Mapped[datetime | None]
    exit_code: Mapped[int | None]
    executor: Mapped[str | None] = mapped_column(String(32))
    handle: Mapped[dict | None] = mapped_column(JSON)  # the latest attempt's executors.base.Handle
    heartbeat_at: Mapped[datetime | None]
    progress: Mapped[dict | None] = mapped_column(JSON)
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64))
    wandb_run_path: Mapped[str | None] = mapped_column(String(255))
    traceparent: Mapped[str | None] = mapped_column(String(64))
    attestation_fingerprint: Mapped[str | None] = mapped_column(String(128))  # of the latest dispatch
    attestation_node: Mapped[str | None] = mapped_column(String(255))
    job_token_hash: Mapped[str | None] = mapped_column(String(64))  # sha256 hex; set while active
    attestation_required: Mapped[bool] = mapped_column(default=False)  # spec["attestation"] == "required"
    # the priority among all users' jobs: the spec's when an admin submitted it, else 0 (ordinary users'
    # priorities order only their own jobs, so fair share cannot be bought with priority 100)
    global_priority: Mapped[int] = mapped_column(default=0)
    schedule_id: Mapped[str | None] = mapped_column(String(32))  # the schedule whose run it is (it may be gone)
    held_by: Mapped[str | None] = mapped_column(String(32))  # the dependency a queued job waits for (.dependencies)
    pipeline_id: Mapped[str | None] = mapped_column(String(32))  # the pipeline whose step it is
    array_id: Mapped[str | None] = mapped_column(String(32))  # the job array it is one of (spec["array"])
    array_index: Mapped[int | None]
    array_max: Mapped[int | None]  # the array's max_concurrent, for the scheduling pass
    on_hold: Mapped[bool] = mapped_column(default=False)  # held by its owner or an admin: no candidate
    asked_group: Mapped[str | None] = mapped_column(String(255))  # spec["group"]: whose cohort quota it uses
    preemptible: Mapped[bool] = mapped_column(default=False)  # spec["preemptible"]
    preemptions: Mapped[int] = mapped_column(default=0)  # attempts stopped by preemption (no retry used)
    preempted: Mapped[bool] = mapped_column(default=False)  # its latest ended attempt was preempted
    max_runtime: Mapped[int | None]  # spec["max_runtime"] (s), for backfill

    @property
    def output_notebook(self) -> str | None:
        """Where a notebook job's executed notebook goes (:meth:`.NotebookSpec.output_for`)."""
        notebook = (self.spec or {}).get("notebook")
        return NotebookSpec.model_construct(**notebook).output_for(self.id) if notebook else None

    def to_model(self, log_size: int = 0) -> Job:
        """The API view of this row."""
        progress = self.progress or {}
        step, total = progress.get("step"), progress.get("total")
        spec = JobSpec.model_validate(self.spec)
        return Job(
            id=self.id,
            owner=self.owner,
            name=self.name,
            kind=self.kind,
            state=self.state,
            state_reason=self.state_reason,
            spec=spec,
            priority=self.priority,
            pool=self.pool,
            resources=Resources(gpus=self.gpus, cpus=self.cpus, memory=self.memory, pool=self.pool),
            attempt=self.attempt,
            max_retries=self.max_retries,
            created_at=iso(self.created_at),
            updated_at=iso(self.updated_at),
            started_at=iso(self.started_at),
            finished_at=iso(self.finished_at),
            exit_code=self.exit_code,
            progress=Progress(
                step=step,
                total=total,
                fraction=step / total if step is not None and total else None,
                metrics=progress.get("metrics") or {},
            ),
            mlflow_run_id=self.mlflow_run_id,
            wandb_run_path=self.wandb_run_path,
            labels=self.labels,
            log_size=log_size,
            attestation_fingerprint=self.attestation_fingerprint,
            attestation_node=self.attestation_node,
            output_notebook=self.output_notebook,
            schedule_id=self.schedule_id,
            pipeline_id=self.pipeline_id,
            array=ArrayMember(
                id=self.array_id,
                index=self.array_index,
                count=spec.array.count,
                max_concurrent=self.array_max,
                params=spec.sweep.expand()[self.array_index] if spec.sweep else None,
            )
            if self.array_id and spec.array
            else None,
            held=bool(self.on_hold),
            preemptions=self.preemptions or 0,
        )


class ScheduleRow(Base):
    """A schedule: a job template run at the times of a cron expression (see :mod:`.schedules`)."""

    __tablename__ = "schedules"
    __table_args__ = (Index("ix_schedules_due", "state", "next_run_at"), Index("ix_schedules_owner", "owner"))

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner: Mapped[str] = mapped_column(String(255))
    groups: Mapped[list] = mapped_column(JSON)  # the owner's groups and admin-ness when it was made, for its runs
    admin: Mapped[bool] = mapped_column(default=False)
    name: Mapped[str] = mapped_column(String(200))
    cron: Mapped[str] = mapped_column(String(120))
    timezone: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))  # active | paused
    job: Mapped[dict | None] = mapped_column(JSON)  # the JobSpec of each run, or
    pipeline: Mapped[dict | None] = mapped_column(JSON)  # the PipelineSpec of each run
    max_concurrent: Mapped[int]
    overlap: Mapped[str] = mapped_column(String(8))
    catch_up: Mapped[str] = mapped_column(String(8))
    next_run_at: Mapped[datetime | None]
    last_run_at: Mapped[datetime | None]
    last_job_id: Mapped[str | None] = mapped_column(String(32))
    last_pipeline_id: Mapped[str | None] = mapped_column(String(32))
    pending_run: Mapped[bool] = mapped_column(default=False)
    runs: Mapped[int] = mapped_column(default=0)
    skipped: Mapped[int] = mapped_column(default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class PipelineRow(Base):
    """A pipeline run (see :mod:`.pipelines`): its steps, each with the job that runs it (``jobs.pipeline_id``)."""

    __tablename__ = "pipelines"
    __table_args__ = (
        UniqueConstraint("owner", "idempotency_key", name="uq_pipelines_owner_idempotency_key"),
        Index("ix_pipelines_owner_created", "owner", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner: Mapped[str] = mapped_column(String(255))
    name: Mapped[str] = mapped_column(String(200))
    directory: Mapped[str] = mapped_column(Text)  # the run's own, $PIPELINE_DIR
    steps: Mapped[list] = mapped_column(JSON)  # [{name, needs, condition, job_id}] in the order submitted
    schedule_id: Mapped[str | None] = mapped_column(String(32))
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime]


class PoolSettingRow(Base):
    """What an admin set of a pool the executor offers: ``draining``, nothing new starts there."""

    __tablename__ = "pool_settings"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    draining: Mapped[bool] = mapped_column(default=False)
    updated_by: Mapped[str] = mapped_column(String(255))
    updated_at: Mapped[datetime]


class FairShareRow(Base):
    """A user's or cohort group's use of the cluster (``user:<name>``, ``group:<name>``), in weighted
    resource-seconds as of ``updated_at``, decayed when read (:mod:`.fair_share`)."""

    __tablename__ = "fair_share_usage"

    key: Mapped[str] = mapped_column(String(300), primary_key=True)
    value: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[datetime]


class NotificationPrefsRow(Base):
    """What a user is told when one of their jobs ends (see :mod:`.notifications`)."""

    __tablename__ = "notification_prefs"

    owner: Mapped[str] = mapped_column(String(255), primary_key=True)
    states: Mapped[list] = mapped_column(JSON)  # the final states told
    lab: Mapped[bool] = mapped_column(default=True)  # shown in the owner's JupyterLab (the feed)
    webhook_url: Mapped[str | None] = mapped_column(String(2048))
    email: Mapped[str | None] = mapped_column(String(320))
    updated_at: Mapped[datetime]


class NotificationRow(Base):
    """One notification to deliver (an outbox row, written with the job's final transition)."""

    __tablename__ = "notifications"
    __table_args__ = (
        Index("ix_notifications_due", "delivered_at", "next_attempt_at"),
        Index("ix_notifications_feed", "owner", "channel", "id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    owner: Mapped[str] = mapped_column(String(255))
    job_id: Mapped[str] = mapped_column(String(32))
    channel: Mapped[str] = mapped_column(String(16))  # webhook | email | lab (read from the feed)
    target: Mapped[str] = mapped_column(String(2048))
    payload: Mapped[dict] = mapped_column(JSON)
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[datetime]
    delivered_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime]


class JobEventRow(Base):
    """One state transition of a job."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime]
    from_state: Mapped[str | None] = mapped_column(String(16))
    to_state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text)


def iso(dt: datetime | None) -> str | None:
    """Naive UTC -> ISO 8601 with "Z"."""
    return None if dt is None else dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _encode_cursor(row: JobRow) -> str:
    return base64.urlsafe_b64encode(json.dumps([row.created_at.isoformat(), row.id]).encode()).decode()


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        created, job_id = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        return datetime.fromisoformat(created), str(job_id)
    except (ValueError, TypeError) as e:
        raise ValueError("invalid cursor") from e


SCHEDULING_COLUMNS = (
    JobRow.id,
    JobRow.owner,
    JobRow.groups,
    JobRow.priority,
    JobRow.pool,
    JobRow.gpus,
    JobRow.cpus,
    JobRow.memory,
    JobRow.created_at,
    JobRow.attempt,
    JobRow.attestation_required,
    JobRow.global_priority,
    JobRow.array_id,
    JobRow.array_max,
    JobRow.asked_group,
    JobRow.max_runtime,
)
"""What the scheduler reads of a queued job (no spec, labels or other JSON but the owner's groups)."""

REASON_COLUMNS = (
    JobRow.owner,
    cast(JobRow.groups, Text),
    JobRow.pool,
    JobRow.gpus,
    JobRow.cpus,
    JobRow.memory,
    JobRow.attestation_required,
    JobRow.array_id,
    JobRow.array_max,
    JobRow.asked_group,
    JobRow.max_runtime,
)
"""What a queued job's waiting reason depends on (``groups`` as JSON text, comparable in SQL)."""


def _fits(capacity: dict[str, PoolCapacity], ledger: Ledger) -> ColumnElement:
    """A job fits its pool's free capacity (a pool offered and not draining), as SQL."""
    fits = []
    for name, cap in capacity.items():
        if cap.draining:
            continue
        used = ledger.pools[name]
        cond = [
            JobRow.pool == name,
            JobRow.gpus <= cap.gpus - used.gpus,
            JobRow.cpus <= cap.cpus - used.cpus + CPU_SLACK,
        ]
        if cap.memory is not None:
            cond.append(func.coalesce(JobRow.memory, 0) <= cap.memory - used.memory)
        fits.append(and_(*cond))
    return or_(false(), *fits)


def _due() -> list[ColumnElement]:
    """Conditions of a queued job whose retry backoff has passed and that waits for no other job."""
    return [
        JobRow.state == "queued",
        JobRow.held_by.is_(None),
        JobRow.on_hold.is_(False),
        or_(JobRow.not_before.is_(None), JobRow.not_before <= utcnow()),
    ]


# the jobs database: jobs, their events, schedules, and the user events the service has applied
SCHEMA = Schema((Base.metadata, applied_events.Base.metadata), MIGRATIONS, VERSION_TABLE)
upgrade = SCHEMA.upgrade


def new_job_row(owner: str, groups: list[str], spec: JobSpec, admin: bool = False, **fields: Any) -> JobRow:
    """A queued job of ``owner`` for ``spec``, not yet added (``fields``: traceparent, schedule_id, pipeline_id,
    id)."""
    now = utcnow()
    row = JobRow(
        id=uuid.uuid4().hex,
        owner=owner,
        groups=sorted(set(groups)),
        name=spec.name,
        kind=spec.kind,
        spec=spec.model_dump(mode="json"),
        state="queued",
        state_reason=spec.depends_on[0].waiting_reason() if spec.depends_on else "submitted",
        priority=spec.priority,
        pool=spec.resources.pool,
        gpus=spec.resources.gpus,
        cpus=spec.resources.cpus,
        memory=spec.resources.memory,
        attempt=0,
        max_retries=spec.retries,
        idempotency_key=spec.idempotency_key,
        labels=spec.labels,
        attestation_required=spec.attestation == "required",
        global_priority=spec.priority if admin else 0,
        created_at=now,
        updated_at=now,
        held_by=spec.depends_on[0].job if spec.depends_on else None,
        asked_group=spec.group,
        preemptible=spec.preemptible,
        max_runtime=spec.max_runtime,
    )
    for name, value in fields.items():
        setattr(row, name, value)
    return row


class JobStore(LoggingConfigurable):
    """Jobs and their events in SQL; short transactions, detached rows returned."""

    url = Unicode(
        help="SQLAlchemy URL of the jobs database (default sqlite:///<data_dir>/jobs/jobs.sqlite).",
    ).tag(config=True)

    def __init__(self, **kwargs):
        """Connect (creating a SQLite file's directory) and run the migrations."""
        super().__init__(**kwargs)
        if not self.url:
            raise ValueError("JobStore.url (the jobs database URL) must be set")
        url = make_url(self.url)
        if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        self.engine = make_engine(self.url)
        upgrade(self.engine)
        self.db = DatabaseThread("gpulab-jobs-db")  # what the event loop's callers run these methods on
        # called with (session, job row) in the transaction that ends a job (the notifier's outbox)
        self.finished_hooks: list[Callable[[Session, JobRow], None]] = []

    def session(self) -> Session:
        """A session on the jobs database (rows stay readable after commit): for the store and the parts of the
        service that keep their own tables in it (schedules, dependencies, notifications)."""
        return Session(self.engine, expire_on_commit=False)

    def create_job(
        self,
        owner: str,
        groups: list[str],
        spec: JobSpec,
        traceparent: str | None = None,
        max_queued: int | None = None,
        admin: bool = False,
        schedule_id: str | None = None,
    ) -> tuple[JobRow, bool]:
        """Insert a queued job; with ``spec.idempotency_key`` an existing job of the owner wins. With
        ``max_queued``, raises ``QueueFull`` when the owner has that many queued jobs (a cap against runaway
        loops, not a quota: concurrent submissions may pass it by a few). ``admin``: the submitter is an admin,
        whose ``priority`` also orders the job among other users' jobs. ``schedule_id``: the schedule whose run
        it is.

        A job array (``spec.array``) is its ``count`` jobs, added at once (or none) with their ``array_id`` and
        ``array_index``; the first is returned, and carries the idempotency key.

        Returns ``(row, created)``.
        """
        row = new_job_row(owner, groups, spec, admin=admin, traceparent=traceparent, schedule_id=schedule_id)
        rows = [row]
        if spec.array:
            row.array_id, row.array_index, row.array_max = uuid.uuid4().hex, 0, spec.array.max_concurrent
            for index in range(1, spec.array.count):
                rows.append(
                    new_job_row(
                        owner,
                        groups,
                        spec,
                        admin=admin,
                        traceparent=traceparent,
                        schedule_id=schedule_id,
                        idempotency_key=None,
                        array_id=row.array_id,
                        array_index=index,
                        array_max=row.array_max,
                    )
                )
        try:  # one transaction, on one connection: a submission costs the fewest round trips to the database
            with self.session() as session, session.begin():
                if spec.idempotency_key and (existing := session.scalar(self._key_query(owner, spec.idempotency_key))):
                    return existing, False
                if spec.depends_on:
                    self._check_dependencies(session, owner, spec)
                self.check_room(session, owner, max_queued, len(rows))
                self.add_jobs(session, rows)
        except IntegrityError:
            if spec.idempotency_key and (existing := self._by_key(owner, spec.idempotency_key)):
                return existing, False  # a concurrent submission with the same key won
            raise
        return row, True

    def check_room(self, session: Session, owner: str, max_queued: int | None, adding: int) -> None:
        """Raise ``QueueFull`` when ``adding`` more queued jobs would take ``owner`` past ``max_queued``."""
        if max_queued is not None and session.scalar(self._queued_query(owner)) + adding > max_queued:
            raise QueueFull(
                f"{owner} has {max_queued} queued jobs, the most one may have (JobQueue.max_queued): "
                "wait for some to start, or cancel some"
            )

    @staticmethod
    def add_jobs(session: Session, rows: list[JobRow]) -> None:
        """Insert ``rows`` (made by :func:`new_job_row`) with their first events, in ``session``'s transaction: the
        jobs in one flush, then the events that refer to them."""
        session.add_all(rows)
        session.flush()
        session.add_all(
            JobEventRow(job_id=row.id, at=row.created_at, to_state="queued", reason="submitted") for row in rows
        )

    @staticmethod
    def _check_dependencies(session: Session, owner: str, spec: JobSpec) -> None:
        """Each job ``spec`` depends on is one of the owner's (another user's is refused like one that is not)."""
        ids = [d.job for d in spec.depends_on]
        owners = dict(session.execute(select(JobRow.id, JobRow.owner).where(JobRow.id.in_(ids))).all())
        for i, job_id in enumerate(ids):
            if owners.get(job_id) != owner:
                raise BadDependency(f"depends_on.{i}.job", f"there is no job {job_id} of {owner}'s to depend on")

    @staticmethod
    def _queued_query(owner: str):
        return select(func.count()).select_from(JobRow).where(JobRow.owner == owner, JobRow.state == "queued")

    def _by_key(self, owner: str, key: str) -> JobRow | None:
        with self.session() as session:
            return session.scalar(self._key_query(owner, key))

    @staticmethod
    def _key_query(owner: str, key: str):
        return select(JobRow).where(JobRow.owner == owner, JobRow.idempotency_key == key)

    def get_job(self, job_id: str) -> JobRow:
        with self.session() as session:
            row = session.get(JobRow, job_id)
        if row is None:
            raise JobNotFound(job_id)
        return row

    def list_jobs(
        self,
        owner: str | None = None,
        state: str | list[str] | None = None,
        labels: dict[str, str] | None = None,
        limit: int = 50,
        cursor: str | None = None,
        schedule_id: str | None = None,
        array_id: str | None = None,
    ) -> tuple[list[JobRow], str | None]:
        """Newest first; returns ``(rows, next_cursor)`` (``None`` on the last page).

        Raises ``ValueError`` for a cursor this method did not produce.
        """
        query = select(JobRow).order_by(JobRow.created_at.desc(), JobRow.id.desc())
        if owner is not None:
            query = query.where(JobRow.owner == owner)
        if state:
            query = query.where(JobRow.state.in_([state] if isinstance(state, str) else state))
        for key, value in (labels or {}).items():
            query = query.where(JobRow.labels[key].as_string() == value)
        if schedule_id:
            query = query.where(JobRow.schedule_id == schedule_id)
        if array_id:
            query = query.where(JobRow.array_id == array_id)
        if cursor:
            created, job_id = _decode_cursor(cursor)
            query = query.where(
                or_(JobRow.created_at < created, and_(JobRow.created_at == created, JobRow.id < job_id))
            )
        with self.session() as session:
            rows = list(session.scalars(query.limit(limit + 1)))
        if len(rows) > limit:
            return rows[:limit], _encode_cursor(rows[limit - 1])
        return rows, None

    def transition(self, job_id: str, to_state: str, reason: str, **fields: Any) -> JobRow:
        """Move the job to ``to_state``, setting ``fields`` (column values), and record the event.

        Sets ``started_at`` on ``running`` and ``finished_at`` on final states, and clears the
        job token hash when the job leaves ``dispatching``/``running``. Raises
        :class:`JobStateError` for a transition the state machine does not allow (also when
        another writer changed the state first) and :class:`JobNotFound`.
        """
        now = utcnow()
        values = {**fields, "state": to_state, "state_reason": reason, "updated_at": now}
        if to_state == "running":
            values.setdefault("started_at", now)
        if to_state in TERMINAL_STATES:
            values.setdefault("finished_at", now)
        if to_state not in ACTIVE_STATES:
            values["job_token_hash"] = None
        with self.session() as session, session.begin():
            current = session.scalar(select(JobRow.state).where(JobRow.id == job_id))
            if current is None:
                raise JobNotFound(job_id)
            if to_state not in TRANSITIONS.get(current, ()):
                raise JobStateError(f"job {job_id} is {current}: cannot change to {to_state}")
            changed = session.execute(
                update(JobRow).where(JobRow.id == job_id, JobRow.state == current).values(**values)
            ).rowcount
            if changed != 1:
                raise JobStateError(f"job {job_id} changed state concurrently; not moved to {to_state}")
            session.add(JobEventRow(job_id=job_id, at=now, from_state=current, to_state=to_state, reason=reason))
            row = session.get(JobRow, job_id)
            if to_state in TERMINAL_STATES:
                for hook in self.finished_hooks:  # in this transaction: told at least once, or not ended
                    hook(session, row)
            return row

    def hold(self, job_id: str, dependency: str, reason: str) -> None:
        """A queued job waits for ``dependency`` (see :mod:`.dependencies`)."""
        self._update_queued(job_id, held_by=dependency, state_reason=reason)

    def release(self, job_id: str, reason: str) -> None:
        """A queued job's dependencies are met: it is a candidate again."""
        self._update_queued(job_id, held_by=None, state_reason=reason)

    def change_queued(self, job_id: str, by: str, admin: bool, change: JobUpdate) -> JobRow:
        """Apply ``change`` to a queued job (its priority, resources merged field by field, hold), with an event
        row saying what changed and who changed it; raises ``JobNotFound``, or ``JobStateError`` unless the job is
        queued (a running job keeps what it started with)."""
        with self.session() as session, session.begin():
            row = session.get(JobRow, job_id, with_for_update=True)
            if row is None:
                raise JobNotFound(job_id)
            if row.state != "queued":
                raise JobStateError(f"job {job_id} is {row.state}: only a queued job can be changed")
            spec = JobSpec.model_validate(row.spec)
            said = []
            if change.priority is not None and change.priority != row.priority:
                said.append(f"priority {row.priority} -> {change.priority}")
                row.priority, spec.priority = change.priority, change.priority
                row.global_priority = change.priority if admin else 0
            if change.resources is not None:
                given = change.resources.model_dump(include=change.resources.model_fields_set)
                resources = Resources.model_validate({**spec.resources.model_dump(), **given})
                for name in ("gpus", "cpus", "memory", "pool"):
                    if getattr(resources, name) != getattr(spec.resources, name):
                        said.append(f"{name} {getattr(spec.resources, name)} -> {getattr(resources, name)}")
                        setattr(row, name, getattr(resources, name))
                spec.resources = resources
            if change.held is not None and change.held != row.on_hold:
                row.on_hold = change.held
                said.append("held" if change.held else "released")
                row.state_reason = f"held by {by}" if change.held else f"released by {by}"
            if said:
                now = utcnow()
                row.spec, row.updated_at = spec.model_dump(mode="json"), now
                reason = f"changed by {by}: {', '.join(said)}"
                session.add(JobEventRow(job_id=job_id, at=now, from_state="queued", to_state="queued", reason=reason))
        return row

    def draining_pools(self) -> set[str]:
        with self.session() as session:
            return set(session.scalars(select(PoolSettingRow.name).where(PoolSettingRow.draining)))

    def set_draining(self, pool: str, draining: bool, by: str) -> None:
        with self.session() as session, session.begin():
            row = session.get(PoolSettingRow, pool) or PoolSettingRow(name=pool)
            row.draining, row.updated_by, row.updated_at = draining, by, utcnow()
            session.add(row)

    def fair_share_usage(self, half_life: float, keys: Iterable[str] | None = None) -> dict[str, float]:
        """Decayed usage per key (of ``keys`` only, if given), as of now."""
        now = utcnow()
        query = select(FairShareRow)
        if keys is not None:
            query = query.where(FairShareRow.key.in_(list(keys)))
        with self.session() as session:
            return {r.key: decayed(r.value, r.updated_at, now, half_life) for r in session.scalars(query)}

    def charge_usage(self, amounts: dict[str, float], half_life: float) -> None:
        """Add ``amounts`` to the stored usage of their keys (decayed to now first), in one transaction."""
        if not amounts:
            return
        now = utcnow()
        with self.session() as session, session.begin():
            stored = {r.key: r for r in session.scalars(select(FairShareRow).where(FairShareRow.key.in_(amounts)))}
            for key, amount in amounts.items():
                row = stored.get(key)
                if row is None:
                    session.add(FairShareRow(key=key, value=amount, updated_at=now))
                else:
                    row.value, row.updated_at = decayed(row.value, row.updated_at, now, half_life) + amount, now

    def _update_queued(self, job_id: str, **values: Any) -> None:
        with self.session() as session, session.begin():
            session.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.state == "queued")
                .values(**values, updated_at=utcnow())
            )

    def set_waiting_reasons(self, reason_for: Callable[[SimpleNamespace], str | None]) -> None:
        """Set each due queued job's reason (why it waits) to ``reason_for(job)`` where that is not None
        and differs, without a transition.

        ``job`` has the columns a reason depends on (:data:`REASON_COLUMNS`); one UPDATE per distinct
        combination of them and the old reason, so the cost is in SQL, not per job.
        """
        key = [*REASON_COLUMNS, JobRow.state_reason]
        with self.session() as session:
            combos = session.execute(select(*key).where(*_due()).group_by(*key)).all()
        changes = []
        for combo in combos:
            job = SimpleNamespace(**combo._mapping)
            job.groups = json.loads(job.groups)
            reason = reason_for(job)
            if reason is not None and reason != combo.state_reason:
                where = [col.is_(v) if v is None else col == v for col, v in zip(key, combo, strict=True)]
                changes.append((where, reason))
        if not changes:
            return
        now = utcnow()
        with self.session() as session, session.begin():
            for where, reason in changes:
                session.execute(update(JobRow).where(*_due(), *where).values(state_reason=reason, updated_at=now))

    def events(self, job_id: str) -> list[JobEvent]:
        """The job's transitions, oldest first."""
        with self.session() as session:
            rows = session.scalars(select(JobEventRow).where(JobEventRow.job_id == job_id).order_by(JobEventRow.id))
            return [
                JobEvent(
                    job_id=r.job_id,
                    at=iso(r.at),
                    from_state=r.from_state,
                    to_state=r.to_state,
                    reason=r.reason,
                )
                for r in rows
            ]

    def delete_job(self, job_id: str) -> None:
        """Delete a finished job and its events; :class:`JobStateError` if it is not finished."""
        with self.session() as session, session.begin():
            row = session.get(JobRow, job_id)
            if row is None:
                raise JobNotFound(job_id)
            if row.state not in TERMINAL_STATES:
                raise JobStateError(f"job {job_id} is {row.state}: only finished jobs can be deleted")
            session.delete(row)

    def _update_active(self, job_id: str, **values: Any) -> bool:
        with self.session() as session, session.begin():
            return (
                session.execute(
                    update(JobRow).where(JobRow.id == job_id, JobRow.state.in_(ACTIVE_STATES)).values(**values)
                ).rowcount
                == 1
            )

    def update_progress(self, job_id: str, step: int, total: int | None, metrics: dict) -> bool:
        """Store the runner's progress (and count it as a heartbeat); False unless the job is active."""
        now = utcnow()
        progress = {"step": step, "total": total, "metrics": metrics}
        return self._update_active(job_id, progress=progress, heartbeat_at=now, updated_at=now)

    def annotate(self, job_id: str, reason: str, **values: Any) -> bool:
        """Change an active job's reason (and columns ``values``) without a transition; False unless active."""
        return self._update_active(job_id, state_reason=reason, updated_at=utcnow(), **values)

    def heartbeat(self, job_id: str) -> bool:
        return self._update_active(job_id, heartbeat_at=utcnow())

    def set_tracking(self, job_id: str, mlflow_run_id: str | None, wandb_run_path: str | None) -> bool:
        values = {"mlflow_run_id": mlflow_run_id, "wandb_run_path": wandb_run_path}
        return self._update_active(job_id, **{k: v for k, v in values.items() if v is not None})

    def check_job_token(self, job_id: str, token: str) -> bool:
        """Whether ``token`` is the current attempt's job token (valid only while it is active)."""
        with self.session() as session:
            stored = session.scalar(select(JobRow.job_token_hash).where(JobRow.id == job_id))
        return stored is not None and hmac.compare_digest(stored, token_hash(token))

    def claim_job_token(self, job_id: str, attempt: int, token: str) -> bool:
        """Make ``token`` the job token of an active ``attempt`` that has none yet (its credentials were left
        out of its environment); False if the attempt is not active or its token was claimed already."""
        with self.session() as session, session.begin():
            result = session.execute(
                update(JobRow)
                .where(
                    JobRow.id == job_id,
                    JobRow.attempt == attempt,
                    JobRow.state.in_(ACTIVE_STATES),
                    JobRow.job_token_hash.is_(None),
                )
                .values(job_token_hash=token_hash(token))
            )
        return result.rowcount == 1

    def active_jobs(self) -> list[JobRow]:
        """Dispatching and running jobs."""
        with self.session() as session:
            return list(session.scalars(select(JobRow).where(JobRow.state.in_(ACTIVE_STATES))))

    def any_queued(self) -> bool:
        """Whether a queued job is due (its retry backoff has passed)."""
        with self.session() as session:
            return session.scalar(select(JobRow.id).where(*_due()).limit(1)) is not None

    def queued_jobs(
        self,
        due_only: bool = True,
        where: Iterable[ColumnElement] = (),
        per_owner: ColumnElement | int | None = None,
    ) -> list[Row]:
        """The :data:`SCHEDULING_COLUMNS` of queued jobs, by priority (highest first), then age.

        ``due_only``: only jobs whose retry backoff has passed; ``where``: more conditions on
        ``JobRow`` columns; ``per_owner``: at most this many jobs of each owner (an int, or an
        expression over ``JobRow`` columns giving each row's owner's limit).
        """
        order = (JobRow.priority.desc(), JobRow.created_at, JobRow.id)
        query = select(*SCHEDULING_COLUMNS).where(*(_due() if due_only else [JobRow.state == "queued"]), *where)
        if per_owner is not None:
            rank = func.row_number().over(partition_by=JobRow.owner, order_by=order)
            ranked = query.add_columns(rank.label("rank"), cast(per_owner, BigInteger).label("room")).subquery()
            columns = [ranked.c[c.key] for c in SCHEDULING_COLUMNS]
            query = select(*columns).where(ranked.c.rank <= ranked.c.room)
            order = (ranked.c.priority.desc(), ranked.c.created_at, ranked.c.id)
        with self.session() as session:
            return list(session.execute(query.order_by(*order)))

    def candidates(
        self, capacity: dict[str, PoolCapacity], ledger: Ledger, limits: Limits, owner: str | None = None, after=None
    ) -> list[Row]:
        """Due queued jobs that fit the pools' free capacity and the user GPU quota, the first
        :meth:`~.policy.Limits.room` of each owner (of ``owner`` only, after the job ``after``, if given).

        The scheduling pass reads only these: the rules of :func:`~.policy.blocker` that SQL can state, so that
        a queue of thousands costs a pass what the jobs that may start cost."""
        where = [_fits(capacity, ledger)]
        if full := ledger.full_arrays():  # a job array at its max_concurrent: none of its jobs may start
            where.append(or_(JobRow.array_id.is_(None), JobRow.array_id.not_in(full)))
        max_gpus = limits.user.get("max_gpus")
        if max_gpus is not None:
            gpus_used = {o: u.gpus for o, u in ledger.owners.items() if u.gpus}
            where.append(JobRow.gpus <= max_gpus - (case(gpus_used, value=JobRow.owner, else_=0) if gpus_used else 0))
        if owner is None:
            rooms = {o: limits.room(u) for o, u in ledger.owners.items()}
            per_owner = case(rooms, value=JobRow.owner, else_=limits.room(Usage())) if rooms else limits.room(Usage())
        else:
            per_owner = limits.room(ledger.owners[owner])
            p, c = after.priority, after.created_at
            where += [
                JobRow.owner == owner,
                or_(
                    JobRow.priority < p,
                    and_(
                        JobRow.priority == p,
                        or_(JobRow.created_at > c, and_(JobRow.created_at == c, JobRow.id > after.id)),
                    ),
                ),
            ]
        return self.queued_jobs(where=where, per_owner=per_owner)

    def queue_position(self, row: JobRow) -> int:
        """1 + the due queued jobs of ``row``'s pool before it by admin priority, then age."""
        ahead = or_(
            JobRow.global_priority > row.global_priority,
            and_(
                JobRow.global_priority == row.global_priority,
                or_(JobRow.created_at < row.created_at, and_(JobRow.created_at == row.created_at, JobRow.id < row.id)),
            ),
        )
        with self.session() as session:
            count = session.scalar(select(func.count()).where(*_due(), JobRow.pool == row.pool, ahead))
        return 1 + int(count or 0)

    def oldest_waiting(self, capacity: dict[str, PoolCapacity], ledger: Ledger, limit: int) -> list[Row]:
        """The ``limit`` oldest due queued jobs that their pool, offered and not draining, lacks the free capacity
        for (no candidates of the pass): who may get a reservation (:mod:`.backfill`) or preempt. Read along the
        creation-time index, so a deep queue costs no more."""
        open_pools = [name for name, cap in capacity.items() if not cap.draining]
        query = (
            select(*SCHEDULING_COLUMNS)
            .where(*_due(), JobRow.pool.in_(open_pools), not_(_fits(capacity, ledger)))
            .order_by(JobRow.created_at, JobRow.id)
            .limit(limit)
        )
        with self.session() as session:
            return list(session.execute(query))

    def usage(self, by: Literal["owner", "pool"]) -> dict[str, Usage]:
        """Resources of running + dispatching jobs per owner or per pool."""
        column = JobRow.owner if by == "owner" else JobRow.pool
        query = (
            select(
                column,
                func.count(),
                func.coalesce(func.sum(JobRow.gpus), 0),
                func.coalesce(func.sum(JobRow.cpus), 0),
                func.coalesce(func.sum(JobRow.memory), 0),
            )
            .where(JobRow.state.in_(ACTIVE_STATES))
            .group_by(column)
        )
        with self.session() as session:
            return {
                key: Usage(int(jobs), int(gpus), float(cpus), int(memory))
                for key, jobs, gpus, cpus, memory in session.execute(query)
            }

    def queued_count(self) -> dict[str, int]:
        """Queued jobs per pool."""
        query = select(JobRow.pool, func.count()).where(JobRow.state == "queued").group_by(JobRow.pool)
        with self.session() as session:
            return {pool: int(n) for pool, n in session.execute(query)}
