"""Deploy models and call them from notebooks: ``deploy``, ``models``, ``undeploy``, ``infer``, ``infer_async``,
``triton_client``, ``rest_client``.

Configuration comes from the environment the hub gives every user server and kernel: ``GPULAB_INFER_URL``
(the gpulab-infer HTTP API: deploy, list, delete), ``GPULAB_INFER_ADDRESS`` (its gRPC endpoint, host:port:
inference), ``GPULAB_INFER_REST_ADDRESS`` (its KServe v2 REST port) and ``JUPYTERHUB_API_TOKEN``. Inference
uses ``tritonclient.grpc`` (one client per process, reused) with the :class:`~gpulab.inference.client.HubAuth`
plugin, which adds ``authorization: token ...`` and the current ``traceparent`` to every call. Failures raise :class:`InferenceError` (a
:class:`~gpulab.kernels.client.GpulabError`) whose one-line message names the problem.
"""

from __future__ import annotations  # InferenceClient.models is a method name

import asyncio
import os
from contextlib import nullcontext

import numpy as np
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
import tritonclient.http as triton_http
from opentelemetry import trace
from tritonclient.utils import InferenceServerException

from .. import tracing
from ..inference.client import (
    BadInput,
    HubAuth,
    infer_inputs,
    message_of,
    outputs_of,
    status_of,
    tls_options,
    to_arrays,
)
from ..service.client import GpulabError, HubServiceClient, env, service_url

_HINTS = {
    "UNAUTHENTICATED": "the token in JUPYTERHUB_API_TOKEN was not accepted; restart your server from the hub",
    "PERMISSION_DENIED": "ask an admin for access",
    "UNAVAILABLE": "try again in a minute; if it persists, tell your admin",
}


class InferenceError(GpulabError):
    """A call to a model failed; ``status`` is the gRPC status (``INVALID_ARGUMENT``, ``NOT_FOUND``, ...)."""

    def __init__(self, status: str, message: str):
        self.status = status
        hint = _HINTS.get(status)
        super().__init__(f"{message}; {hint}" if hint else message)

    @classmethod
    def from_exception(cls, exc: InferenceServerException) -> InferenceError:
        return cls(status_of(exc), message_of(exc))


def _signature(tensors: list[dict]) -> str:
    return ", ".join(f"{t['name']} {t['datatype']}[{','.join(map(str, t['shape']))}]" for t in tensors)


class Model:
    """A deployed model as gpulab-infer describes it (``data``); call it with :meth:`infer`."""

    def __init__(self, client: InferenceClient, data: dict):
        self.client, self.data = client, data

    name = property(lambda self: self.data["name"])
    ready = property(lambda self: self.data["ready"])
    owner = property(lambda self: self.data["owner"])
    inputs = property(lambda self: self.data["inputs"])
    outputs = property(lambda self: self.data["outputs"])
    versions = property(lambda self: [v["version"] for v in self.data["versions"]])

    @property
    def version(self) -> int | None:
        """The version served (the newest ready one), else the newest."""
        ready = [v["version"] for v in self.data["versions"] if v["state"] == "READY"]
        return max(ready or self.versions or [None])

    def infer(self, inputs, outputs: list[str] | None = None, version: int | None = None) -> dict[str, np.ndarray]:
        return self.client.infer(self.name, inputs, outputs, version)

    def __repr__(self) -> str:
        state = "ready" if self.ready else "not ready"
        return (
            f"<gpulab Model '{self.name}' v{self.version} {state}: {_signature(self.inputs)} -> "
            f"{_signature(self.outputs)}>"
        )


class ModelList(list):
    """A list of :class:`Model` that prints as a table."""

    def __repr__(self) -> str:
        if not self:
            return "no models"
        rows = [("name", "version", "ready", "owner", "inputs -> outputs")]
        rows += [
            (
                m.name,
                str(m.version),
                "yes" if m.ready else "no",
                m.owner or "",
                f"{_signature(m.inputs)} -> {_signature(m.outputs)}",
            )
            for m in self
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows)


class InferenceClient:
    """Deploys through gpulab-infer's HTTP API and calls models over its gRPC endpoint, for the user whose
    token this process holds."""

    def __init__(self, url: str | None = None, address: str | None = None, token: str | None = None):
        self.api = HubServiceClient("gpulab-infer", url or service_url("gpulab-infer"), token)  # its HTTP API
        self.url, self.token = self.api.url, self.api.token
        self.address = address or env("GPULAB_INFER_ADDRESS", "the inference gateway's gRPC address")
        tracing.setup_tracing("gpulab-kernel")
        self.grpc = self.triton_client()
        self._aio: tuple[asyncio.AbstractEventLoop, triton_aio.InferenceServerClient] | None = None
        self._metadata: dict[tuple[str, str], dict] = {}
        self._tracer = tracing.tracer(__name__)

    def triton_client(self, aio: bool = False):
        """A new stock ``tritonclient.grpc`` (or ``.aio``) ``InferenceServerClient`` for the gateway that sends
        the hub token and ``traceparent`` with every call by itself (:class:`HubAuth`)."""
        client = (triton_aio if aio else triton).InferenceServerClient(self.address, **tls_options())
        client.register_plugin(HubAuth(self.token))
        return client

    def rest_client(self) -> triton_http.InferenceServerClient:
        """A new stock ``tritonclient.http`` ``InferenceServerClient`` for the gateway's KServe v2 REST port
        (``$GPULAB_INFER_REST_ADDRESS``) that sends the hub token and ``traceparent`` with every call by itself."""
        address = env("GPULAB_INFER_REST_ADDRESS", "the inference gateway's REST address")
        ca = os.environ.get("GPULAB_INFER_TLS_CA")
        client = triton_http.InferenceServerClient(
            address, **({"ssl": True, "ssl_options": {"ca_certs": ca}} if ca else {})
        )
        client.register_plugin(HubAuth(self.token))
        return client

    @property
    def aio(self) -> triton_aio.InferenceServerClient:
        """The asyncio client of the running event loop (gRPC aio channels belong to one loop)."""
        loop = asyncio.get_running_loop()
        if self._aio is None or self._aio[0] is not loop:
            self._aio = (loop, self.triton_client(aio=True))
        return self._aio[1]

    # --- deployments (HTTP) ---------------------------------------------------------------------------------
    def deploy(self, source: str, name: str, backend: str | None = None) -> Model:
        """Serve an MLflow model (``runs:/<run_id>/model``, ``models:/<name>/<version>`` or a run id) as the
        next version of ``name``; returns once every replica serves it."""
        body = {"source": source, "name": name, **({"backend": backend} if backend else {})}
        return Model(self, self.api.request("POST", "/models", json=body, timeout=900).json())

    def models(self) -> ModelList:
        """The deployed models you may call."""
        return ModelList(Model(self, m) for m in self.api.request("GET", "/models").json()["models"])

    def model(self, name: str) -> Model:
        return Model(self, self.api.request("GET", f"/models/{name}").json())

    def undeploy(self, name: str) -> None:
        """Unload ``name`` from every replica and remove it (its owner or an admin)."""
        self.api.request("DELETE", f"/models/{name}")

    # --- inference (gRPC) -----------------------------------------------------------------------------------
    def _span(self, name: str):
        """A client span for one call where spans are exported (an SDK span costs 50-90 us per call here); either
        way the caller's current trace context travels in ``traceparent``."""
        if not tracing.exporting():
            return nullcontext()
        return self._tracer.start_as_current_span(f"infer {name}", kind=trace.SpanKind.CLIENT)

    @staticmethod
    def _prepare(metadata: dict, inputs, outputs, module) -> tuple[list, list | None]:
        try:
            tensors = infer_inputs(module, to_arrays(metadata, inputs))
        except BadInput as e:
            raise InferenceError("INVALID_ARGUMENT", e.message) from None
        return tensors, [module.InferRequestedOutput(o) for o in outputs] if outputs else None

    def infer(
        self, model: str | Model, inputs, outputs: list[str] | None = None, version: int | None = None
    ) -> dict[str, np.ndarray]:
        """Call ``model`` with ``inputs`` (``{name: array}``, or one array for a single-input model; arrays are
        sent as they are, lists converted to the input's datatype); returns ``{output name: array}`` (all
        outputs, or those named in ``outputs``)."""
        name, version = getattr(model, "name", model), "" if version is None else str(version)
        with self._span(name):
            try:
                key = (name, version)
                if key not in self._metadata:
                    self._metadata[key] = self.grpc.get_model_metadata(name, version, as_json=True)
                tensors, requested = self._prepare(self._metadata[key], inputs, outputs, triton)
                return outputs_of(self.grpc.infer(name, tensors, version, requested))
            except InferenceServerException as e:
                self._metadata.pop((name, version), None)  # it may have been redeployed with other inputs
                raise InferenceError.from_exception(e) from None

    async def infer_async(
        self, model: str | Model, inputs, outputs: list[str] | None = None, version: int | None = None
    ) -> dict[str, np.ndarray]:
        """:meth:`infer` with ``tritonclient.grpc.aio``: ``await`` many at once for concurrency."""
        name, version = getattr(model, "name", model), "" if version is None else str(version)
        with self._span(name):
            try:
                key = (name, version)
                if key not in self._metadata:
                    self._metadata[key] = await self.aio.get_model_metadata(name, version, as_json=True)
                tensors, requested = self._prepare(self._metadata[key], inputs, outputs, triton_aio)
                return outputs_of(await self.aio.infer(name, tensors, version, requested))
            except InferenceServerException as e:
                self._metadata.pop((name, version), None)
                raise InferenceError.from_exception(e) from None


_default: InferenceClient | None = None


def default_client() -> InferenceClient:
    """The client for the current environment (made again when its variables change)."""
    global _default
    env = tuple(os.environ.get(k, "") for k in ("GPULAB_INFER_URL", "GPULAB_INFER_ADDRESS", "JUPYTERHUB_API_TOKEN"))
    if _default is None or (_default.url, _default.address, _default.token) != (env[0].rstrip("/"), *env[1:]):
        _default = InferenceClient()
    return _default


def deploy(source: str, name: str, backend: str | None = None) -> Model:
    """Serve an MLflow model as the next version of ``name``: ``deploy("runs:/<run_id>/model", "digits")``."""
    return default_client().deploy(source, name, backend)


def models() -> ModelList:
    """The deployed models you may call."""
    return default_client().models()


def undeploy(name: str) -> None:
    """Unload and remove a model you deployed."""
    default_client().undeploy(name)


def infer(model: str | Model, inputs, outputs: list[str] | None = None, version: int | None = None):
    """Call a deployed model: ``infer("digits", X[:5])["label"]``."""
    return default_client().infer(model, inputs, outputs, version)


async def infer_async(model: str | Model, inputs, outputs: list[str] | None = None, version: int | None = None):
    """``await infer_async("digits", X[:5])``; gather many for concurrency."""
    return await default_client().infer_async(model, inputs, outputs, version)


def triton_client(aio: bool = False):
    """A stock ``tritonclient.grpc`` (``aio=True``: ``tritonclient.grpc.aio``) ``InferenceServerClient`` for the
    gateway, ready to use: every call carries your hub token and ``traceparent`` without passing headers."""
    return default_client().triton_client(aio)


def rest_client():
    """A stock ``tritonclient.http`` ``InferenceServerClient`` for the gateway's KServe v2 REST port, ready to use
    as :func:`triton_client`."""
    return default_client().rest_client()
