"""The HTTP API of ``gpulab-infer`` under ``<service prefix>api/v1/``: deploy, list and delete models.

Callers authenticate as on the gRPC side (``Authorization: token <hub token>``, looked up and cached by the
gateway); reading needs ``custom:gpulab:infer``, deploying and deleting ``custom:gpulab:deploy``, and the
gateway's per-model allow-lists apply. Errors are ``{"error": {"code", "message", "field"}}``.
"""

import json

import grpc
from tornado import web

from ... import http_methods, tracing
from ...scopes import DEPLOY, INFER
from .gateway import Gateway, GatewayError
from .models import DeployError, Deployments

MAX_BODY = 64 * 1024
HTTP_STATUS = {grpc.StatusCode.UNAUTHENTICATED: (401, "unauthenticated"),
               grpc.StatusCode.PERMISSION_DENIED: (403, "forbidden"),
               grpc.StatusCode.UNAVAILABLE: (503, "unavailable")}


class Handler(web.RequestHandler):
    """Authenticated, scope-checked, traced; ``DeployError`` and ``GatewayError`` become JSON errors."""

    def initialize(self, gateway: Gateway, deployments: Deployments, default_backend: str):
        self.gateway, self.deployments, self.default_backend = gateway, deployments, default_backend

    async def prepare(self):
        self._span = tracing.tracer("gpulab.services.infer").start_span(
            f"{self.request.method} {self.request.path}", context=tracing.extract(self.request.headers))
        if len(self.request.body or b"") > MAX_BODY:
            raise DeployError(413, f"request body over {MAX_BODY} bytes", code="too_large")
        if "Authorization" not in self.request.headers:
            raise GatewayError(grpc.StatusCode.UNAUTHENTICATED, "send 'Authorization: token <hub token>'")
        self.who = await self.gateway.authenticate([("authorization", self.request.headers["Authorization"])])

    def authorize(self, model: str | None = None) -> None:
        self.gateway.authorize(self.who, INFER if self.request.method == "GET" else DEPLOY, model)

    def on_finish(self):
        if getattr(self, "_span", None) is not None:
            self._span.set_attribute("http.status_code", self.get_status())
            self._span.end()

    def log_exception(self, typ, value, tb):
        if not isinstance(value, DeployError | GatewayError):  # answers, not failures
            super().log_exception(typ, value, tb)

    def write_json(self, body, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(body))

    def write_error(self, status_code, **kwargs):
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, GatewayError):
            status_code, code = HTTP_STATUS.get(exc.code, (500, "internal"))
            error = {"code": code, "message": exc.message, "field": None}
        elif isinstance(exc, DeployError):
            status_code, error = exc.status, {"code": exc.code, "message": exc.message, "field": exc.field}
        elif isinstance(exc, web.HTTPError) and status_code < 500:
            message = http_methods.refuse(self) if status_code == 405 else exc.log_message or self._reason
            error = {"code": self._reason.lower().replace(" ", "_"), "message": message, "field": None}
        else:
            error = {"code": "internal", "message": "internal error; see the gpulab-infer log", "field": None}
        self.set_status(status_code)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"error": error}))


class ModelsHandler(Handler):
    async def get(self):
        self.authorize()
        models = []
        for model in await self.deployments.list():
            try:
                self.gateway.authorize(self.who, INFER, model["name"])
            except GatewayError:
                continue  # an allow-listed model this caller may not use
            models.append(model)
        self.write_json({"models": models})

    async def post(self):
        try:
            body = json.loads(self.request.body or b"{}")
        except ValueError as e:
            raise DeployError(400, f"body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise DeployError(400, "body must be a JSON object")
        name = body.get("name")
        self.authorize(name if isinstance(name, str) else None)
        model = await self.deployments.deploy(self.who, body.get("source"), name,
                                              body.get("backend") or self.default_backend)
        self.write_json(model, 201)


class ModelHandler(Handler):
    async def get(self, name):
        self.authorize(name)
        self.write_json(await self.deployments.describe(name))

    async def delete(self, name):
        self.authorize(name)
        await self.deployments.delete(self.who, name)
        self.set_status(204)
        self.finish()


def handlers(prefix: str, **kwargs) -> list:
    """Routes under ``<prefix>api/v1``; ``kwargs`` go to every handler (gateway, deployments, default_backend)."""
    api = prefix.rstrip("/") + "/api/v1"
    return [(api + "/models", ModelsHandler, kwargs), (api + r"/models/(?P<name>[^/]+)", ModelHandler, kwargs)]
