"""KServe v2 REST on ``gpulab-infer`` (``c.InferenceGateway.rest_address``): Triton's HTTP protocol, authenticated
and forwarded, for ``tritonclient.http``, ``perf_analyzer -i http`` and any HTTP client.

Each route stands for the gRPC method it mirrors, with that method's scope, retry rule and metrics: the caller's
hub token (``Authorization: token <t>``) is checked, per-model allow-lists apply to the model in the path, and
the request goes as it came (path, body and encoding untouched) to a replica's HTTP endpoint with the platform
key; Triton's answer comes back as it is, whatever its status. The gateway's own errors are KServe's
``{"error": "<message>"}``. Model control is not offered here (gRPC and the deploy API have it).
"""

import ssl
import time
from contextlib import nullcontext

import grpc
from tornado import web
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets, bind_unix_socket

from ...inference import kserve
from ...inference.kserve import HEADER_LENGTH
from ...resilience import CircuitOpenError
from ...service.errors import APIError, grpc_name, http_status
from ...service.handlers import JSONAPIMixin
from ...text import CONTROL
from ...tracing import inject
from .gateway import IDEMPOTENT, LOCAL, RPCS, Gateway, GatewayError
from .replicas import NoReplicaError, is_transport_error

MODEL = r"/v2/models/(?P<model>[^/]+)(?:/versions/[0-9]+)?"
# (path, method, the gRPC method it mirrors); the first match wins
ROUTES = [
    (r"/v2/health/live", "GET", "ServerLive"),
    (r"/v2/health/ready", "GET", "ServerReady"),
    (r"/v2", "GET", "ServerMetadata"),
    (r"/v2/models/stats", "GET", "ModelStatistics"),
    (MODEL, "GET", "ModelMetadata"),
    (MODEL + "/ready", "GET", "ModelReady"),
    (MODEL + "/config", "GET", "ModelConfig"),
    (MODEL + "/stats", "GET", "ModelStatistics"),
    (MODEL + "/infer", "POST", "ModelInfer"),
]
# request headers passed to Triton, and answer headers passed back
REQUEST_HEADERS = ("Content-Type", "Content-Encoding", "Accept-Encoding", "Inference-Header-Content-Length")
ANSWER_HEADERS = ("Content-Type", "Content-Encoding", "Inference-Header-Content-Length")


class RestError(APIError):
    """The gateway's own answer on the REST plane, as KServe's ``{"error": "<message>"}``."""


class ErrorHandler(JSONAPIMixin, web.RequestHandler):
    """KServe's error body for the gateway's own answers."""

    log_name = "gpulab-infer"

    def error_body(self, status, code, message, field, details) -> dict:
        return {"error": message}


class NotOffered(ErrorHandler):
    def prepare(self):
        raise RestError(
            404,
            f"{self.request.method} {self.request.path} is not offered by the gpulab inference "
            "gateway (Triton's health, metadata, config, statistics and infer endpoints are)",
        )


@web.stream_request_body
class RestHandler(ErrorHandler):
    """One route: authorised as its gRPC method, then forwarded to a replica's HTTP endpoint."""

    def initialize(self, gateway: Gateway, method: str, rpc: str, max_bytes: int):
        self.gateway, self.method, self.rpc, self.max_bytes = gateway, method, rpc, max_bytes
        self.allow = (method,)
        self.chunks: list[bytes] = []

    def prepare(self):
        if self.request.method != self.method:
            raise RestError(405, f"{self.request.path} takes {self.method}, not {self.request.method}")
        try:
            length = int(self.request.headers.get("Content-Length", "0"))
        except ValueError:
            raise RestError(400, "Content-Length is not a number") from None
        if length > self.max_bytes:
            raise RestError(413, f"request larger than the gateway's limit of {self.max_bytes} bytes")
        self.request.connection.set_max_body_size(self.max_bytes)

    def data_received(self, chunk: bytes):
        self.chunks.append(chunk)

    async def get(self, model: str | None = None):
        scope, _, how = RPCS[self.rpc]
        started, code = time.perf_counter(), grpc.StatusCode.OK
        headers = [(key.lower(), value) for key, value in self.request.headers.get_all()]
        try:
            if model in (".", ".."):  # a dot segment, not a model (a server resolving it would see another path)
                raise RestError(400, f"'{model}' is not a model name")
            if model is not None and CONTROL.search(model):
                raise RestError(400, "a model name has no control characters")
            who = await self.gateway.authenticate(headers)
            self.gateway.authorize(who, scope, "" if model is None and self.rpc == "ModelStatistics" else model)
            if how == LOCAL:
                self.local()
                return
            span = self.gateway.span(self.rpc, headers)
            with span or nullcontext():
                answer = await self.forward(span is not None, how == IDEMPOTENT)
            # Triton 2.51 answers 500 for requests it cannot read: the client's error, answered as one
            if (
                answer.status == 500
                and self.rpc == "ModelInfer"
                and "Content-Encoding" not in self.request.headers
                and (problem := kserve.request_problem(b"".join(self.chunks), self.request.headers.get(HEADER_LENGTH)))
            ):
                raise RestError(400, problem)
            code = grpc.StatusCode[grpc_name(answer.status)]
            self.set_status(answer.status)
            for name in ANSWER_HEADERS:
                if name in answer.headers:
                    self.set_header(name, answer.headers[name])
            self.finish(answer.body)
        except RestError as e:
            code = grpc.StatusCode[grpc_name(e.status_code)]
            raise
        except GatewayError as e:
            code = e.code
            raise RestError(http_status(e.code, 503), e.message) from None
        except (NoReplicaError, CircuitOpenError) as e:
            code = grpc.StatusCode.UNAVAILABLE
            raise RestError(503, str(e)) from None
        except Exception as e:
            if not is_transport_error(e):
                raise
            code = grpc.StatusCode.UNAVAILABLE
            raise RestError(502, f"the Triton replica failed during the call: {type(e).__name__}: {e}") from None
        finally:
            label = model if model and code not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.NOT_FOUND) else ""
            self.gateway.metrics.observe(self.rpc, label, code, time.perf_counter() - started)

    post = get

    def local(self) -> None:
        """Health as on gRPC: live while the gateway runs, ready while a replica is available."""
        pool = self.gateway.pool
        if self.rpc == "ServerReady" and not pool.ready():
            raise RestError(503, f"no Triton replica available: {pool.describe()}")
        self.finish()

    async def forward(self, traced: bool, idempotent: bool):
        pool = self.gateway.pool
        if not pool.http:
            raise RestError(503, "REST is not configured: InferenceGateway.http_replicas names no Triton HTTP endpoint")
        headers = {name: self.request.headers[name] for name in REQUEST_HEADERS if name in self.request.headers}
        headers.update(pool.http_headers)
        if traced:  # the caller's traceparent, or tracing is on: this call's span goes on
            inject(headers)
        body = b"".join(self.chunks)
        return await pool.forward(
            lambda r: r.fetch(self.request.method, self.request.uri, body, headers), idempotent, http=True
        )


def handlers(gateway: Gateway, max_bytes: int) -> list:
    routes = [
        (path, RestHandler, {"gateway": gateway, "method": method, "rpc": rpc, "max_bytes": max_bytes})
        for path, method, rpc in ROUTES
    ]
    return [*routes, (r".*", NotOffered)]


def serve(
    gateway: Gateway, address: str, max_bytes: int, tls: ssl.SSLContext | None = None, reuse_port: bool = False
) -> None:
    """Serve KServe v2 REST on ``address``: host:port, or ``unix:<path>`` (behind nginx)."""
    if address.startswith("unix:"):
        sockets = [bind_unix_socket(address.removeprefix("unix:"))]
    else:
        host, port = address.rsplit(":", 1)
        sockets = bind_sockets(int(port), host.strip("[]"), reuse_port=reuse_port)
    HTTPServer(
        web.Application(handlers(gateway, max_bytes)), ssl_options=tls, xheaders=False, max_body_size=max_bytes
    ).add_sockets(sockets)
