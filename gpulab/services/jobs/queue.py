"""The job queue: priority, fair share, quotas, pool capacity, attestation gating, dispatch, retries,
timeouts, recovery.

One :meth:`JobQueue.tick` (every ``tick_interval`` s and after :meth:`JobQueue.kick`) polls
running attempts, then dispatches due queued jobs; see docs/jobs.md "Scheduling".
"""

import asyncio
import hmac
import json
import secrets
from collections import deque
from contextlib import suppress
from dataclasses import asdict, replace
from datetime import UTC, datetime, timedelta
from functools import cache

from traitlets import Bool, Dict, Float, Instance, Integer, List, TraitError, Type, Unicode, default, validate
from traitlets.config import LoggingConfigurable

from gpulab import tracing
from gpulab.attestation import AttestationService, NodeState
from gpulab.data_dir import configured_data_dir
from gpulab.job_states import UNFINISHED_STATES
from gpulab.ratelimit import TokenBuckets
from gpulab.secrets import JOB_SECRET_ENV
from gpulab.service.periodic import periodic
from gpulab.service.storage import utcnow

from . import dependencies, fair_share, policy, preemption, views
from .attempts import Attempts
from .backfill import Reservations, scope_of
from .cohorts import CohortConfigError, Cohorts
from .executors.base import Executor, ExecutorUnavailable, Handle, Outcome, PoolCapacity
from .executors.local import handle_file
from .models import Job, JobSpec, PoolStatus, Quota
from .policy import Ledger, Usage
from .store import JobNotFound, JobRow, JobStateError, JobStore, iso, token_hash

EXECUTORS = {
    "local": "gpulab.services.jobs.executors.local.LocalExecutor",
    "ray": "gpulab.services.jobs.executors.ray.RayExecutor",
}
DEFAULT_USER_QUOTA = {"max_jobs": 8, "max_gpus": 4}
PREEMPTION_PLANS = 8  # waiting jobs a scheduling pass tries preemption for, in turn order
WAITING_READ = 64  # oldest jobs lacking their pool's capacity a pass reads (for reservations and preemption)
QUOTA_KEYS = tuple(DEFAULT_USER_QUOTA)


class SubmissionsLimited(Exception):
    """The owner submits faster than ``JobQueue.submit_rate``; ``retry_after`` says when they may again."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


class ClaimRefused(Exception):
    """A job's credentials cannot be claimed with this ticket: ``status`` 403 (not this attempt's ticket, or the
    attempt is over) or 409 (claimed already, by the runner or by someone who read the ticket)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class ExecutorClass(Type):
    """A ``Type`` trait that also accepts the short names in :data:`EXECUTORS`."""

    def validate(self, obj, value):
        return super().validate(obj, EXECUTORS.get(value, value) if isinstance(value, str) else value)


def _quota_traits() -> dict:
    return {key: Integer(None, allow_none=True, min=0) for key in QUOTA_KEYS}


def _known_keys(setting: str, quota: dict) -> None:
    if unknown := sorted(set(quota) - set(QUOTA_KEYS)):
        raise TraitError(f"{setting}: {unknown[0]!r} is not a quota limit (give {' and/or '.join(QUOTA_KEYS)})")


class JobQueue(LoggingConfigurable):
    """Schedules the jobs in a :class:`JobStore` onto an :class:`Executor`."""

    executor_class = ExecutorClass(
        EXECUTORS["local"],
        klass=Executor,
        help="Executor: 'local', 'ray', or an Executor subclass (or its dotted name).",
    ).tag(config=True)
    tick_interval = Float(1.0, help="Seconds between scheduling passes.").tag(config=True)
    kick_delay = Float(
        0.02, help="Seconds a submission or finish waits for others before the scheduling pass it triggers."
    ).tag(config=True)
    user_quota = Dict(
        DEFAULT_USER_QUOTA,
        per_key_traits=_quota_traits(),
        help="Per-user limits on running+dispatching jobs: {'max_jobs': 8, 'max_gpus': 4} (None: no limit); "
        "keys left out keep their default.",
    ).tag(config=True)
    group_quotas = Dict(
        value_trait=Dict(per_key_traits=_quota_traits()),
        key_trait=Unicode(),
        help="Group name -> {'max_jobs', 'max_gpus'} over all its members' jobs; keys left out = no limit.",
    ).tag(config=True)
    cohorts = Dict(
        key_trait=Unicode(),
        help="Quotas as cohorts (Kueue's): {cohort: {group: {pool: {resource: quota}}}}, resource gpus, cpus or "
        "memory, quota its nominal amount or {'nominal': n, 'borrowing_limit': b, 'lending_limit': l}. A group "
        "uses up to its nominal quota before others' jobs that borrow; it borrows what the cohort's other groups "
        "do not use (up to its borrowing_limit), and lends its own unused quota (up to its lending_limit). See "
        "docs/jobs.md 'Cohorts'.",
    ).tag(config=True)
    lend_between_cohorts = Bool(
        False,
        help="Cohorts lend one another what none of their groups use, as children of one root cohort (Kueue's "
        "hierarchical cohorts): a group borrows beyond its cohort; what its cohort lent is reclaimed (preemption) "
        "like a group's. False: each cohort is a slice of the cluster of its own.",
    ).tag(config=True)
    cohort_default_group = Unicode(
        "",
        help="The cohort group whose quota jobs use when their owner is in no group of a cohort (empty: such jobs "
        "are limited by the user and group quotas and the pools' capacity only).",
    ).tag(config=True)
    usage_half_life = Float(
        7 * 24 * 3600.0,
        help="Seconds in which a user's or group's past use of the cluster counts half as much for fair share.",
    ).tag(config=True)
    usage_weights = Dict(
        fair_share.DEFAULT_WEIGHTS,
        per_key_traits={k: Float(min=0.0) for k in fair_share.DEFAULT_WEIGHTS},
        help="What a second of each resource adds to fair-share usage: {'gpus': 1, 'cpus': 0.1, 'memory': 0} "
        "(memory per GiB); keys left out keep their default.",
    ).tag(config=True)
    fair_share_weights = Dict(
        value_trait=Float(min=0.001),
        key_trait=Unicode(),
        help="Cohort group -> its fair-share weight (default 1): a group of weight 2 counts its usage half.",
    ).tag(config=True)
    usage_sample_interval = Float(
        10.0, help="Seconds between charges of running jobs' use to their owners' and groups' fair-share usage."
    ).tag(config=True)
    fair_share_entry_penalty = Float(
        60.0,
        help="Seconds of its size a job is charged when it starts (Kueue's entry penalty), so that users with "
        "equal usage take turns within one scheduling pass.",
    ).tag(config=True)
    max_queued = Integer(
        1000, help="Queued jobs one user may have; more submissions get 429 until some start or are cancelled."
    ).tag(config=True)
    submit_rate = Float(
        5.0, help="Submissions a second one user may make on average; more get 429 with Retry-After."
    ).tag(config=True)
    submit_burst = Integer(100, help="Submissions one user may make at once, within submit_rate.").tag(config=True)
    log_follow_recheck = Float(
        60.0,
        help="Seconds between re-checks, with the hub, of the token a followed log "
        "(SSE) was opened with; a revoked token or a lost scope ends the stream.",
    ).tag(config=True)
    log_follow_max = Float(
        24 * 3600.0,
        help="Seconds a followed log (SSE) stays open; then it ends with event "
        "'closed' (code max_duration) and clients follow again from its offset.",
    ).tag(config=True)
    retry_backoff = Float(5.0, help="Delay before retry n is retry_backoff * 2**(n-1) s.").tag(config=True)
    retry_backoff_max = Float(300.0, help="Upper bound of the retry delay (s).").tag(config=True)
    cancel_grace = Float(10.0, help="Seconds between SIGTERM and SIGKILL when stopping an attempt.").tag(config=True)
    backfill = Bool(
        True,
        help="Backfill with a reservation (Slurm's): the job waiting longest for its pool's capacity (or its "
        "cohort's quota) reserves it, and other jobs start there only if they cannot delay it. False: whatever "
        "fits starts (best effort).",
    ).tag(config=True)
    preemption_grace = Float(
        60.0,
        help="Seconds a preempted attempt has between SIGTERM and SIGKILL to write its checkpoint "
        "(GPULAB_CHECKPOINT_DIR); it is then requeued without using a retry.",
    ).tag(config=True)
    preemption_min_runtime = Float(
        0.0, help="Seconds a preemptible job runs before it may be preempted (younger ones are exempt)."
    ).tag(config=True)
    data_dir = Unicode(help="Platform data dir; job directories are <data_dir>/jobs/<owner>/<id>.").tag(config=True)
    mlflow_tracking_uri = Unicode(help="MLFLOW_TRACKING_URI given to jobs (default: the platform's MLflow).").tag(
        config=True
    )
    mlflow_job_token = Bool(
        False,
        help="Give jobs MLFLOW_TRACKING_TOKEN=job:<id>:<job token>, which the platform's MLflow service checks "
        "with this service (gpulab sets it when mlflow_tracking_uri is the platform's; never for another server, "
        "which would learn the token).",
    ).tag(config=True)
    jobs_api_url = Unicode(help="GPULAB_JOBS_URL given to jobs (this service's API, for the runner).").tag(config=True)
    wandb_env = Dict(
        value_trait=Unicode(),
        help="W&B settings given to jobs, e.g. {'WANDB_MODE': 'online', 'WANDB_BASE_URL': ...}; default offline.",
    ).tag(config=True)
    inherit_env = List(
        Unicode(),
        ["PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "TZ", "TMPDIR", "LD_LIBRARY_PATH", "CUDA_HOME"],
        help="Variables of the service's environment that jobs inherit (nothing else is).",
    ).tag(config=True)
    wrap_with_runner = Bool(True, help="Run each attempt under `python -m gpulab.runner`.").tag(config=True)
    attestation_max_age = Float(
        3600.0, help="An `attestation: required` job starts only on a node verified within this many seconds."
    ).tag(config=True)

    store = Instance(JobStore)
    executor = Instance(Executor)
    attestation = Instance(
        AttestationService,
        allow_none=True,
        help="Whose node states gate `attestation: required` jobs; None: such jobs wait.",
    )

    @default("data_dir")
    def _default_data_dir(self):
        return str(configured_data_dir(self.config))

    @validate("user_quota")
    def _check_user_quota(self, proposal):
        _known_keys("user_quota", proposal.value)
        return proposal.value

    @validate("group_quotas")
    def _check_group_quotas(self, proposal):
        for group, quota in proposal.value.items():
            _known_keys(f"group_quotas[{group!r}]", quota)
        return proposal.value

    @validate("usage_weights")
    def _check_usage_weights(self, proposal):
        if unknown := sorted(set(proposal.value) - set(fair_share.DEFAULT_WEIGHTS)):
            raise TraitError(
                f"usage_weights: {unknown[0]!r} is not a resource (give {', '.join(fair_share.DEFAULT_WEIGHTS)})"
            )
        return proposal.value

    @validate("cohorts")
    def _check_cohorts(self, proposal):
        try:
            Cohorts(proposal.value)
        except CohortConfigError as e:
            raise TraitError(str(e)) from None
        return proposal.value

    @default("executor")
    def _default_executor(self):
        return self.executor_class(parent=self)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._lock = asyncio.Lock()  # one tick, recovery or cancel decision at a time
        self._wake = asyncio.Event()
        self._kick_pending = False
        self._task: asyncio.Task | None = None
        self._stopping: dict[str, asyncio.Task] = {}  # job id -> cancel/timeout/preemption in progress
        self._preempting: set[str] = set()  # the victims of the latest preemption
        self._cancelled: dict[str, str] = {}  # job id -> why: cancelled while another stop was under way
        self._sampled_at = utcnow()  # when active jobs' use was last charged to fair share
        self.reservations = Reservations()  # backfill: who holds which reservation, across passes
        self._background: set[asyncio.Task] = set()
        self._submissions = TokenBuckets(self.submit_rate, self.submit_burst)  # per owner
        self.attempts = Attempts(self)  # what each attempt starts with
        try:
            self.cohort_quotas = Cohorts(self.cohorts, self.cohort_default_group, self.lend_between_cohorts)
        except CohortConfigError as e:
            raise TraitError(f"JobQueue.{e}") from None

    # -- lifecycle

    async def start(self) -> None:
        """Recover jobs left active by a previous run, then schedule in the background."""
        async with self._lock:
            for row in self.store.active_jobs():
                if not row.handle:
                    self._recover_dispatching(row)
                    continue
                try:
                    outcome = await self.executor.poll(Handle(**row.handle))
                except ExecutorUnavailable as e:
                    self.log.warning("cannot re-attach job %s yet: %s", row.id, e)
                    continue
                if outcome.state == "lost":
                    outcome.reason = "process gone after service restart"
                await self._settle(row, outcome)
        self._task = asyncio.create_task(self._loop())

    def _recover_dispatching(self, row: JobRow) -> None:
        path = handle_file(self.attempts.log_path(row))
        if not path.exists():
            self.store.transition(row.id, "queued", "requeued after service restart", attempt=row.attempt - 1)
            return
        started = datetime.fromtimestamp(path.stat().st_mtime, UTC).replace(tzinfo=None)
        self.store.transition(
            row.id,
            "running",
            "re-attached after service restart",
            handle=json.loads(path.read_text()),
            started_at=started,
        )

    async def stop(self) -> None:
        """Stop scheduling (running attempts keep running; a restart re-attaches them)."""
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await asyncio.gather(*self._background, *self._stopping.values(), return_exceptions=True)
        await self.executor.close()

    def kick(self) -> None:
        """Schedule soon instead of at the next interval; a burst of kicks within ``kick_delay`` makes one pass."""
        if self._kick_pending:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._wake.set()
            return
        self._kick_pending = True
        loop.call_later(self.kick_delay, self._fire_kick)

    def _fire_kick(self) -> None:
        self._kick_pending = False
        self._wake.set()

    async def _loop(self) -> None:
        await periodic(self.tick, self.tick_interval, self.log, "job queue tick", wake=self._wake)

    # -- API

    async def submit(
        self, owner: str, groups: list[str], spec: JobSpec, traceparent: str | None = None, admin: bool = False
    ) -> tuple[JobRow, bool]:
        """Queue a job for ``owner`` (``groups``: the owner's groups, for group quotas; ``admin``: the owner is
        an admin, whose ``spec.priority`` counts among all users' jobs, not only among the owner's own).

        ``traceparent`` (default: the current span's) becomes the parent of each attempt's
        trace. Returns ``(row, created)``; ``created`` is False when ``spec.idempotency_key``
        matched an existing job of the owner, which is returned. Raises ``SubmissionsLimited`` past
        the owner's ``submit_rate``, ``QueueFull`` at ``max_queued``.
        """
        self.limit_submissions(owner)
        traceparent = traceparent or tracing.inject({}).get("traceparent")
        row, created = await self.store.db.run(
            self.store.create_job, owner, groups, spec, traceparent, max_queued=self.max_queued, admin=admin
        )
        if created:
            self.kick()
        return row, created

    def limit_submissions(self, owner: str) -> None:
        """Count a submission of ``owner`` (a job, or a pipeline's steps at once); raises ``SubmissionsLimited``
        past ``submit_rate``."""
        if not owner or "/" in owner or owner.startswith("."):
            raise ValueError(f"owner {owner!r} cannot name a job directory")
        if wait := self._submissions.take(owner):
            raise SubmissionsLimited(
                f"{owner} submits more than {self.submit_rate:g} jobs a second "
                f"(JobQueue.submit_rate, burst {self.submit_burst})",
                retry_after=wait,
            )

    async def cancel(self, job_id: str, by: str) -> JobRow:
        """Cancel a queued job, or stop a running one (SIGTERM, ``cancel_grace``, SIGKILL) and wait.

        Raises ``JobNotFound``, or ``JobStateError`` if the job has already finished.
        """
        return await self._cancel(job_id, f"cancelled by {by}")

    async def _cancel(self, job_id: str, reason: str) -> JobRow:
        async with self._lock:
            row = await self.store.db.run(self.store.get_job, job_id)
            if row.state == "queued" or (row.state == "dispatching" and not row.handle):
                return await self.store.db.run(self.store.transition, job_id, "cancelled", reason)
            if row.state not in ("dispatching", "running"):
                raise JobStateError(f"job {job_id} is {row.state}: nothing to cancel")
            if row.id in self._stopping:  # a preemption or timeout is stopping it: it ends cancelled, not requeued
                self._cancelled[row.id] = reason
            task = self._begin_stop(row, "cancelled", reason)
        await task
        return await self.store.db.run(self.store.get_job, job_id)

    def cancel_all_of(self, owner: str, reason: str) -> asyncio.Task:
        """Cancel every unfinished job of ``owner`` (a deleted user) in the background.

        Callable from synchronous code running in the event loop; returns the task.
        """
        task = asyncio.ensure_future(self._cancel_all(owner, reason))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _cancel_all(self, owner: str, reason: str) -> None:
        rows, _ = await self.store.db.run(
            self.store.list_jobs, owner=owner, state=list(UNFINISHED_STATES), limit=100_000
        )
        await self.cancel_each([r.id for r in rows], reason)

    async def cancel_each(self, job_ids: list[str], reason: str) -> None:
        """Cancel these jobs together (a pipeline's, an array's, a deleted user's) and wait; one that ended or went
        meanwhile is left as it is, one that could not be cancelled is logged."""
        results = await asyncio.gather(*(self._cancel(i, reason) for i in job_ids), return_exceptions=True)
        for job_id, result in zip(job_ids, results, strict=True):
            if isinstance(result, Exception) and not isinstance(result, JobStateError | JobNotFound):
                self.log.error("could not cancel job %s: %s", job_id, result)

    def job_model(self, row: JobRow) -> Job:
        """The API view of ``row``; ``log_size`` is that of the latest attempt's log."""
        try:
            size = self.attempts.log_path(row).stat().st_size if row.attempt else 0
        except FileNotFoundError:
            size = 0
        return row.to_model(log_size=size)

    async def job_detail(self, row: JobRow) -> Job:
        """:meth:`job_model`, and for a queued job its queue position and, when it holds a reservation (of its pool
        or its cohort's quota), its estimated start."""
        model = self.job_model(row)
        if row.state == "queued":
            model.queue_position = await self.store.db.run(self.store.queue_position, row)
            if (held := self.reservations.held_by(row.id)) and held.start:
                model.estimated_start = iso(held.start)
        return model

    async def read_logs(self, row: JobRow, offset: int, limit: int) -> bytes:
        """Up to ``limit`` bytes of the latest attempt's log from ``offset``."""
        if not row.handle:
            return b""
        return await self.executor.read_logs(Handle(**row.handle), self.attempts.log_path(row), offset, limit)

    async def capacity(self) -> dict[str, PoolCapacity]:
        """The executor's pools, each marked draining where an admin drains it (raises ``ExecutorUnavailable``)."""
        capacity = await self.executor.capacity()
        draining = await self.store.db.run(self.store.draining_pools)
        return {name: replace(cap, draining=name in draining) for name, cap in capacity.items()}

    async def pools(self) -> list[PoolStatus]:
        """Capacity, use and queue length per pool (raises ``ExecutorUnavailable``)."""
        capacity = await self.capacity()
        used, queued = await self.store.db.run(lambda: (self.store.usage("pool"), self.store.queued_count()))
        return views.pool_views(capacity, used, queued)

    async def quota(self, owner: str, groups: list[str], admin: bool = False) -> Quota:
        """The owner's limits and usage, those of each of ``groups`` with a quota, and their cohorts (an admin's:
        every cohort)."""
        cohorts = self.cohort_quotas  # only the shown groups' and the owner's fair-share usage is read
        shown = views.shown_cohorts(cohorts, groups, admin)
        keys = [fair_share.user_key(owner)] + [fair_share.group_key(g) for c in shown for g in cohorts.members[c]]
        usage, active, history = await self.store.db.run(
            lambda: (
                self.store.usage("owner"),
                self.store.active_jobs(),
                self.store.fair_share_usage(self.usage_half_life, keys),
            )
        )
        return views.quota_view(
            usage.get(owner, Usage()),
            self._limits().user,
            groups,
            self.group_quotas,
            active,
            self.cohort_quotas,
            fair_share.Shares(history, self.fair_share_weights),
            owner,
            every_cohort=admin,
        )

    # -- scheduling

    async def tick(self) -> None:
        """Poll running attempts, then dispatch what fits; database work runs in a thread."""
        async with self._lock:
            active = await self.store.db.run(self.store.active_jobs)
            await self._sample_usage(active)
            for row in active:
                if not row.handle or row.id in self._stopping:
                    continue
                try:
                    outcome = await self.executor.poll(Handle(**row.handle))
                    await self._settle(row, outcome)
                except ExecutorUnavailable as e:
                    self.log.warning("cannot poll job %s: %s", row.id, e)
                except Exception as e:  # one job that cannot be handled must not stop the others
                    self.log.exception("job %s cannot be handled; stopping it", row.id)
                    self._begin_stop(row, "failed", f"gpulab could not handle this job: {type(e).__name__}: {e}")
            await self.store.db.run(dependencies.resolve, self.store)
            await self._dispatch_queued()

    async def _sample_usage(self, active: list[JobRow]) -> None:
        """Every ``usage_sample_interval``, charge what active jobs held since the last charge to their owners' and
        cohort groups' fair-share usage."""
        now = utcnow()
        elapsed = (now - self._sampled_at).total_seconds()
        if elapsed < self.usage_sample_interval:
            return
        self._sampled_at = now

        def held(row: JobRow) -> float:
            return min(elapsed, (now - row.started_at).total_seconds()) if row.started_at else 0.0

        amounts = fair_share.charges(active, held, self._usage_weights(), self.cohort_quotas.group_of)
        await self.store.db.run(self.store.charge_usage, amounts, self.usage_half_life)

    async def _charge_rest(self, row: JobRow) -> None:
        """Charge an attempt that ended what it held since the last sample (or its start), which no sample will."""
        if row.started_at is None:
            return
        since = max(row.started_at, self._sampled_at)
        seconds = max((utcnow() - since).total_seconds(), 0.0)
        amounts = fair_share.charges([row], lambda _: seconds, self._usage_weights(), self.cohort_quotas.group_of)
        await self.store.db.run(self.store.charge_usage, amounts, self.usage_half_life)

    def _usage_weights(self) -> dict[str, float]:
        return {**fair_share.DEFAULT_WEIGHTS, **self.usage_weights}

    async def _settle(self, row: JobRow, outcome: Outcome) -> None:
        """Apply a polled outcome: note a pending attempt's progress or start, enforce ``max_runtime``,
        or save the ended attempt's log and finish or retry with backoff."""
        if outcome.state == "starting":
            reason = f"attempt {row.attempt} submitted to {self.executor.name}: {outcome.reason}"
            if row.state_reason != reason:
                await self.store.db.run(self.store.annotate, row.id, reason)
            return
        if outcome.state == "running" and row.state == "dispatching":
            await self.store.db.run(self.store.transition, row.id, "running", f"attempt {row.attempt} started")
            return
        if outcome.state == "running":
            limit = row.spec.get("max_runtime")
            if limit and utcnow() - row.started_at > timedelta(seconds=limit):
                self._begin_stop(row, "timed_out", f"max_runtime of {limit}s exceeded")
            return
        await self._save_logs(row)
        await self._charge_rest(row)
        to, why, fields = outcome.state, outcome.reason or outcome.state, {}
        tries = row.attempt - (row.preemptions or 0)  # a preempted attempt uses no retry
        delay = policy.retry_delay(tries, row.max_retries, self.retry_backoff, self.retry_backoff_max)
        if to != "succeeded" and delay is not None:
            to, why = "queued", f"retry {tries + 1}/{row.max_retries + 1} after: {why}"
            fields = {"not_before": utcnow() + timedelta(seconds=delay)}
        elif to != "succeeded":
            to = "failed"
        await self.store.db.run(
            self.store.transition, row.id, to, why, exit_code=outcome.exit_code, preempted=False, **fields
        )

    def _begin_stop(self, row: JobRow, state: str, reason: str, grace: float | None = None, **fields) -> asyncio.Task:
        """Stop the attempt (SIGTERM, ``grace`` s, default ``cancel_grace``, SIGKILL), then move the job to
        ``state`` with ``fields``."""
        if row.id not in self._stopping:
            task = asyncio.create_task(self._stop(row, state, reason, grace, fields))
            task.add_done_callback(self._stop_done)
            self._stopping[row.id] = task
        return self._stopping[row.id]

    async def _stop(self, row: JobRow, state: str, reason: str, grace: float | None, fields: dict) -> None:
        try:
            await self.executor.cancel(Handle(**row.handle), self.cancel_grace if grace is None else grace)
            await self._save_logs(row)
            await self._charge_rest(row)
            if cancelled := self._cancelled.pop(row.id, None):
                state, reason, fields = "cancelled", cancelled, {}
            await self.store.db.run(self.store.transition, row.id, state, reason, **fields)
        finally:
            del self._stopping[row.id]
            self.kick()

    async def _save_logs(self, row: JobRow) -> None:
        try:
            await self.executor.save_logs(Handle(**row.handle), self.attempts.log_path(row))
        except (ExecutorUnavailable, OSError, ValueError) as e:  # the executor may still have it
            self.log.warning("could not save the log of job %s attempt %s: %s", row.id, row.attempt, e)

    def _stop_done(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.log.error("stopping a job failed: %s", task.exception())

    async def _dispatch_queued(self) -> None:
        """Dispatch due queued jobs in turn order (:func:`~.policy.turn`: within nominal quota before borrowers, an
        admin's priority, fair share, age; each owner's own jobs by their priority) while they fit and delay no
        reservation (:class:`~.backfill.Reservations`), record why the others wait, choose the next reservations'
        holders, and preempt for a waiting job when nothing started.

        Only candidates are read: jobs that fit their pool's free capacity and their owner's GPU quota,
        at most as many per owner as the owner's ``max_jobs`` allows (more are read when those run
        out). Usage only grows during a pass, so a job left out could not have started in it either.
        """
        if not await self.store.db.run(self.store.any_queued):
            return
        try:
            capacity = await self.capacity()
        except ExecutorUnavailable as e:
            why = f"waiting: executor unavailable: {e}"
            await self.store.db.run(self.store.set_waiting_reasons, lambda job: why)
            return
        usage = await self.store.db.run(self.store.fair_share_usage, self.usage_half_life)
        ledger = Ledger(self.cohort_quotas, shares=fair_share.Shares(usage, self.fair_share_weights))
        limits = self._limits()
        active = await self.store.db.run(self.store.active_jobs)
        for row in active:
            ledger.charge(row, (row.handle or {}).get("gpu_ids", []))
        gate = cache(self._attested)  # read once per pass, if an `attestation: required` job needs it
        now = utcnow()
        waiting = await self.store.db.run(self.store.oldest_waiting, capacity, ledger, WAITING_READ)
        reservations, holders = self.reservations, []
        if self.backfill and (held := reservations.holders()):
            holders = await self.store.db.run(self.store.queued_jobs, True, [JobRow.id.in_(held)])
        reservations.begin(holders, capacity, ledger, limits, active, now)
        started, blocked, penalties = False, [], {}
        heads: dict[str, deque] = {}
        more = set()  # owners who may have more candidates than read so far
        for row in await self.store.db.run(self.store.candidates, capacity, ledger, limits):
            heads.setdefault(row.owner, deque()).append(row)
        more.update(o for o, queue in heads.items() if len(queue) == limits.room(ledger.owners[o]))
        while heads:  # each owner's head is their own highest-priority job
            owner = min(heads, key=lambda o: self._turn(heads[o][0], ledger))
            row = heads[owner].popleft()
            if not heads[owner]:
                del heads[owner]
            attested, blocker = None, policy.blocker(row, capacity, ledger, limits)
            if not blocker:
                blocker = reservations.delayed(row, ledger, now)
            else:
                blocked.append((row, scope_of(row, blocker, capacity, ledger)))
            if not blocker and row.attestation_required:
                attested, blocker = gate()
            if not blocker:
                gpu_ids = policy.gpu_ids(row, capacity, ledger) if self.executor.owns_gpu_ids and row.gpus else []
                if await self._dispatch(row, gpu_ids, attested):
                    ledger.charge(row, gpu_ids)
                    started = True
                    self._charge_entry(row, ledger, penalties)
            if owner in more and owner not in heads:
                more.discard(owner)
                room = limits.room(ledger.owners[owner])
                if room and (
                    rows := await self.store.db.run(self.store.candidates, capacity, ledger, limits, owner, row)
                ):
                    heads[owner] = deque(rows)
                    if len(rows) == room:
                        more.add(owner)

        def reason(job) -> str | None:
            blocker = policy.blocker(job, capacity, ledger, limits)
            blocker = blocker or reservations.delayed(job, ledger, now, take=False)
            return blocker or (gate()[1] if job.attestation_required else None)

        await self.store.db.run(self.store.set_waiting_reasons, reason)
        await self.store.db.run(self.store.charge_usage, penalties, self.usage_half_life)
        blocked += [(h, scope_of(h, policy.blocker(h, capacity, ledger, limits), capacity, ledger)) for h in waiting]
        if self.backfill:
            reservations.choose(blocked, capacity, ledger)
        if not started:  # what is active is as read: preempt for a waiting job that preemption lets start
            first = sorted((row for row, _ in blocked), key=lambda head: self._turn(head, ledger))
            self._preempt(first[:PREEMPTION_PLANS], capacity, limits, active, now)

    def _charge_entry(self, row, ledger: Ledger, penalties: dict[str, float]) -> None:
        """Charge a job that starts its fair-share entry penalty, in this pass's shares and in ``penalties``."""
        penalty = fair_share.charges(
            [row], lambda _: self.fair_share_entry_penalty, self._usage_weights(), ledger.cohorts.group_of
        )
        ledger.shares.add(penalty)
        for key, amount in penalty.items():
            penalties[key] = penalties.get(key, 0.0) + amount

    def _preempt(self, waiting: list, capacity: dict[str, PoolCapacity], limits: policy.Limits, active: list, now):
        """Stop the victims (:mod:`.preemption`) of the first of ``waiting`` (in turn order) that preempting lets
        start, each requeued with ``preempted`` and its reason; one preemption at a time, so that the next pass,
        once they are gone, starts the job they made room for."""
        if any(victim in self._stopping for victim in self._preempting) or not any(r.preemptible for r in active):
            return
        self._preempting.clear()
        for job in waiting:
            plan = preemption.plan(
                job,
                active,
                capacity,
                limits,
                self.cohort_quotas,
                now,
                self.preemption_min_runtime,
                busy=lambda victim: victim.id in self._stopping,
            )
            if plan is None:
                continue
            for victim in plan.victims:
                self.log.info("preempting job %s for job %s: %s", victim.id, job.id, plan.reasons[victim.id])
                self._preempting.add(victim.id)
                self._begin_stop(
                    victim,
                    "queued",
                    f"preempted by job {job.id}: {plan.reasons[victim.id]}",
                    grace=self.preemption_grace,
                    preempted=True,
                    preemptions=(victim.preemptions or 0) + 1,
                    not_before=None,
                )
            return

    @staticmethod
    def _turn(head, ledger: Ledger) -> tuple:
        return policy.turn(head, ledger.owners[head.owner], ledger.borrows(head), ledger.share(head))

    def _limits(self) -> policy.Limits:
        """The quotas in force: ``user_quota`` over the defaults (a config may set only some limits)."""
        return policy.Limits({**DEFAULT_USER_QUOTA, **self.user_quota}, self.group_quotas)

    def _attested(self) -> tuple[NodeState | None, str | None]:
        """For ``attestation: required`` jobs: ``(node state, None)`` if the node they would run on
        is attested and fresh, else ``(None, why they wait)``."""
        node = self.executor.node_name
        if node is None:
            why = f"attestation gating is not supported on the {self.executor.name} executor yet"
        elif self.attestation is None:
            why = "no attestation service is configured"
        else:
            state, why = self.attestation.nodes.gate(node, self.attestation_max_age)
            if why is None:
                return state, None
            why = f"node {node}: {why}"
        return None, f"waiting: attestation required: {why}"

    async def _dispatch(self, row: JobRow, gpu_ids: list[int], attested: NodeState | None = None) -> bool:
        """queued -> dispatching (committed) -> executor.start -> running; False if it did not start.

        ``attested``: the node state that let an ``attestation: required`` job through; its token's
        fingerprint is stored with the job and given to the attempt as ``GPULAB_ATTESTATION_FINGERPRINT``.
        """
        attempt = row.attempt + 1
        private = self.executor.env_is_private
        token = secrets.token_urlsafe(32) if private else None  # else minted when the runner claims it
        gate = {"attestation_fingerprint": attested.fingerprint, "attestation_node": attested.node} if attested else {}
        row = await self.store.db.run(
            self.store.transition,
            row.id,
            "dispatching",
            f"starting attempt {attempt}",
            attempt=attempt,
            executor=self.executor.name,
            handle=None,
            not_before=None,
            job_token_hash=token_hash(token) if token else None,
            started_at=None,  # the attempt's own, once running (a requeued job's was the last attempt's)
            **gate,
        )
        parent = tracing.extract({"traceparent": row.traceparent} if row.traceparent else {})
        with tracing.tracer(__name__).start_as_current_span("job.dispatch", context=parent) as span:
            span.set_attribute("gpulab.job_id", row.id)
            launch = await self.attempts.launch(row, attempt, token, gpu_ids, attested)
            try:
                handle = await self.executor.start(launch)
            except ExecutorUnavailable as e:
                await self.store.db.run(
                    self.store.transition,
                    row.id,
                    "queued",
                    f"waiting: executor unavailable: {e}",
                    attempt=row.attempt - 1,
                )
                return False
            except Exception as e:
                self.log.exception("could not start job %s", row.id)
                await self.store.db.run(self.store.transition, row.id, "failed", f"could not start: {e}")
                return False
        if self.executor.start_pending:  # `running` once a poll says so
            reason = f"attempt {attempt} submitted to {self.executor.name}"
            await self.store.db.run(self.store.annotate, row.id, reason, handle=asdict(handle))
        else:
            await self.store.db.run(
                self.store.transition, row.id, "running", f"attempt {attempt} started", handle=asdict(handle)
            )
        return True

    async def claim_credentials(self, job_id: str, ticket: str) -> dict[str, str]:
        """The secrets left out of an attempt's environment (:data:`JOB_SECRET_ENV`), for the runner that shows
        the attempt's ticket, once: the job token is minted now. Raises :class:`ClaimRefused`."""
        row = await self.store.db.run(self.store.get_job, job_id)
        if row.state not in ("dispatching", "running") or not hmac.compare_digest(
            ticket, self.attempts.ticket(row.id, row.attempt)
        ):
            raise ClaimRefused(403, "this ticket is not that of the job's current attempt")
        token = secrets.token_urlsafe(32)
        if not await self.store.db.run(self.store.claim_job_token, row.id, row.attempt, token):
            raise ClaimRefused(409, f"the credentials of attempt {row.attempt} were claimed already")
        attempts = self.attempts
        env = {**attempts.env(row, JobSpec.model_validate(row.spec)), **attempts.token_env(row, token)}
        return {name: env[name] for name in JOB_SECRET_ENV if name in env}
