"""The gRPC side of ``gpulab-infer``: Triton's ``inference.GRPCInferenceService``, authenticated and forwarded.

Every RPC is handled generically on serialized bytes: the caller's hub token is checked, the model
name is read straight from the wire (field 1 or 2; tensors are skipped, never parsed), per-model
allow-lists are applied, and the bytes go to a replica with the platform's restricted-protocol
key (which unlocks Triton's model control) and the caller's ``traceparent``.
"""

import asyncio
import time
from contextlib import nullcontext

import grpc
from google.protobuf.message import DecodeError
from opentelemetry import propagate, trace
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from tornado.httpclient import HTTPClientError
from tritonclient.grpc import service_pb2

from ...resilience import CircuitOpenError
from ...scopes import ADMIN, DEPLOY, INFER
from ...tracing import inject
from .auth import HubTokenAuth, Identity, InvalidToken, token_from_metadata
from .records import ModelRecords
from .replicas import NoReplicaError, ReplicaPool

SERVICE_NAME = "inference.GRPCInferenceService"
LOCAL, ONCE, IDEMPOTENT, BROADCAST = "local", "once", "idempotent", "broadcast"
# rpc -> (required scope, field number of the model name or 0, how it is sent)
RPCS = {
    "ServerLive": (INFER, 0, LOCAL),
    "ServerReady": (INFER, 0, LOCAL),
    "ModelReady": (INFER, 1, IDEMPOTENT),
    "ServerMetadata": (INFER, 0, IDEMPOTENT),
    "ModelMetadata": (INFER, 1, IDEMPOTENT),
    "ModelInfer": (INFER, 1, ONCE),
    "ModelConfig": (INFER, 1, IDEMPOTENT),
    "ModelStatistics": (INFER, 1, IDEMPOTENT),
    "RepositoryIndex": (DEPLOY, 0, IDEMPOTENT),
    "RepositoryModelLoad": (DEPLOY, 2, BROADCAST),
    "RepositoryModelUnload": (DEPLOY, 2, BROADCAST),
}
CONTROL = ("RepositoryModelLoad", "RepositoryModelUnload")  # they change a model: its owner's or an admin's
UNOFFERED = [
    "SystemSharedMemoryStatus",
    "SystemSharedMemoryRegister",
    "SystemSharedMemoryUnregister",
    "CudaSharedMemoryStatus",
    "CudaSharedMemoryRegister",
    "CudaSharedMemoryUnregister",
    "TraceSetting",
    "LogSettings",
]
_LIVE = service_pb2.ServerLiveResponse(live=True).SerializeToString()
_READY = {ready: service_pb2.ServerReadyResponse(ready=ready).SerializeToString() for ready in (True, False)}
_tracer = trace.get_tracer("gpulab.services.infer")
TRACE_KEYS = ("traceparent", "tracestate")


class GatewayError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class RepeatedField(ValueError):
    """A field the gateway decides on comes more than once: protobuf would take the last, a first-match
    reader the first, so such a request is refused rather than guessed at."""


def wire_string(buf: bytes, number: int) -> str:
    """The string field ``number`` at the top level of a serialized protobuf message ("" if absent).

    The whole message is read: RepeatedField if ``number`` comes more than once (or with another wire type),
    ValueError if the message is malformed."""
    i, end, found = 0, len(buf), None
    while i < end:
        key, i = _varint(buf, i)
        wire_type = key & 7
        if key >> 3 == number and (wire_type != 2 or found is not None):
            raise RepeatedField(f"field {number} comes more than once")
        if wire_type == 2:
            size, i = _varint(buf, i)
            if key >> 3 == number:
                found = buf[i : i + size]
            i += size
        elif wire_type == 0:
            _, i = _varint(buf, i)
        elif wire_type in (1, 5):
            i += 8 if wire_type == 1 else 4
        else:
            raise ValueError(f"unsupported wire type {wire_type}")
    if i > end:
        raise ValueError("truncated message")
    return found.decode() if found is not None else ""


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        value |= (byte & 0x7F) << shift
        i += 1
        if byte < 0x80:
            return value, i
        shift += 7


class Metrics:
    """Prometheus metrics of one gateway, in their own registry."""

    def __init__(self, pool: ReplicaPool):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "gpulab_infer_requests",
            "RPCs by method, model and status code",
            ["rpc", "model", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "gpulab_infer_request_seconds",
            "RPC latency at the gateway",
            ["rpc"],
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.pool = pool
        self.registry.register(self)
        self._requests = {}  # (rpc, model, code) -> its counter: labels() takes a lock and builds a key each time
        self._latency = {rpc: self.latency.labels(rpc) for rpc in RPCS}

    def observe(self, rpc: str, model: str, code: grpc.StatusCode, seconds: float) -> None:
        counter = self._requests.get((rpc, model, code))
        if counter is None:
            counter = self._requests[rpc, model, code] = self.requests.labels(rpc, model, code.name)
        counter.inc()
        self._latency[rpc].observe(seconds)

    def collect(self):
        requests = CounterMetricFamily(
            "gpulab_infer_replica_requests", "Requests sent to each replica", labels=["replica"]
        )
        outstanding = GaugeMetricFamily("gpulab_infer_replica_outstanding", "Requests in flight", labels=["replica"])
        healthy = GaugeMetricFamily("gpulab_infer_replica_healthy", "1 if the replica is ready", labels=["replica"])
        state = GaugeMetricFamily(
            "gpulab_infer_breaker_state", "Circuit breaker: 1 for the current state", labels=["replica", "state"]
        )
        for r in self.pool.replicas:
            requests.add_metric([r.address], r.requests)
            outstanding.add_metric([r.address], r.outstanding)
            healthy.add_metric([r.address], int(r.healthy))
            for name in ("closed", "open", "half_open"):
                state.add_metric([r.address, name], int(r.breaker.state == name))
        yield from (requests, outstanding, healthy, state)


class Gateway:
    """Authorises each call and forwards it to the :class:`ReplicaPool`."""

    def __init__(
        self,
        pool: ReplicaPool,
        auth: HubTokenAuth,
        model_allow: dict[str, list[str]] | None = None,
        trace_all: bool = False,
        records: ModelRecords | None = None,
    ):
        self.pool = pool
        self.auth = auth
        self.records = records or ModelRecords(None)
        self.model_allow = {model: set(names) for model, names in (model_allow or {}).items()}
        self.trace_all = trace_all
        self.metrics = Metrics(pool)

    def handler(self) -> grpc.GenericRpcHandler:
        handlers = {name: grpc.unary_unary_rpc_method_handler(self._unary(name)) for name in RPCS}
        handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(self.stream_infer)
        handlers.update({name: grpc.unary_unary_rpc_method_handler(self._unoffered(name)) for name in UNOFFERED})
        return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)

    def _unary(self, rpc: str):
        async def handle(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return await self.unary(rpc, request, context)

        return handle

    @staticmethod
    def _unoffered(rpc: str):
        async def handle(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{rpc} is not offered by the gpulab inference gateway")

        return handle

    async def authenticate(self, metadata) -> Identity:
        try:
            return await self.auth.identify(token_from_metadata(metadata))
        except InvalidToken as e:
            raise GatewayError(grpc.StatusCode.UNAUTHENTICATED, str(e)) from None
        except (CircuitOpenError, HTTPClientError, OSError) as e:
            raise GatewayError(grpc.StatusCode.UNAVAILABLE, f"cannot check the token: {e}") from None

    def authorize(self, who: Identity, scope: str, model: str | None) -> None:
        """``model``: None for RPCs about no model, "" for RPCs about all models (ModelStatistics)."""
        if scope not in who.scopes:
            raise GatewayError(grpc.StatusCode.PERMISSION_DENIED, f"{who.name} lacks the scope {scope}")
        if model is not None and not self.may_call(who, model):
            raise GatewayError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{who.name} may not use model '{model}'" if model else "name a model",
            )

    def may_call(self, who: Identity, model: str) -> bool:
        """Whether the allow-lists let ``who`` call ``model`` ("": every model, as ModelStatistics asks)."""
        if not self.model_allow or ADMIN in who.scopes:
            return True
        allowed = self.model_allow.get(model) if model else ()
        return allowed is None or who.name in allowed or any(f"group:{g}" in allowed for g in who.groups)

    def span(self, rpc: str, metadata):
        """The span of this call when the caller sent ``traceparent`` (``metadata``: lowercase (key, value)
        pairs) or tracing is on, else None."""
        carrier = {key: value for key, value in metadata if key in TRACE_KEYS}
        if not (carrier or self.trace_all):
            return None
        return _tracer.start_as_current_span(
            f"infer {rpc}", context=propagate.extract(carrier), kind=trace.SpanKind.SERVER
        )

    async def unary(self, rpc: str, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        scope, field, how = RPCS[rpc]
        started, model, code = time.perf_counter(), None, grpc.StatusCode.OK
        metadata = context.invocation_metadata()
        try:
            who = await self.authenticate(metadata)
            model = model_name(request, field, rpc) if field else None
            self.authorize(who, scope, model)
            if rpc in CONTROL and (refusal := self.records.refusal(who, model)):
                raise GatewayError(grpc.StatusCode.PERMISSION_DENIED, refusal)
            if rpc == "RepositoryModelLoad" and ADMIN not in who.scopes:
                refuse_overrides(request)
            if how == LOCAL:
                return _LIVE if rpc == "ServerLive" else _READY[self.pool.ready()]
            span = self.span(rpc, metadata)
            with span or nullcontext():
                outgoing = (*self.pool.metadata, *inject({}).items()) if span else self.pool.metadata
                timeout = context.time_remaining()
                if how == BROADCAST:
                    return await self.pool.broadcast(rpc, request, outgoing, timeout)
                answer = await self.pool.forward(lambda r: r.call(rpc, request, outgoing, timeout), how == IDEMPOTENT)
                return self._visible_index(who, answer) if rpc == "RepositoryIndex" else answer
        except Exception as e:  # noqa: BLE001 - status_of re-raises what has no status
            code, message = status_of(e)
            await context.abort(code, message)
        finally:
            label = model if model and code not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.NOT_FOUND) else ""
            self.metrics.observe(rpc, label, code, time.perf_counter() - started)

    def _visible_index(self, who: Identity, answer: bytes) -> bytes:
        """A RepositoryIndex answer with only the models ``who`` may call (admins and open platforms: all)."""
        index = service_pb2.RepositoryIndexResponse.FromString(answer)
        visible = [m for m in index.models if self.may_call(who, m.name)]
        return service_pb2.RepositoryIndexResponse(models=visible).SerializeToString()

    async def stream_infer(self, requests, context: grpc.aio.ServicerContext):
        """ModelStreamInfer: one replica per stream; each request's model is authorised before it is sent,
        and responses flow back as the replica sends them. The caller's ``traceparent`` is passed on as is."""
        code = grpc.StatusCode.OK
        try:
            metadata = context.invocation_metadata()
            who = await self.authenticate(metadata)
            self.authorize(who, INFER, None)
            replica = self.pool.pick()
            call = replica.stream((*self.pool.metadata, *((k, v) for k, v in metadata if k in TRACE_KEYS)))
            pump = asyncio.create_task(self._pump(who, requests, call))
            replica.outstanding += 1
            replica.requests += 1
            try:
                async for response in call:
                    yield response
            except (asyncio.CancelledError, grpc.aio.AioRpcError):
                if not (pump.done() and not pump.cancelled() and pump.exception()):
                    raise
            finally:
                replica.outstanding -= 1
                if not pump.done():
                    pump.cancel()
            if not pump.cancelled():
                pump.result()  # a request the caller may not send
        except Exception as e:  # noqa: BLE001 - status_of re-raises what has no status
            code, message = status_of(e)
            await context.abort(code, message)
        finally:
            self.metrics.requests.labels("ModelStreamInfer", "", code.name).inc()

    async def _pump(self, who: Identity, requests, call) -> None:
        try:
            async for request in requests:
                self.authorize(who, INFER, model_name(request, 1, "ModelStreamInfer"))
                await call.write(request)
            await call.done_writing()
        except BaseException:
            call.cancel()
            raise


def model_name(request: bytes, field: int, rpc: str) -> str:
    try:
        return wire_string(request, field)
    except RepeatedField:
        raise GatewayError(
            grpc.StatusCode.INVALID_ARGUMENT, f"{rpc} request names its model more than once (field {field}): refused"
        ) from None
    except (ValueError, IndexError, UnicodeDecodeError):
        raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT, f"malformed {rpc} request") from None


def refuse_overrides(request: bytes) -> None:
    """A load may bring its own config or files (``config``, ``file:<path>`` parameters): code for the
    Python backend, run by Triton. Only admins may; everyone else loads what the repository holds."""
    try:
        parameters = service_pb2.RepositoryModelLoadRequest.FromString(request).parameters
    except DecodeError:
        raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT, "malformed RepositoryModelLoad request") from None
    if any(key == "config" or key.startswith("file:") for key in parameters):
        raise GatewayError(
            grpc.StatusCode.PERMISSION_DENIED, "loading with a config or file override needs custom:gpulab:admin"
        )


def status_of(exc: Exception) -> tuple[grpc.StatusCode, str]:
    """The status a caller gets for ``exc``; Triton's own answers (and dropped calls) pass through."""
    if isinstance(exc, GatewayError):
        return exc.code, exc.message
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code(), exc.details() or ""
    if isinstance(exc, NoReplicaError | CircuitOpenError):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    raise exc
