"""Prometheus metrics of gpulab-jobs, served at ``<prefix>metrics`` to holders of ``read:metrics``."""

from jupyterhub.services.auth import HubOAuthenticated, check_scopes
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from tornado import web

from ...service.errors import APIError
from ...service.handlers import JSONAPIMixin
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


class MetricsHandler(JSONAPIMixin, HubOAuthenticated, web.RequestHandler):
    """The metrics, current queue and usage gauges refreshed on each scrape."""

    log_name = "gpulab-jobs"

    async def get(self):
        user = self.current_user
        if user is None:
            raise APIError(
                401, "send 'Authorization: token <hub token>' with the scope read:metrics", code="unauthenticated"
            )
        if not check_scopes(["read:metrics"], set(user.get("scopes", ()))):
            raise APIError(403, f"{user['name']} lacks the scope read:metrics", code="forbidden")
        store = self.settings["queue"].store
        queued, used = await store.db.run(lambda: (store.queued_count(), store.usage("pool")))
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
