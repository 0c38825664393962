"""Prometheus metrics of gpulab-jobs, served at ``<prefix>metrics`` to holders of ``read:metrics``."""

import asyncio

from jupyterhub.services.auth import HubOAuthenticated, check_scopes
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from tornado import web

from ...service.loop_lag import LoopLag

REGISTRY = CollectorRegistry()
REQUESTS = Histogram(
    "gpulab_jobs_request_duration_seconds", "API request latency", ["method", "handler", "code"], registry=REGISTRY
)
LOOP_LAG = LoopLag(REGISTRY, "gpulab_jobs")
SUBMITTED = Counter("gpulab_jobs_submitted_total", "Jobs accepted", ["pool"], registry=REGISTRY)
QUEUED = Gauge("gpulab_jobs_queued", "Queued jobs", ["pool"], registry=REGISTRY)
ACTIVE = Gauge("gpulab_jobs_active", "Dispatching and running jobs", ["pool"], registry=REGISTRY)
ACTIVE_GPUS = Gauge("gpulab_jobs_active_gpus", "GPUs held by active jobs", ["pool"], registry=REGISTRY)


class MetricsHandler(HubOAuthenticated, web.RequestHandler):
    """The metrics, current queue and usage gauges refreshed on each scrape."""

    async def get(self):
        user = self.current_user
        if user is None:
            raise web.HTTPError(401)
        if not check_scopes(["read:metrics"], set(user.get("scopes", ()))):
            raise web.HTTPError(403)
        store = self.settings["queue"].store
        queued, used = await asyncio.to_thread(lambda: (store.queued_count(), store.usage("pool")))
        QUEUED.clear()
        ACTIVE.clear()
        ACTIVE_GPUS.clear()
        for pool, count in queued.items():
            QUEUED.labels(pool).set(count)
        for pool, usage in used.items():
            ACTIVE.labels(pool).set(usage.jobs)
            ACTIVE_GPUS.labels(pool).set(usage.gpus)
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(generate_latest(REGISTRY))
