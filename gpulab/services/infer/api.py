"""The HTTP API of ``gpulab-infer`` under ``<service prefix>api/v1/``: deploy, list and delete models.

Callers authenticate as on the gRPC side (``Authorization: token <hub token>``, looked up and cached by the
gateway); reading needs ``custom:gpulab:infer``, deploying and deleting ``custom:gpulab:deploy``, and the
gateway's per-model allow-lists apply. Errors are ``{"error": {"code", "message", "field"}}``.
"""

from ...scopes import DEPLOY, INFER
from ...service.errors import APIError, error_code, http_status
from ...service.handlers import ServiceHandler
from .deployments import Deployments
from .gateway import Gateway, GatewayError

MAX_BODY = 64 * 1024


def refusal(e: GatewayError) -> APIError:
    """The REST answer to the gateway's gRPC refusal ``e``."""
    return APIError(http_status(e.code), e.message, code=error_code(e.code))


class Handler(ServiceHandler):
    """Authenticated with the gateway's cached token lookups (the gRPC side's), scope-checked; the gateway's
    refusals answer as the gRPC side's, as JSON errors."""

    log_name = "gpulab-infer"
    max_body = MAX_BODY

    def initialize(self, gateway: Gateway, deployments: Deployments, default_backend: str):
        self.gateway, self.deployments, self.default_backend = gateway, deployments, default_backend

    async def prepare(self):
        super().prepare()
        if "Authorization" not in self.request.headers:
            raise APIError(401, "send 'Authorization: token <hub token>'", code="unauthenticated")
        try:
            self.who = await self.gateway.authenticate([("authorization", self.request.headers["Authorization"])])
        except GatewayError as e:
            raise refusal(e) from None

    def authorize(self, model: str | None = None) -> None:
        try:
            self.gateway.authorize(self.who, INFER if self.request.method == "GET" else DEPLOY, model)
        except GatewayError as e:
            raise refusal(e) from None


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
        body = self.json_body()
        name = body.get("name")
        self.authorize(name if isinstance(name, str) else None)
        model = await self.deployments.deploy(
            self.who, body.get("source"), name, body.get("backend") or self.default_backend
        )
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
