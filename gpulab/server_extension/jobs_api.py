"""``/gpulab/api/v1/jobs...``, ``/schedules...`` and ``/notifications`` in the user's server: the job service, acting for this server's
user.

Requests go to ``gpulab-jobs`` with the server's own hub token (``JUPYTERHUB_API_TOKEN``, which
carries the user's gpulab scopes) and the client's address in ``X-Forwarded-For``, through one
circuit breaker (:class:`~gpulab.service.client.HubServiceClient`, which kernels use too).
:class:`ServiceProxyHandler` is the forwarding base, also of ``attestation_api.py`` and ``models_api.py``.
"""

import asyncio
import json
from collections.abc import Awaitable, Callable
from urllib.parse import urlencode

from tornado import web
from tornado.httpclient import HTTPResponse

from ..kernels.client import discard_snapshot
from ..net import client_ip
from ..service.client import SERVICES, HubServiceClient, NotConfigured, Unreachable
from ..service.errors import APIError
from ..services.jobs.models import MAX_BODY
from .handlers import GpulabHandler

FORWARDED_HEADERS = ("Content-Type",)


def configured(name: str) -> HubServiceClient | str:
    """The client of hub service ``name`` for this server, or why there is none (told in every 503)."""
    try:
        return HubServiceClient.from_env(name, timeout=60)
    except NotConfigured as e:
        return f"{SERVICES[name][1]} is not configured for this server ({e.variable} is not set)"


def client_of(handler, setting: str) -> HubServiceClient:
    """The server's client in ``settings[setting]``; a 503 saying why when there is none."""
    client = handler.settings.get(setting)
    if not isinstance(client, HubServiceClient):
        raise APIError(503, client or f"{setting} is not set up in this server", code="unavailable")
    return client


class ServiceProxyHandler(GpulabHandler):
    """Forward the request to the job service and its answer back (status, JSON body).

    Subclasses set ``auth_resource``, checked here before anything is forwarded.
    """

    @property
    def service(self) -> HubServiceClient:
        return client_of(self, "gpulab_jobs")

    async def forward(
        self,
        path: str,
        streaming: bool = False,
        body: bytes | None = None,
        answered: Callable[[HTTPResponse], Awaitable[None]] | None = None,
    ) -> None:
        """Forward this request to ``path`` of the service, with ``body`` (JSON) instead of the request's if given;
        ``answered`` is awaited with the service's answer before it is passed on (what follows from it is done by
        the time the client reads it)."""
        service = self.service
        if body is None and self.request.method in ("POST", "PATCH", "PUT"):
            body = self.request.body
        if len(body or b"") > MAX_BODY:  # refused here: not a failure of the service (breaker)
            raise APIError(
                413, f"request body is {len(body)} bytes; {service.name} takes at most {MAX_BODY}", code="too_large"
            )
        query = urlencode([(k, v.decode()) for k, vs in self.request.query_arguments.items() for v in vs])
        headers = {"X-Forwarded-For": client_ip(self.request.remote_ip, self.request.headers.get("X-Forwarded-For"))}
        headers.update({h: self.request.headers[h] for h in FORWARDED_HEADERS if h in self.request.headers})
        try:
            response = await service.fetch(
                self.request.method,
                path + (f"?{query}" if query else ""),
                body=body,
                headers=headers,
                timeout=0 if streaming else None,
                streaming_callback=self._stream if streaming else None,
                header_callback=self._stream_headers if streaming else None,
            )
        except Unreachable as e:
            raise APIError(503, str(e), code="unavailable") from None
        if streaming:
            self.finish(set_content_type=self._streamed_type)
            return
        if answered is not None:
            await answered(response)
        self.set_status(response.code)
        if response.code == 204:
            self.finish()
            return
        for name in ("X-Log-Offset", "Retry-After"):
            if name in response.headers:
                self.set_header(name, response.headers[name])
        # the service's type, not the JSON type jupyter_server's APIHandler.finish would otherwise set (a log is text)
        self.finish(response.body, set_content_type=response.headers.get("Content-Type", "application/json"))

    _streamed_type = "application/json"  # until the service's own Content-Type line has come

    def _stream_headers(self, line: str) -> None:
        if line.lower().startswith("http/"):
            self.set_status(int(line.split()[1]))
        elif line.lower().startswith("content-type:"):
            self._streamed_type = line.split(":", 1)[1].strip()
            self.set_header("Content-Type", self._streamed_type)

    def _stream(self, chunk: bytes) -> None:
        self.write(chunk)
        self.flush()


class JobsProxyHandler(ServiceProxyHandler):
    auth_resource = "gpulab:jobs"


def forwarding(target: str, *methods: str, base: type[ServiceProxyHandler] = JobsProxyHandler) -> type:
    """A handler of ``methods`` that forwards to ``target``, formatted with the route's named groups."""

    async def handle(self, **path):
        await self.forward(target.format(**path))

    name = "Forward" + "".join(part.strip("{}").title().replace("_", "") for part in target.split("/"))
    return type(name, (base,), {method.lower(): web.authenticated(handle) for method in methods})


class JobHandler(JobsProxyHandler):
    @web.authenticated
    async def get(self, job_id):
        await self.forward(f"/jobs/{job_id}")

    @web.authenticated
    async def patch(self, job_id):
        await self.forward(f"/jobs/{job_id}")

    @web.authenticated
    async def delete(self, job_id):
        """Delete the job, then the copy of its files made when it was submitted (this server's user made it)."""
        try:
            found = await self.service.fetch("GET", f"/jobs/{job_id}")
        except Unreachable as e:
            raise APIError(503, str(e), code="unavailable") from None

        async def deleted(response):
            if response.code == 204 and found.code == 200:
                await asyncio.to_thread(discard_snapshot, json.loads(found.body)["spec"])

        await self.forward(f"/jobs/{job_id}", answered=deleted)


class JobLogsHandler(JobsProxyHandler):
    @web.authenticated
    async def get(self, job_id):
        await self.forward(f"/jobs/{job_id}/logs", streaming=self.get_argument("follow", "") in ("1", "true"))


JOB_ID = r"(?P<job_id>[0-9a-f]{32})"
SCHEDULE_ID = r"(?P<schedule_id>[0-9a-f]{32})"
ARRAY_ID = r"(?P<array_id>[0-9a-f]{32})"
ROUTES = [
    ("/jobs", forwarding("/jobs", "GET", "POST")),
    (f"/jobs/{JOB_ID}", JobHandler),
    (f"/jobs/{JOB_ID}/logs", JobLogsHandler),
    (f"/jobs/{JOB_ID}/cancel", forwarding("/jobs/{job_id}/cancel", "POST")),
    (f"/arrays/{ARRAY_ID}/cancel", forwarding("/arrays/{array_id}/cancel", "POST")),
    ("/schedules", forwarding("/schedules", "GET", "POST")),
    (f"/schedules/{SCHEDULE_ID}", forwarding("/schedules/{schedule_id}", "GET", "PATCH", "DELETE")),
    (f"/schedules/{SCHEDULE_ID}/run", forwarding("/schedules/{schedule_id}/run", "POST")),
    ("/quota", forwarding("/quota", "GET")),
    ("/notifications", forwarding("/notifications", "GET", "PUT")),
    ("/notifications/feed", forwarding("/notifications/feed", "GET")),
]
