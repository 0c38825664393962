"""``python -m gpulab.services.jobs``: the hub-managed job service.

Configured like any hub-managed service (``JUPYTERHUB_SERVICE_URL``, ``JUPYTERHUB_SERVICE_PREFIX``,
``JUPYTERHUB_API_TOKEN``, ``JUPYTERHUB_API_URL``) plus ``gpulab_config.py`` (``c.JobQueue``,
``c.JobStore``, ``c.Scheduler``, ``c.Notifier``, executor settings, ``c.Attestation``), read once by :class:`JobsApp`; the hub adds where the
platform's MLflow is (``c.JobQueue.mlflow_tracking_uri``, unless set) in ``$GPULAB_CONFIG_OVERRIDES``. The
attestation service, and with it the NRAS API key (``c.Attestation.api_key_file`` or ``$GPULAB_NRAS_API_KEY``
in this service's environment), lives here and never in users' servers.

Under isolation 'accounts' it starts as root (the hub's account), splits off the small root launcher
that starts jobs as their owners' accounts (:mod:`.executors.launcher`) and runs as the service account
(``Platform.service_account``) from then on; ``<data dir>/jobs/`` is that account's.
"""

import asyncio
import json
import logging
import os
from urllib.parse import urlsplit

from tornado import httputil, web

from ... import accounts
from ...attestation import AttestationService
from ...attestation.nras import ENV_VAR as NRAS_KEY_VAR
from ...errors import ConfigError
from ...events.subscriber import AppliedEvents, UserEventsHandler
from ...secrets import read_secret_file
from ...service.app import ServiceApp
from ...service.errors import APIError, error_body
from ...service.handlers import too_large
from . import attestation_api, handlers, notifications_api, openapi, pipelines_api, schedules_api
from .executors.launcher import LauncherClient, split_privileges
from .executors.local import LocalExecutor
from .executors.ray import RayExecutor
from .handlers import BaseHandler
from .metrics import LOOP_LAG, MetricsHandler
from .models import MAX_BODY
from .notifications import Notifier
from .queue import JobQueue
from .schedules import Scheduler
from .store import JobStore

log = logging.getLogger("gpulab.jobs")
JOBS_DIR_MODE = 0o711  # jobs pass through it to their own work dirs
# A body sent in chunks (no Content-Length) is read up to this, so that one over MAX_BODY gets its 413
# (BaseHandler.prepare); past it tornado drops the connection. One with a Content-Length over MAX_BODY is read
# and dropped, up to DROP_BODIES, by DropLargeBodies.
READ_BODIES = 64 * 1024 * 1024
DROP_BODIES = 2**40


class BoundedApplication(web.Application):
    """The API: a request declaring a body over MAX_BODY is answered 413 without reaching a handler."""

    def start_request(self, server_conn, request_conn):
        return DropLargeBodies(super().start_request(server_conn, request_conn), request_conn)


class DropLargeBodies(httputil.HTTPMessageDelegate):
    """Reads a body declared over MAX_BODY and drops it, then answers 413: answered before it is read, tornado
    would close the connection on the unread bytes, and the hub's proxy, still sending them, would show the
    user an HTML 503 instead. Any other request goes to the application as it came."""

    def __init__(self, delegate: httputil.HTTPMessageDelegate, connection: httputil.HTTPConnection):
        self.delegate, self.connection = delegate, connection
        self.length: int | None = None  # of a body being dropped

    def headers_received(self, start_line, headers):
        declared = headers.get("Content-Length", "")
        if declared.isdigit() and MAX_BODY < int(declared) <= DROP_BODIES:
            self.length = int(declared)
            self.connection.set_max_body_size(self.length)
            return None
        return self.delegate.headers_received(start_line, headers)

    def data_received(self, chunk):
        if self.length is None:
            return self.delegate.data_received(chunk)
        return None

    def finish(self):
        if self.length is None:
            return self.delegate.finish()
        body = json.dumps(error_body("too_large", too_large(self.length, MAX_BODY))).encode()
        self.connection.write_headers(
            httputil.ResponseStartLine("HTTP/1.1", 413, "Payload Too Large"),
            httputil.HTTPHeaders({"Content-Type": "application/json", "Content-Length": str(len(body))}),
            body,
        )
        self.connection.finish()
        return None

    def on_connection_close(self):
        if self.length is None:
            self.delegate.on_connection_close()


class NotFoundHandler(BaseHandler):
    def prepare(self):
        raise APIError(404, f"no such endpoint: {self.request.path}", code="not_found")


def api_handlers(prefix: str) -> list:
    """Routes under ``<prefix>api/v1``: each API module's ``default_handlers``."""
    api = prefix.rstrip("/") + "/api/v1"
    routes = [
        *handlers.default_handlers,
        *schedules_api.default_handlers,
        *pipelines_api.default_handlers,
        *notifications_api.default_handlers,
        *attestation_api.default_handlers,
    ]
    return [(api + path, handler) for path, handler in routes]


class JobsApp(ServiceApp):
    """``python -m gpulab.services.jobs``."""

    name = "gpulab-jobs"
    description = "The hub-managed training job service."
    classes = [JobStore, JobQueue, Scheduler, Notifier, LocalExecutor, RayExecutor]

    def initialize(self, argv=None) -> None:
        super().initialize(argv)
        self.hub.require("service_url", "api_token")
        self.launcher, self.key_source = self.split_off_launcher()

    def split_off_launcher(self) -> tuple[LauncherClient | None, str | None]:
        """Under isolation 'accounts': the root launcher started, and this process the service account for good
        (``<data dir>/jobs/`` given to it first, with what an earlier run as root left there; what users' accounts
        own in it stays theirs), and the NRAS key file it read first; (None, None) otherwise. Blocking, before any
        thread or event loop."""
        if accounts.isolation_mode(self.platform) != "accounts":
            return None, None
        attestation = self.config.Attestation
        if key_file := attestation.get("api_key_file"):  # may be root's alone (0600): read it while root
            os.environ[NRAS_KEY_VAR] = read_secret_file(key_file, "Attestation.api_key_file").reveal()
            attestation.api_key_file = ""
        policy = accounts.AccountPolicy.from_platform(self.platform)
        try:
            service = accounts.ensure_service_account(policy)
        except accounts.AccountError as e:
            raise ConfigError(f"Platform.service_account: {e}") from None
        jobs_dir = self.data_dir / "jobs"
        accounts.hand_over(jobs_dir, service, mode=JOBS_DIR_MODE, from_root_only=True)
        state_dir = self.config.LocalExecutor.get("state_dir") or str(jobs_dir / ".local-executor")
        return split_privileges(state_dir, policy, service), key_file or None

    def build_queue(self) -> JobQueue:
        """The queue and store, with platform defaults filled in."""
        jobs_dir = self.data_dir / "jobs"
        jobs_dir.mkdir(parents=True, exist_ok=True, mode=JOBS_DIR_MODE)
        jobs_dir.chmod(JOBS_DIR_MODE)
        store = JobStore(parent=self, url=self.config.JobStore.get("url") or f"sqlite:///{jobs_dir / 'jobs.sqlite'}")
        queue = JobQueue(parent=self, store=store, data_dir=str(self.data_dir))
        if isinstance(queue.executor, LocalExecutor) and self.launcher is not None:
            queue.executor.launcher = self.launcher
        if not queue.jobs_api_url:
            queue.jobs_api_url = self.hub.service_url.rstrip("/") + self.hub.prefix + "api/v1"
        return queue

    def build_attestation(self) -> AttestationService:
        """The attestation service from ``c.Attestation``; logs where the NRAS API key came from (never the key):
        the key file read before leaving root, else the service's own setting."""
        service = AttestationService.from_config(self.config)
        key = service.nras.api_key
        source = self.key_source or (key.source if key else None)
        log.info("attestation: %s", f"NRAS API key from {source}" if key else "no NRAS API key configured")
        return service

    def routes(self, queue: JobQueue, scheduler: Scheduler) -> list:
        """The API, the metrics and the hub's user events (a deleted user's schedules are removed and jobs
        cancelled)."""
        forgetting: set[asyncio.Task] = set()

        def apply_event(event: dict, _session) -> None:
            if event["type"] == "user.deleted":
                task = asyncio.ensure_future(scheduler.forget(event["user"]))  # first: no run starts meanwhile
                forgetting.add(task)
                task.add_done_callback(forgetting.discard)
                queue.cancel_all_of(event["user"], reason=f"user {event['user']} was deleted")

        events = {"token": self.hub.api_token, "applied": AppliedEvents(queue.store.url), "apply": apply_event}
        prefix = self.hub.prefix
        return [
            *api_handlers(prefix),
            (prefix + "metrics", MetricsHandler),
            (prefix + "events", UserEventsHandler, events),
        ]

    def start(self) -> None:
        try:
            super().start()
        finally:
            if self.launcher is not None:
                self.launcher.close()

    async def serve(self, stopping: asyncio.Event) -> None:
        queue = self.build_queue()
        queue.attestation = self.build_attestation()
        scheduler = Scheduler(parent=self, queue=queue)
        notifier = Notifier(parent=self, store=queue.store, data_dir=str(self.data_dir))
        app = self.web_application(
            self.routes(queue, scheduler),
            cls=BoundedApplication,
            queue=queue,
            scheduler=scheduler,
            notifier=notifier,
            attestation=queue.attestation,  # the handlers' own, beside the queue (which gates jobs on node states)
            openapi=openapi.load(),
            default_handler_class=NotFoundHandler,
        )
        address = urlsplit(self.hub.service_url)
        server = app.listen(address.port, address.hostname or "127.0.0.1", max_body_size=READ_BODIES)
        await queue.start()
        lag = asyncio.create_task(LOOP_LAG.run())
        loops = [asyncio.create_task(scheduler.run(stopping)), asyncio.create_task(notifier.run(stopping))]
        await stopping.wait()
        lag.cancel()
        await asyncio.gather(*loops)
        server.stop()
        await queue.stop()  # running jobs keep running; the next start re-attaches them
