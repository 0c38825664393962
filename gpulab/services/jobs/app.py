"""``python -m gpulab.services.jobs``: the hub-managed job service.

Configured like any hub-managed service (``JUPYTERHUB_SERVICE_URL``, ``JUPYTERHUB_SERVICE_PREFIX``,
``JUPYTERHUB_API_TOKEN``, ``JUPYTERHUB_API_URL``) plus ``gpulab_config.py`` (``c.JobQueue``,
``c.JobStore``, executor settings, ``c.Attestation``). The attestation service, and with it the NRAS
API key (``c.Attestation.api_key_file`` or ``$GPULAB_NRAS_API_KEY`` in this service's environment),
lives here and never in users' servers.

Under isolation 'accounts' it starts as root (the hub's account), splits off the small root launcher
that starts jobs as their owners' accounts (:mod:`.executors.launcher`) and runs as the service account
(``Platform.service_account``) from then on; ``<data dir>/jobs/`` is that account's.
"""

import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path
from urllib.parse import urlsplit

from jupyterhub.services.auth import HubOAuth, HubOAuthCallbackHandler
from tornado import httputil, web

from ... import accounts
from ...attestation import AttestationService
from ...attestation.nras import ENV_VAR as NRAS_KEY_VAR
from ...config import instances, load_config
from ...errors import ConfigError
from ...events.subscriber import AppliedEvents, UserEventsHandler
from ...secrets import read_secret_file
from ...service.errors import APIError, error_body
from ...service.logs import setup_logging
from ...tracing import setup_tracing
from . import attestation_api, handlers, openapi
from .executors.launcher import LauncherClient, split_privileges
from .executors.local import LocalExecutor
from .handlers import BaseHandler
from .metrics import LOOP_LAG, MetricsHandler
from .models import MAX_BODY, too_large
from .queue import JobQueue
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
        body = json.dumps(error_body("too_large", too_large(self.length))).encode()
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
    return [(api + path, handler) for path, handler in handlers.default_handlers + attestation_api.default_handlers]


def make_app(queue: JobQueue, prefix: str, events: AppliedEvents, service_token: str) -> web.Application:
    """The tornado application serving the API under ``prefix``."""

    def apply_event(event: dict, _session) -> None:
        if event["type"] == "user.deleted":
            queue.cancel_all_of(event["user"], reason=f"user {event['user']} was deleted")

    routes = api_handlers(prefix) + [
        (prefix + "oauth_callback", HubOAuthCallbackHandler),
        (prefix + "metrics", MetricsHandler),
        (prefix + "events", UserEventsHandler, {"token": service_token, "applied": events, "apply": apply_event}),
    ]
    return BoundedApplication(
        routes,
        queue=queue,
        attestation=queue.attestation,  # the handlers' own, beside the queue (which gates jobs on node states)
        openapi=openapi.load(),
        cookie_secret=os.urandom(32),
        default_handler_class=NotFoundHandler,
    )


def split_off_launcher(cfg) -> tuple[LauncherClient | None, str | None]:
    """Under isolation 'accounts': the root launcher started, and this process the service account for good
    (``<data dir>/jobs/`` given to it first, with what an earlier run as root left there; what users' accounts
    own in it stays theirs), and the NRAS key file it read first; (None, None) otherwise. Blocking, before any
    thread or event loop."""
    platform = instances(cfg)["Platform"]
    if accounts.isolation_mode(platform) != "accounts":
        return None, None
    if key_file := cfg.Attestation.get("api_key_file"):  # may be root's alone (0600): read it while root
        os.environ[NRAS_KEY_VAR] = read_secret_file(key_file, "Attestation.api_key_file").reveal()
        cfg.Attestation.api_key_file = ""
    policy = accounts.AccountPolicy.from_platform(platform)
    service = accounts.ensure_service_account(policy)
    jobs_dir = Path(platform.data_dir).expanduser() / "jobs"
    accounts.hand_over(jobs_dir, service, mode=JOBS_DIR_MODE, from_root_only=True)
    state_dir = cfg.LocalExecutor.get("state_dir") or str(jobs_dir / ".local-executor")
    return split_privileges(state_dir, policy, service), key_file or None


def build_queue(cfg, service_url: str, prefix: str, launcher: LauncherClient | None = None) -> JobQueue:
    """The queue and store from ``gpulab_config.py``, with platform defaults filled in."""
    platform = instances(cfg)["Platform"]
    data_dir = Path(platform.data_dir).expanduser()
    jobs_dir = data_dir / "jobs"
    jobs_dir.mkdir(parents=True, exist_ok=True, mode=JOBS_DIR_MODE)
    jobs_dir.chmod(JOBS_DIR_MODE)
    url = cfg.JobStore.get("url") or f"sqlite:///{data_dir / 'jobs' / 'jobs.sqlite'}"
    store = JobStore(config=cfg, url=url)
    queue = JobQueue(config=cfg, store=store, data_dir=str(data_dir))
    if isinstance(queue.executor, LocalExecutor) and launcher is not None:
        queue.executor.launcher = launcher
    if not queue.jobs_api_url:
        queue.jobs_api_url = service_url.rstrip("/") + prefix + "api/v1"
    if not queue.mlflow_tracking_uri and os.environ.get("GPULAB_MLFLOW_URL"):
        queue.mlflow_tracking_uri = os.environ["GPULAB_MLFLOW_URL"]
        queue.mlflow_job_token = True  # the platform's MLflow: jobs log with their own token
    return queue


def build_attestation(cfg, source: str | None = None) -> AttestationService:
    """The attestation service from ``c.Attestation``; logs where the NRAS API key came from (never the key):
    ``source``, the key file read before leaving root, else the service's own setting."""
    service = AttestationService.from_config(cfg)
    key = service.nras.api_key
    log.info("attestation: %s", f"NRAS API key from {source or key.source}" if key else "no NRAS API key configured")
    return service


def run() -> None:
    """``python -m gpulab.services.jobs``."""
    setup_logging()
    try:
        cfg = load_config()
        launcher, key_source = split_off_launcher(cfg)
    except (ConfigError, accounts.AccountError) as e:
        sys.exit(f"gpulab-jobs: error: {e}")
    try:
        asyncio.run(main(cfg, launcher, key_source))
    finally:
        if launcher is not None:
            launcher.close()


async def main(cfg, launcher: LauncherClient | None = None, key_source: str | None = None) -> None:
    setup_tracing("gpulab-jobs")
    service_url = os.environ["JUPYTERHUB_SERVICE_URL"]
    prefix = os.environ.get("JUPYTERHUB_SERVICE_PREFIX", "/services/gpulab-jobs/")
    token = os.environ["JUPYTERHUB_API_TOKEN"]
    HubOAuth.instance(api_token=token, cache_max_age=60)
    try:
        queue = build_queue(cfg, service_url, prefix, launcher)
        queue.attestation = build_attestation(cfg, key_source)
    except ConfigError as e:
        sys.exit(f"gpulab-jobs: error: {e}")
    app = make_app(queue, prefix, AppliedEvents(queue.store.url), token)
    address = urlsplit(service_url)
    server = app.listen(address.port, address.hostname or "127.0.0.1", max_body_size=READ_BODIES)
    await queue.start()
    lag = asyncio.create_task(LOOP_LAG.run())

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    lag.cancel()
    server.stop()
    await queue.stop()  # running jobs keep running; the next start re-attaches them
