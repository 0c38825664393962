"""``python -m gpulab.services.jobs``: the hub-managed job service.

Configured like any hub-managed service (``JUPYTERHUB_SERVICE_URL``, ``JUPYTERHUB_SERVICE_PREFIX``,
``JUPYTERHUB_API_TOKEN``, ``JUPYTERHUB_API_URL``) plus ``gpulab_config.py`` (``c.JobQueue``,
``c.JobStore``, executor settings, ``c.Attestation``). The attestation service, and with it the NRAS
API key (``c.Attestation.api_key_file`` or ``$GPULAB_NRAS_API_KEY`` in this service's environment),
lives here and never in users' servers.
"""

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path
from urllib.parse import urlsplit

from jupyterhub.services.auth import HubOAuth, HubOAuthCallbackHandler
from tornado import web

from ... import accounts
from ...attestation import AttestationService
from ...config import instances, load_config
from ...errors import ConfigError
from ...events.subscriber import AppliedEvents, UserEventsHandler
from ...tracing import setup_tracing
from . import openapi
from .executors.local import LocalExecutor
from .handlers import APIError, BaseHandler, handlers
from .metrics import MetricsHandler
from .queue import JobQueue
from .store import JobStore

log = logging.getLogger("gpulab.jobs")


class NotFoundHandler(BaseHandler):
    def prepare(self):
        raise APIError(404, f"no such endpoint: {self.request.path}", code="not_found")


def make_app(queue: JobQueue, prefix: str, events: AppliedEvents, service_token: str) -> web.Application:
    """The tornado application serving the API under ``prefix``."""

    def apply_event(event: dict, _session) -> None:
        if event["type"] == "user.deleted":
            queue.cancel_all_of(event["user"], reason=f"user {event['user']} was deleted")

    routes = handlers(prefix) + [
        (prefix + "oauth_callback", HubOAuthCallbackHandler),
        (prefix + "metrics", MetricsHandler),
        (prefix + "events", UserEventsHandler, {"token": service_token, "applied": events, "apply": apply_event}),
    ]
    return web.Application(
        routes,
        queue=queue,
        openapi=openapi.load(),
        cookie_secret=os.urandom(32),
        default_handler_class=NotFoundHandler,
    )


def build_queue(cfg, service_url: str, prefix: str) -> JobQueue:
    """The queue and store from ``gpulab_config.py``, with platform defaults filled in."""
    platform = instances(cfg)["Platform"]
    data_dir = Path(platform.data_dir).expanduser()
    jobs_dir = data_dir / "jobs"
    jobs_dir.mkdir(parents=True, exist_ok=True, mode=0o711)  # jobs reach their own work dirs below it
    jobs_dir.chmod(0o711)
    url = cfg.JobStore.get("url") or f"sqlite:///{data_dir / 'jobs' / 'jobs.sqlite'}"
    store = JobStore(config=cfg, url=url)
    queue = JobQueue(config=cfg, store=store, data_dir=str(data_dir))
    if isinstance(queue.executor, LocalExecutor) and accounts.isolation_mode(platform) == "accounts":
        queue.executor.account_policy = accounts.AccountPolicy.from_platform(platform)
    if not queue.jobs_api_url:
        queue.jobs_api_url = service_url.rstrip("/") + prefix + "api/v1"
    if not queue.mlflow_tracking_uri and os.environ.get("GPULAB_MLFLOW_URL"):
        queue.mlflow_tracking_uri = os.environ["GPULAB_MLFLOW_URL"]
        queue.mlflow_job_token = True  # the platform's MLflow: jobs log with their own token
    return queue


def build_attestation(cfg) -> AttestationService:
    """The attestation service from ``c.Attestation``; logs where the NRAS API key came from (never the key)."""
    service = AttestationService.from_config(cfg)
    key = service.nras.api_key
    log.info("attestation: %s", f"NRAS API key from {key.source}" if key else "no NRAS API key configured")
    return service


async def main() -> None:
    logging.basicConfig(level=logging.INFO, format="[%(levelname)1.1s %(asctime)s %(name)s] %(message)s")
    logging.getLogger("tornado.access").setLevel(logging.WARNING)
    setup_tracing("gpulab-jobs")
    service_url = os.environ["JUPYTERHUB_SERVICE_URL"]
    prefix = os.environ.get("JUPYTERHUB_SERVICE_PREFIX", "/services/gpulab-jobs/")
    token = os.environ["JUPYTERHUB_API_TOKEN"]
    HubOAuth.instance(api_token=token, cache_max_age=60)
    try:
        cfg = load_config()
        queue = build_queue(cfg, service_url, prefix)
        queue.attestation = build_attestation(cfg)
    except ConfigError as e:
        sys.exit(f"gpulab-jobs: error: {e}")
    app = make_app(queue, prefix, AppliedEvents(queue.store.url), token)
    address = urlsplit(service_url)
    server = app.listen(address.port, address.hostname or "127.0.0.1", max_body_size=4 * 1024 * 1024)
    await queue.start()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.stop()
    await queue.stop()  # running jobs keep running; the next start re-attaches them
