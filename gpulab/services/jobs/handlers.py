"""REST handlers of ``gpulab-jobs`` under ``<service prefix>api/v1/``."""

import asyncio
import json
import math
import re
import time
from contextlib import contextmanager
from types import SimpleNamespace

from jupyterhub.services.auth import check_scopes
from tornado import web
from tornado.iostream import StreamClosedError

from ... import scopes
from ...job_states import JOB_STATES, TERMINAL_STATES, UNFINISHED_STATES
from ...service.errors import APIError
from ...service.handlers import HubUserHandler, ServiceHandler
from .executors.base import ExecutorUnavailable
from .metrics import REQUESTS, SUBMITTED
from .models import (
    MAX_ARRAY,
    MAX_BODY,
    JobCredentials,
    JobIdentity,
    JobList,
    JobSpec,
    JobUpdate,
    PoolUpdate,
    ProgressUpdate,
    TrackingUpdate,
)
from .queue import ClaimRefused, SubmissionsLimited
from .store import BadDependency, JobNotFound, JobStateError, QueueFull

MAX_LIST = 500
ID_PATTERN = re.compile(r"[0-9a-f]{32}")  # of jobs, schedules, arrays and pipelines
MAX_INTEGER = 2**40  # beyond any log offset or row id


@contextmanager
def submission_limits():
    """The 429s of a submission past its owner's rate (``JobQueue.submit_rate``, with Retry-After) or queue cap
    (``JobQueue.max_queued``)."""
    try:
        yield
    except SubmissionsLimited as e:
        raise APIError(
            429, str(e), code="rate_limited", headers={"Retry-After": str(math.ceil(e.retry_after))}
        ) from None
    except QueueFull as e:
        raise APIError(429, str(e), code="max_queued") from None


class BaseHandler(ServiceHandler):
    """The job service's: its body cap, its request metrics, the queue."""

    log_name = "gpulab-jobs"
    max_body = MAX_BODY
    requests_metric = REQUESTS

    @property
    def queue(self):
        return self.settings["queue"]

    @property
    def store(self):
        return self.settings["queue"].store

    def flag(self, name: str) -> bool:
        """A boolean query parameter: true/1 or false/0 (absent: false); anything else is a 400 naming it."""
        value = self.get_argument(name, "false").lower()
        if value not in ("1", "true", "0", "false"):
            raise APIError(400, f"{name} must be true or false", field=name)
        return value in ("1", "true")

    def integer(self, name: str, default: int | None, maximum: int = MAX_INTEGER, minimum: int = 0) -> int | None:
        """An integer query parameter from ``minimum`` to ``maximum`` (absent: ``default``); anything else is a 400
        naming it."""
        raw = self.get_argument(name, None)
        if raw is None:
            return default
        try:
            value = int(raw) if len(raw) <= 20 else None
        except ValueError:
            value = None
        if value is None:
            raise APIError(400, f"{name} must be an integer", field=name)
        if not minimum <= value <= maximum:
            raise APIError(400, f"{name} must be between {minimum} and {maximum}", field=name)
        return value

    def object_id(self, name: str) -> str | None:
        """A query parameter naming a job, schedule, array or pipeline by its id (32 hex digits); else a 400."""
        value = self.get_argument(name, None)
        if value is not None and not ID_PATTERN.fullmatch(value):
            raise APIError(400, f"{name} must be an id (32 hex digits)", field=name)
        return value


class UserHandler(HubUserHandler, BaseHandler):
    """A request from a hub user with the gpulab scope ``required_scope``."""

    required_scope = scopes.JOBS

    async def owned(self, find, object_id: str, what: str):
        """What ``find(object_id)`` returns (raising ``LookupError`` when there is none: a job, a schedule, a
        pipeline), if the caller may see it (owner or admin); a 404 naming ``id`` otherwise, the same either way."""
        try:
            row = await self.store.db.run(find, object_id)
        except LookupError:
            row = None
        if row is None or (row.owner != self.user_name and not self.is_admin):
            raise APIError(404, f"no {what} {object_id}", field="id", code="not_found")
        return row

    async def job(self, job_id: str):
        return await self.owned(self.store.get_job, job_id, "job")

    def check_job(self, spec: JobSpec, at: str = "") -> None:
        """What the caller may submit: GPUs only with the scope (:meth:`check_gpus`), a ``group`` only of their
        own groups' and one that is in a cohort; a 4xx naming the field otherwise."""
        self.check_gpus(spec, at)
        if spec.group is None:
            return
        if spec.group not in (self.current_user.get("groups") or []):
            raise APIError(403, f"you are not in group '{spec.group}'", field=f"{at}group", code="forbidden")
        cohorts = self.queue.cohort_quotas
        if spec.group not in cohorts.cohort_of:
            known = ", ".join(sorted(cohorts.cohort_of)) or "none are configured"
            raise APIError(
                400,
                f"group '{spec.group}' is in no cohort of JobQueue.cohorts (groups with a cohort quota: {known})",
                field=f"{at}group",
            )

    def check_gpus(self, spec: JobSpec | JobUpdate, at: str = "") -> None:
        """A 403 naming the field (``<at>resources.gpus``) when ``spec`` asks for GPUs and the caller may not."""
        if spec.resources.gpus > 0 and not self.has(scopes.GPU):
            raise APIError(
                403, f"requesting GPUs needs the {scopes.GPU} scope", field=f"{at}resources.gpus", code="forbidden"
            )


class JobsHandler(UserHandler):
    async def post(self):
        spec = self.parse(JobSpec)
        self.check_job(spec)
        groups = self.current_user.get("groups") or []
        try:
            with submission_limits():
                row, created = await self.queue.submit(
                    self.user_name,
                    groups,
                    spec,
                    admin=self.is_admin,
                    traceparent=self.request.headers.get("traceparent"),
                )
        except BadDependency as e:
            raise APIError(422, f"{e.field}: {e}", field=e.field, code="invalid") from None
        if created:
            SUBMITTED.labels(row.pool).inc(spec.array.count if spec.array else 1)
        self.write_json(self.queue.job_model(row), 201 if created else 200)

    async def get(self):
        owner = self.get_argument("owner", None)
        if owner and owner != self.user_name and not self.is_admin:
            raise APIError(403, "only admins may list other users' jobs", field="owner", code="forbidden")
        if not owner and not (self.flag("all") and self.is_admin):
            owner = self.user_name
        states = self.get_arguments("state")
        if unknown := [s for s in states if s not in JOB_STATES]:
            raise APIError(400, f"state {unknown[0]!r} is not one of {', '.join(JOB_STATES)}", field="state")
        limit = self.integer("limit", 50, MAX_LIST, minimum=1)
        schedule, array = self.object_id("schedule"), self.object_id("array")
        labels = {}
        for item in self.get_arguments("label"):
            key, sep, value = item.partition("=")
            if not sep:
                raise APIError(400, f"label filter {item!r} must be key=value", field="label")
            labels[key] = value
        try:
            rows, cursor = await self.store.db.run(
                self.store.list_jobs,
                owner=owner,
                state=states or None,
                labels=labels,
                limit=limit,
                cursor=self.get_argument("cursor", None),
                schedule_id=schedule,
                array_id=array,
            )
        except ValueError:
            raise APIError(400, "cursor is not one this API returned", field="cursor") from None
        self.write_json(JobList(jobs=[self.queue.job_model(r) for r in rows], next_cursor=cursor))


class ArrayCancelHandler(UserHandler):
    """Cancel every job of a job array that has not ended (running ones are stopped as a job's cancel stops
    them); waits, then answers the array's jobs by index."""

    def members(self, array_id: str) -> SimpleNamespace:
        """The array's jobs by index, with their ``owner`` (``LookupError`` when there are none)."""
        rows, _ = self.store.list_jobs(array_id=array_id, limit=MAX_ARRAY)
        if not rows:
            raise JobNotFound(array_id)
        return SimpleNamespace(owner=rows[0].owner, rows=sorted(rows, key=lambda r: r.array_index))

    async def post(self, array_id):
        array = await self.owned(self.members, array_id, "job array")
        unfinished = [r.id for r in array.rows if r.state in UNFINISHED_STATES]
        await self.queue.cancel_each(unfinished, f"cancelled by {self.user_name}")
        rows = (await self.owned(self.members, array_id, "job array")).rows
        self.write_json(JobList(jobs=[self.queue.job_model(r) for r in rows], next_cursor=None))


class JobHandler(UserHandler):
    async def get(self, job_id):
        self.write_json(await self.queue.job_detail(await self.job(job_id)))

    async def delete(self, job_id):
        row = await self.job(job_id)
        if row.state not in TERMINAL_STATES:
            raise APIError(409, f"job {job_id} is {row.state}; cancel it first", field="state", code="conflict")
        await self.store.db.run(self.store.delete_job, job_id)
        self.set_status(204)
        self.finish()

    async def patch(self, job_id):
        """Change a queued job: priority, resources, hold or release."""
        await self.job(job_id)
        change = self.parse(JobUpdate)
        if change.resources is not None:
            self.check_gpus(change)
        try:
            row = await self.store.db.run(self.store.change_queued, job_id, self.user_name, self.is_admin, change)
        except JobStateError as e:
            raise APIError(409, str(e), field="state", code="conflict") from None
        except JobNotFound:
            raise APIError(404, f"no job {job_id}", field="id", code="not_found") from None
        self.queue.kick()
        self.write_json(self.queue.job_model(row))


class JobEventsHandler(UserHandler):
    async def get(self, job_id):
        await self.job(job_id)
        events = await self.store.db.run(self.store.events, job_id)
        self.write_json({"events": [e.model_dump() for e in events]})


class CancelHandler(UserHandler):
    async def post(self, job_id):
        row = await self.job(job_id)
        try:
            row = await self.queue.cancel(job_id, by=self.user_name)
        except JobStateError:
            raise APIError(
                409, f"job {job_id} already finished ({row.state})", field="state", code="conflict"
            ) from None
        self.write_json(self.queue.job_model(row))


MAX_LOG_READ = 4 * 1024 * 1024  # bytes one log read returns at most


class LogsHandler(UserHandler):
    """The job's log: a byte range (``offset``/``limit``), the ``tail`` lines, or ``follow=true`` as SSE."""

    async def get(self, job_id):
        row = await self.job(job_id)
        offset = self.integer("offset", 0)
        limit = self.integer("limit", 1024 * 1024, MAX_LOG_READ)
        tail = self.get_argument("tail", None)
        if self.flag("follow"):
            return await self._follow(job_id, offset)
        data = await self.queue.read_logs(row, offset, limit)
        if tail is not None:
            data = b"\n".join(data.splitlines()[-self.integer("tail", 0) :])
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.set_header("X-Log-Offset", str(offset + len(data)))
        self.finish(data)

    async def _follow(self, job_id: str, offset: int) -> None:
        """SSE: ``log`` events as the log grows, ``end`` when the job ends, or ``closed`` (``code``, ``message``,
        ``offset``) when the token the stream was opened with stops holding (re-checked with the hub every
        ``JobQueue.log_follow_recheck`` s) or the stream reaches ``JobQueue.log_follow_max``."""
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("Cache-Control", "no-cache")
        token = self.hub_auth.get_token(self)
        opened = checked = time.monotonic()
        while True:
            row = await self.store.db.run(self.store.get_job, job_id)
            data = await self.queue.read_logs(row, offset, 64 * 1024)
            closed = None
            if time.monotonic() - opened >= self.queue.log_follow_max:
                limit = self.queue.log_follow_max
                closed = (
                    "max_duration",
                    f"a followed log stays open {limit:g} s (JobQueue.log_follow_max): follow again from here",
                )
            elif time.monotonic() - checked >= self.queue.log_follow_recheck:
                checked = time.monotonic()
                closed = await self._recheck(token, row)
            try:
                if closed:
                    body = {"code": closed[0], "message": closed[1], "offset": offset}
                    self.write(f"event: closed\ndata: {json.dumps(body)}\n\n")
                    break
                if data:
                    offset += len(data)
                    payload = json.dumps({"offset": offset, "text": data.decode(errors="replace")})
                    self.write(f"event: log\ndata: {payload}\n\n")
                    await self.flush()
                    continue
                if row.state in TERMINAL_STATES:
                    self.write(f"event: end\ndata: {json.dumps({'state': row.state})}\n\n")
                    break
                await self.flush()
            except StreamClosedError:
                return
            await asyncio.sleep(0.5)
        self.finish()

    async def _recheck(self, token: str, row) -> tuple[str, str] | None:
        """Why the stream's token may no longer read ``row``'s log, asking the hub afresh; None if it may."""
        try:
            user = await self.hub_auth.user_for_token(token, use_cache=False, sync=False)
        except web.HTTPError as e:  # the hub cannot tell now: end it rather than stream unchecked
            return "unavailable", f"the hub could not re-check this stream's token ({e.log_message}): follow again"
        if user is None:
            return "revoked", "the token this log was followed with is no longer valid"
        held = set(user.get("scopes", ()))
        if not check_scopes([self.required_scope], held):
            return "revoked", f"{user['name']} no longer holds the {self.required_scope} scope"
        if row.owner != user["name"] and not check_scopes([scopes.ADMIN], held):
            return "revoked", f"{user['name']} may no longer read this job's log"
        return None


class PoolsHandler(UserHandler):
    async def get(self):
        try:
            pools = await self.queue.pools()
        except ExecutorUnavailable as e:
            raise APIError(503, str(e), code="unavailable") from None
        self.write_json({"pools": [p.model_dump() for p in pools]})


class PoolHandler(UserHandler):
    """Admins drain a pool (nothing new starts there; running jobs finish) or undrain it."""

    async def put(self, name):
        if not self.is_admin:
            raise APIError(403, f"draining a pool needs {scopes.ADMIN}", field="name", code="forbidden")
        change = self.parse(PoolUpdate)
        try:
            capacity = await self.queue.capacity()
        except ExecutorUnavailable as e:
            raise APIError(503, str(e), code="unavailable") from None
        if name not in capacity:
            raise APIError(
                404, f"no pool '{name}' (pools: {', '.join(sorted(capacity))})", field="name", code="not_found"
            )
        await self.store.db.run(self.store.set_draining, name, change.draining, self.user_name)
        self.queue.kick()
        pools = await self.queue.pools()
        self.write_json(next(p for p in pools if p.name == name))


class QuotaHandler(UserHandler):
    async def get(self):
        groups = self.current_user.get("groups") or []
        self.write_json(await self.queue.quota(self.user_name, groups, admin=self.is_admin))


class JobCallbackHandler(BaseHandler):
    """Calls from a running job's runner, authenticated with its per-job token."""

    def check_xsrf_cookie(self):
        """Token-authenticated; no cookies involved."""

    async def authorize(self, job_id: str) -> None:
        scheme, _, token = self.request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "job-token" or not token:
            raise APIError(401, "send 'Authorization: job-token <GPULAB_JOB_TOKEN>'", code="unauthenticated")
        try:
            ok = await self.store.db.run(self.store.check_job_token, job_id, token.strip())
        except JobNotFound:
            ok = False
        if not ok:
            raise APIError(403, "job token is not valid for this job", code="forbidden")


class ProgressHandler(JobCallbackHandler):
    async def post(self, job_id):
        await self.authorize(job_id)
        update = self.parse(ProgressUpdate)
        await self.store.db.run(self.store.update_progress, job_id, update.step, update.total, update.metrics)
        self.set_status(204)
        self.finish()


class HeartbeatHandler(JobCallbackHandler):
    async def post(self, job_id):
        await self.authorize(job_id)
        await self.store.db.run(self.store.heartbeat, job_id)
        self.set_status(204)
        self.finish()


class TrackingHandler(JobCallbackHandler):
    async def post(self, job_id):
        await self.authorize(job_id)
        update = self.parse(TrackingUpdate)
        await self.store.db.run(self.store.set_tracking, job_id, update.mlflow_run_id, update.wandb_run_path)
        self.set_status(204)
        self.finish()


class IdentityHandler(JobCallbackHandler):
    """For services that accept a job's token (the MLflow service): valid only while the attempt runs."""

    async def get(self, job_id):
        await self.authorize(job_id)
        row = await self.store.db.run(self.store.get_job, job_id)
        identity = JobIdentity(job_id=row.id, owner=row.owner, groups=row.groups, attempt=row.attempt)
        self.write_json(identity.model_dump())


class CredentialsHandler(JobCallbackHandler):
    """The runner of an attempt started without its secrets (Ray) claims them here, once, with its ticket."""

    async def post(self, job_id):
        scheme, _, ticket = self.request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "job-ticket" or not ticket.strip():
            raise APIError(401, "send 'Authorization: job-ticket <GPULAB_CREDENTIALS_TICKET>'", code="unauthenticated")
        try:
            env = await self.queue.claim_credentials(job_id, ticket.strip())
        except JobNotFound:
            raise APIError(403, "this ticket is not that of the job's current attempt", code="forbidden") from None
        except ClaimRefused as e:
            raise APIError(e.status, str(e), code="forbidden" if e.status == 403 else "claimed") from None
        self.write_json(JobCredentials(env=env))


class OpenAPIHandler(BaseHandler):
    def get(self):
        self.write_json(self.settings["openapi"])


JOB = r"/jobs/(?P<job_id>[0-9a-f]{32})"
# routes under <service prefix>api/v1
default_handlers = [
    ("/openapi.json", OpenAPIHandler),
    ("/jobs", JobsHandler),
    (JOB, JobHandler),
    (JOB + "/events", JobEventsHandler),
    (JOB + "/logs", LogsHandler),
    (JOB + "/cancel", CancelHandler),
    (r"/arrays/(?P<array_id>[0-9a-f]{32})/cancel", ArrayCancelHandler),
    (JOB + "/progress", ProgressHandler),
    (JOB + "/heartbeat", HeartbeatHandler),
    (JOB + "/tracking", TrackingHandler),
    (JOB + "/identity", IdentityHandler),
    (JOB + "/credentials", CredentialsHandler),
    ("/pools", PoolsHandler),
    (r"/pools/(?P<name>[A-Za-z0-9][A-Za-z0-9_.-]{0,63})", PoolHandler),
    ("/quota", QuotaHandler),
]
