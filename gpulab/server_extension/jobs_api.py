"""``/gpulab/api/v1/jobs...`` in the user's server: the job service, acting for this server's user.

Requests go to ``gpulab-jobs`` with the server's own hub token (``JUPYTERHUB_API_TOKEN``, which
carries the user's gpulab scopes) and the client's address in ``X-Forwarded-For``, through one
circuit breaker. :class:`ServiceProxyHandler` is the forwarding base, also of ``attestation_api.py`` and
``models_api.py``.
"""

import os
from urllib.parse import urlencode

from tornado import web
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from .. import tracing
from ..net import client_ip
from ..resilience import CircuitBreaker, CircuitOpenError
from ..service.errors import APIError
from ..services.jobs.models import MAX_BODY
from .handlers import GpulabHandler

FORWARDED_HEADERS = ("Content-Type",)


class ServiceBackend:
    """A hub service as this server sees it: its ``name`` (for messages), URL, this server's token, and one
    circuit breaker. The job service is one; :class:`~.models_api.InferBackend` adds gpulab-infer's gRPC side."""

    def __init__(self, name: str, url: str, token: str):
        self.name = name
        self.url = url.rstrip("/")
        self.token = token
        self.breaker = CircuitBreaker(f"{self.name} at {self.url}", failure_threshold=5, recovery_timeout=10)

    @classmethod
    def from_env(cls) -> "ServiceBackend | None":
        """gpulab-jobs at ``$GPULAB_JOBS_URL``; None when it is not set."""
        url = os.environ.get("GPULAB_JOBS_URL")
        return cls("gpulab-jobs", url, os.environ.get("JUPYTERHUB_API_TOKEN", "")) if url else None


class ServiceProxyHandler(GpulabHandler):
    """Forward the request to the job service and its answer back (status, JSON body).

    Subclasses set ``auth_resource``, checked here before anything is forwarded.
    """

    @property
    def backend(self) -> ServiceBackend:
        backend = self.settings.get("gpulab_jobs")
        if backend is None:
            raise APIError(503, "the job service is not configured (GPULAB_JOBS_URL is not set)", code="unavailable")
        return backend

    async def forward(self, path: str, streaming: bool = False) -> None:
        backend = self.backend
        if len(self.request.body or b"") > MAX_BODY:  # refused here: not a failure of the service (breaker)
            raise APIError(
                413,
                f"request body is {len(self.request.body)} bytes; {backend.name} takes at most {MAX_BODY}",
                code="too_large",
            )
        query = urlencode([(k, v.decode()) for k, vs in self.request.query_arguments.items() for v in vs])
        headers = {
            "Authorization": f"token {backend.token}",
            "X-Forwarded-For": client_ip(self.request.remote_ip, self.request.headers.get("X-Forwarded-For")),
        }
        headers.update({h: self.request.headers[h] for h in FORWARDED_HEADERS if h in self.request.headers})
        tracing.inject(headers)
        request = HTTPRequest(
            f"{backend.url}{path}" + (f"?{query}" if query else ""),
            method=self.request.method,
            headers=headers,
            body=self.request.body if self.request.method == "POST" else None,
            request_timeout=0 if streaming else 60,
            streaming_callback=self._stream if streaming else None,
            header_callback=self._stream_headers if streaming else None,
        )
        try:
            async with backend.breaker:
                response = await AsyncHTTPClient().fetch(request, raise_error=False)
        except CircuitOpenError as e:
            raise APIError(503, str(e), code="unavailable") from None
        except OSError as e:
            raise APIError(503, f"{backend.name} is unreachable: {e}", code="unavailable") from None
        if streaming:
            self.finish()
            return
        self.set_status(response.code)
        if response.code == 204:
            self.finish()
            return
        for name in ("Content-Type", "X-Log-Offset", "Retry-After"):
            if name in response.headers:
                self.set_header(name, response.headers[name])
        self.finish(response.body)

    def _stream_headers(self, line: str) -> None:
        if line.lower().startswith("http/"):
            self.set_status(int(line.split()[1]))
        elif line.lower().startswith("content-type:"):
            self.set_header("Content-Type", line.split(":", 1)[1].strip())

    def _stream(self, chunk: bytes) -> None:
        self.write(chunk)
        self.flush()


class JobsProxyHandler(ServiceProxyHandler):
    auth_resource = "gpulab:jobs"


class JobsHandler(JobsProxyHandler):
    @web.authenticated
    async def get(self):
        await self.forward("/jobs")

    @web.authenticated
    async def post(self):
        await self.forward("/jobs")


class JobHandler(JobsProxyHandler):
    @web.authenticated
    async def get(self, job_id):
        await self.forward(f"/jobs/{job_id}")

    @web.authenticated
    async def delete(self, job_id):
        await self.forward(f"/jobs/{job_id}")


class JobLogsHandler(JobsProxyHandler):
    @web.authenticated
    async def get(self, job_id):
        await self.forward(f"/jobs/{job_id}/logs", streaming=self.get_argument("follow", "") in ("1", "true"))


class JobCancelHandler(JobsProxyHandler):
    @web.authenticated
    async def post(self, job_id):
        await self.forward(f"/jobs/{job_id}/cancel")


JOB_ID = r"(?P<job_id>[0-9a-f]{32})"
ROUTES = [
    ("/jobs", JobsHandler),
    (f"/jobs/{JOB_ID}", JobHandler),
    (f"/jobs/{JOB_ID}/logs", JobLogsHandler),
    (f"/jobs/{JOB_ID}/cancel", JobCancelHandler),
]
