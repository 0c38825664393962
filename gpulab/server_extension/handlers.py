"""REST handlers of the gpulab server extension, under ``/gpulab/api/v1/``."""

import os

from jupyter_server.base.handlers import APIHandler
from opentelemetry import trace
from tornado import web

from .. import tracing
from ..gpus import list_gpus
from ..service.client import HubServiceClient
from ..service.errors import APIError
from ..service.handlers import JSONAPIMixin
from .authorizer import RESOURCE_SCOPES, user_scopes

TRACER = tracing.tracer("gpulab.server_extension")  # follows the provider set up when the extension loads


class GpulabHandler(JSONAPIMixin, APIHandler):
    """Base: traced, authenticated (401), scope-checked (403), errors as ``{"error": {...}}``."""

    auth_resource = "gpulab"

    async def prepare(self):
        self._span = TRACER.start_span(
            f"{self.request.method} {self.request.path}",
            context=tracing.extract(self.request.headers),
            kind=trace.SpanKind.SERVER,
        )
        await super().prepare()
        if self.current_user is None:
            raise APIError(
                401,
                "authentication required: sign in or send 'Authorization: token <hub token>'",
                code="unauthenticated",
            )
        action = "read" if self.request.method in ("GET", "HEAD") else "write"
        if not self.authorizer.is_authorized(self, self.current_user, action, self.auth_resource):
            needed = " or ".join(RESOURCE_SCOPES.get(self.auth_resource, ("an unknown scope",)))
            raise APIError(
                403, f"this needs the {needed} scope, which {self.current_user.username} lacks", code="forbidden"
            )

    def check_xsrf_cookie(self):
        """A request carrying no credential at all (no header, no cookie) has nothing a forged form could use:
        it goes on to the 401 that says how to authenticate, not a 403 about ``_xsrf``."""
        if "Authorization" not in self.request.headers and not self.request.cookies:
            return None
        return super().check_xsrf_cookie()

    def on_finish(self):
        span = getattr(self, "_span", None)
        if span is not None:
            span.set_attribute("http.status_code", self.get_status())
            span.end()
        super().on_finish()


class NotFoundHandler(GpulabHandler):
    """A path under the API that names nothing (a malformed job id or model name among them)."""

    async def prepare(self):
        await super().prepare()
        raise APIError(404, f"no such endpoint: {self.request.path}")


class WhoAmIHandler(GpulabHandler):
    """The signed-in user and the gpulab scopes this request carries."""

    @web.authenticated
    def get(self):
        user = self.current_user
        hub_user = getattr(user, "hub_user", None) or {}
        self.finish(
            {
                "name": user.username,
                "admin": bool(hub_user.get("admin", False)),
                "groups": sorted(hub_user.get("groups") or []),
                "scopes": user_scopes(user),
            }
        )


class StatusHandler(GpulabHandler):
    """Where the platform's services are, this server's GPUs, and the state of its circuit breakers."""

    @web.authenticated
    def get(self):
        jobs, infer = (self.settings.get(s) for s in ("gpulab_jobs", "gpulab_infer"))
        clients = [c for c in (jobs, infer) if isinstance(c, HubServiceClient)]
        gpus = list_gpus()
        self.finish(
            {
                "user": self.current_user.username,
                "gpus": gpus or "none",
                "services": {
                    "jobs": jobs.url if isinstance(jobs, HubServiceClient) else None,
                    "infer": infer.url if isinstance(infer, HubServiceClient) else None,
                    "mlflow_ui": os.environ.get("GPULAB_MLFLOW_UI_URL"),
                },
                "breakers": [c.breaker.snapshot() for c in clients],
            }
        )
