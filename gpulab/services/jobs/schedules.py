"""Schedules: a job template run at the times of a cron expression, by the job service itself, so that a schedule
runs whether or not its owner's server is up (jupyter-scheduler's run in the user's server, and stop with it).

- :func:`plan` is the rule, pure: given a due schedule, how many of its runs are active and the time, whether a
  run starts now, is skipped or waits, and when the schedule is next due;
- :class:`ScheduleStore` holds the ``schedules`` table's queries (the table is in :mod:`.store`, the jobs
  database's one model module);
- :class:`Scheduler` (``c.Scheduler``) checks every ``interval`` seconds for due schedules and starts their runs
  as ordinary jobs of the owner (``schedule_id`` links them), or pipelines of such jobs, each exactly once: a
  run's idempotency key is its schedule and due time, so a run started just before a crash is not started again
  after it. A pipeline's run is active while one of its steps is.
"""

import asyncio
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from sqlalchemy import distinct, func, or_, select
from traitlets import Float, Integer
from traitlets.config import LoggingConfigurable

from gpulab.job_states import UNFINISHED_STATES
from gpulab.service.periodic import periodic
from gpulab.service.storage import utcnow

from . import cron
from .models import JobSpec, PipelineSpec, Schedule, ScheduleSpec, ScheduleUpdate
from .pipelines import PipelineStore
from .store import JobRow, JobStore, PipelineRow, QueueFull, ScheduleRow, iso

MAX_MISSED_COUNTED = 10_000  # due times counted when a schedule was missed for long (every minute for a week)


class ScheduleNotFound(LookupError):
    """No schedule with this id."""


class TooManySchedules(Exception):
    """The owner has ``Scheduler.max_per_user`` schedules."""


@dataclass(frozen=True)
class Plan:
    """What to do with a due schedule: ``action`` start (a run for ``due``), skip or wait (one run pending until
    an active one ends); ``skipped``: due times passed by without a run; ``pending``: a run waits afterwards;
    ``next_run_at``: when it is due next."""

    action: Literal["start", "skip", "wait"]
    due: datetime
    skipped: int
    pending: bool
    next_run_at: datetime | None


def plan(row: ScheduleRow, active_runs: int, now: datetime, misfire_grace: float) -> Plan:
    """The rule for a schedule due at ``row.next_run_at`` (or with a run pending, due at ``row.last_run_at``) at
    ``now`` (naive UTC).

    Due times more than ``misfire_grace`` seconds old were missed (the service was down): with ``catch_up:
    once`` one run stands for them all, the latest; with ``skip`` they are all skipped. A run that is due when
    ``max_concurrent`` runs are active is skipped, or with ``overlap: queue`` waits (one at most: another one due
    meanwhile is skipped). The next due time is the first after ``now``: missed times are never run one by one.
    """
    times = []  # the due times that passed, oldest first
    if row.next_run_at is not None and row.next_run_at <= now:
        times = cron.runs_until(row.cron, row.timezone, row.next_run_at, now, MAX_MISSED_COUNTED)
    if not times:  # only a pending run: it starts when there is room
        due = row.last_run_at or now
        if active_runs < row.max_concurrent:
            return Plan("start", due, 0, False, row.next_run_at)
        return Plan("wait", due, 0, True, row.next_run_at)
    next_run_at = cron.next_run(row.cron, row.timezone, now)
    latest, earlier = times[-1], len(times) - 1 + int(row.pending_run)  # a pending run is one the latest replaces
    if (now - latest).total_seconds() > misfire_grace and row.catch_up == "skip":
        return Plan("skip", latest, len(times) + int(row.pending_run), False, next_run_at)
    if active_runs < row.max_concurrent:
        return Plan("start", latest, earlier, False, next_run_at)
    if row.overlap == "queue" and not row.pending_run:
        return Plan("wait", latest, earlier, True, next_run_at)
    return Plan("skip", latest, len(times), row.pending_run, next_run_at)


def run_key(schedule_id: str, due: datetime) -> str:
    """The idempotency key of a schedule's run due at ``due``."""
    return f"schedule:{schedule_id}:{due:%Y-%m-%dT%H:%M:%S}"


class ScheduleStore:
    """The ``schedules`` table, in the jobs database of ``store``."""

    def __init__(self, store: JobStore):
        self.store = store

    def create(self, owner: str, groups: list[str], admin: bool, spec: ScheduleSpec, max_per_user: int) -> ScheduleRow:
        now = utcnow()
        row = ScheduleRow(
            id=uuid.uuid4().hex,
            owner=owner,
            groups=sorted(set(groups)),
            admin=admin,
            name=spec.name,
            cron=spec.cron,
            timezone=spec.timezone,
            state="paused" if spec.paused else "active",
            job=spec.job.model_dump(mode="json") if spec.job else None,
            pipeline=spec.pipeline.model_dump(mode="json") if spec.pipeline else None,
            max_concurrent=spec.max_concurrent,
            overlap=spec.overlap,
            catch_up=spec.catch_up,
            next_run_at=None if spec.paused else cron.next_run(spec.cron, spec.timezone, now),
            pending_run=False,
            runs=0,
            skipped=0,
            created_at=now,
            updated_at=now,
        )
        with self.store.session() as session, session.begin():
            count = select(func.count()).select_from(ScheduleRow).where(ScheduleRow.owner == owner)
            if session.scalar(count) >= max_per_user:
                raise TooManySchedules(
                    f"{owner} has {max_per_user} schedules, the most one may have (Scheduler.max_per_user): "
                    "delete one first"
                )
            session.add(row)
        return row

    def get(self, schedule_id: str) -> ScheduleRow:
        with self.store.session() as session:
            row = session.get(ScheduleRow, schedule_id)
        if row is None:
            raise ScheduleNotFound(schedule_id)
        return row

    def owned_by(self, owner: str | None) -> list[ScheduleRow]:
        """The owner's schedules (everyone's for None), newest first."""
        query = select(ScheduleRow).order_by(ScheduleRow.created_at.desc(), ScheduleRow.id.desc())
        if owner is not None:
            query = query.where(ScheduleRow.owner == owner)
        with self.store.session() as session:
            return list(session.scalars(query))

    def update(self, schedule_id: str, change: ScheduleUpdate) -> ScheduleRow:
        """Apply ``change``; a schedule resumed or given another time is next due at its first time from now
        (what it would have run while paused is not run)."""
        now = utcnow()
        with self.store.session() as session, session.begin():
            row = session.get(ScheduleRow, schedule_id, with_for_update=True)
            if row is None:
                raise ScheduleNotFound(schedule_id)
            for field in ("cron", "timezone", "max_concurrent", "overlap", "catch_up"):
                if (value := getattr(change, field)) is not None:
                    setattr(row, field, value)
            if change.paused is not None:
                row.state = "paused" if change.paused else "active"
            if row.state == "paused":
                row.next_run_at, row.pending_run = None, False
            elif change.paused is False or change.cron or change.timezone or row.next_run_at is None:
                row.next_run_at = cron.next_run(row.cron, row.timezone, now)
            row.updated_at = now
        return row

    def delete(self, schedule_id: str) -> None:
        """Remove the schedule; its runs stay, as the jobs they are."""
        with self.store.session() as session, session.begin():
            row = session.get(ScheduleRow, schedule_id)
            if row is None:
                raise ScheduleNotFound(schedule_id)
            session.delete(row)

    def delete_owned(self, owner: str) -> int:
        """Remove every schedule of ``owner`` (a deleted user); how many there were."""
        with self.store.session() as session, session.begin():
            rows = list(session.scalars(select(ScheduleRow).where(ScheduleRow.owner == owner)))
            for row in rows:
                session.delete(row)
        return len(rows)

    def due(self, now: datetime) -> list[ScheduleRow]:
        """Active schedules due by ``now`` or with a run waiting."""
        query = select(ScheduleRow).where(
            ScheduleRow.state == "active", or_(ScheduleRow.next_run_at <= now, ScheduleRow.pending_run)
        )
        with self.store.session() as session:
            return list(session.scalars(query))

    def active_runs(self, schedule_ids: list[str]) -> dict[str, int]:
        """The runs of each schedule not finished yet (a schedule with none is absent), in one query: a job, or
        a pipeline or job array with a job not finished."""
        query = (
            select(
                JobRow.schedule_id, func.count(distinct(func.coalesce(JobRow.pipeline_id, JobRow.array_id, JobRow.id)))
            )
            .where(JobRow.schedule_id.in_(schedule_ids), JobRow.state.in_(UNFINISHED_STATES))
            .group_by(JobRow.schedule_id)
        )
        with self.store.session() as session:
            return dict(session.execute(query).all())

    def record(self, schedule_id: str, outcome: Plan, run: JobRow | PipelineRow | None, error: str | None) -> None:
        """What became of a due schedule: its next time, counts, and the run started (or why none was)."""
        with self.store.session() as session, session.begin():
            row = session.get(ScheduleRow, schedule_id, with_for_update=True)
            if row is None or row.state != "active":  # deleted or paused meanwhile
                return
            row.next_run_at = outcome.next_run_at
            row.skipped += outcome.skipped
            row.pending_run = outcome.pending
            if outcome.action in ("start", "wait"):
                row.last_run_at = outcome.due  # a waiting run's due time names it when it starts
            if run is not None:
                _count_run(row, run)
            if outcome.action == "start":
                row.last_error = error
            row.updated_at = utcnow()

    def ran(self, schedule_id: str, run: JobRow | PipelineRow) -> None:
        """A run started by hand (run now)."""
        with self.store.session() as session, session.begin():
            row = session.get(ScheduleRow, schedule_id, with_for_update=True)
            if row is not None:
                _count_run(row, run)
                row.updated_at = utcnow()


def _count_run(row: ScheduleRow, run: JobRow | PipelineRow) -> None:
    row.runs += 1
    if isinstance(run, PipelineRow):
        row.last_pipeline_id = run.id
    else:
        row.last_job_id = run.id


def schedule_model(row: ScheduleRow) -> Schedule:
    """The API view of ``row``."""
    return Schedule(
        id=row.id,
        owner=row.owner,
        name=row.name,
        cron=row.cron,
        timezone=row.timezone,
        state=row.state,
        job=JobSpec.model_validate(row.job) if row.job else None,
        pipeline=PipelineSpec.model_validate(row.pipeline) if row.pipeline else None,
        max_concurrent=row.max_concurrent,
        overlap=row.overlap,
        catch_up=row.catch_up,
        next_run_at=iso(row.next_run_at),
        last_run_at=iso(row.last_run_at),
        last_job_id=row.last_job_id,
        last_pipeline_id=row.last_pipeline_id,
        pending_run=row.pending_run,
        runs=row.runs,
        skipped=row.skipped,
        last_error=row.last_error,
        created_at=iso(row.created_at),
        updated_at=iso(row.updated_at),
    )


class Scheduler(LoggingConfigurable):
    """Starts schedules' runs when they are due; runs in the job service, beside its queue."""

    interval = Float(1.0, min=0.1, help="Seconds between checks for due schedules.").tag(config=True)
    misfire_grace = Float(
        300.0,
        min=0,
        help="Seconds after its due time within which a run still counts as on time; older due times were "
        "missed (the service was down) and follow the schedule's catch_up.",
    ).tag(config=True)
    max_per_user = Integer(50, min=0, help="Schedules one user may have.").tag(config=True)

    def __init__(self, queue, **kwargs):
        super().__init__(**kwargs)
        self.queue = queue
        self.schedules = ScheduleStore(queue.store)
        self.pipelines = PipelineStore(queue.store)

    def start_run(self, row: ScheduleRow, due: datetime, by_hand: bool = False) -> JobRow | PipelineRow:
        """A run of ``row`` due at ``due``, as a job or pipeline of its owner (once per due time; raises
        ``QueueFull``)."""
        key = run_key(row.id, due) + (f":{uuid.uuid4().hex}" if by_hand else "")
        if row.pipeline is not None:
            pipeline, _ = self.pipelines.create(
                row.owner,
                row.groups,
                row.admin,
                PipelineSpec.model_validate(row.pipeline),
                self.queue.max_queued,
                schedule_id=row.id,
                idempotency_key=key,
            )
            return pipeline
        spec = JobSpec.model_validate(row.job).model_copy(update={"idempotency_key": key})
        job, _ = self.queue.store.create_job(
            row.owner, row.groups, spec, max_queued=self.queue.max_queued, admin=row.admin, schedule_id=row.id
        )
        return job

    def fire_due(self, now: datetime | None = None) -> int:
        """Start (or skip, or hold) the runs due by ``now``; the number started. Blocking: on the store's thread."""
        now = now or utcnow()
        started = 0
        due = self.schedules.due(now)
        active = self.schedules.active_runs([row.id for row in due]) if due else {}
        for row in due:
            outcome = plan(row, active.get(row.id, 0), now, self.misfire_grace)
            if outcome == Plan("wait", row.last_run_at or now, 0, True, row.next_run_at):
                continue  # still waiting for room: nothing to write
            run = error = None
            if outcome.action == "start":
                try:
                    run = self.start_run(row, outcome.due)
                    started += 1
                except QueueFull as e:
                    error = f"the run due at {iso(outcome.due)} was not started: {e}"
            self.schedules.record(row.id, outcome, run, error)
            if outcome.action == "skip":
                self.log.info("schedule %s (%s): skipped the run due at %s", row.id, row.owner, iso(outcome.due))
        return started

    async def forget(self, owner: str) -> None:
        """A deleted user's schedules are removed, so that none starts another run of theirs."""
        if removed := await self.queue.store.db.run(self.schedules.delete_owned, owner):
            self.log.info("removed the %d schedules of %s, a deleted user", removed, owner)

    async def run(self, stopping: asyncio.Event) -> None:
        """Check every ``interval`` seconds until ``stopping``; a failed check is logged and the next one goes on."""

        async def check():
            if await self.queue.store.db.run(self.fire_due):
                self.queue.kick()

        await periodic(check, self.interval, self.log, "checking schedules", stopping=stopping)
