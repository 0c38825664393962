"""``/gpulab/api/v1/models...`` in the user's server: deploy, list and delete models (forwarded to gpulab-infer's
HTTP API) and call them (``/models/{name}/infer``, over gRPC to the gateway), acting for this server's user
with the server's token.

Reading and inference need ``custom:gpulab:infer``, deploying and deleting ``custom:gpulab:deploy``. Inference
bodies are ``{"inputs": {"x": [[...]]}, "outputs": [...], "version": 2}`` (answered with ``{"outputs":
{"y": [[...]]}}``) or KServe v2 (``{"inputs": [{"name", "shape", "datatype", "data"}]}``, answered in kind),
with the binary tensor extension for large tensors (``kserve.py``). Triton's errors keep their message: bad
input 400 naming the tensor and its expected shape, unknown model 404, oversized 413.
"""

import json
import logging
import os

import tritonclient.grpc.aio as triton_aio
from jupyterhub.metrics import prometheus_log_method
from opentelemetry import trace
from tornado import web
from tornado.log import access_log
from tritonclient.utils import InferenceServerException

from ..inference import kserve
from ..inference.client import (
    HTTP_STATUS,
    BadInput,
    HubAuth,
    infer_inputs,
    message_of,
    outputs_of,
    status_of,
    tensor_of,
    tls_options,
    to_arrays,
)
from .handlers import GpulabHandler
from .jobs import JobsBackend, ServiceProxyHandler


class InferBackend(JobsBackend):
    """gpulab-infer as this server sees it: its HTTP API (URL, token, breaker) and gRPC address."""

    name = "gpulab-infer"

    def __init__(self, url: str, token: str, address: str | None):
        super().__init__(url, token)
        self.address = address
        self._client: triton_aio.InferenceServerClient | None = None
        self.metadata: dict[tuple[str, str], dict] = {}

    @classmethod
    def from_env(cls) -> "InferBackend | None":
        url = os.environ.get("GPULAB_INFER_URL")
        return cls(url, os.environ.get("JUPYTERHUB_API_TOKEN", ""), os.environ.get("GPULAB_INFER_ADDRESS")) if url \
            else None

    @property
    def client(self) -> triton_aio.InferenceServerClient:
        """One aio client on the server's event loop, sending the server's token with every call."""
        if not self.address:
            raise web.HTTPError(503, "the inference gateway is not configured (GPULAB_INFER_ADDRESS is not set)")
        if self._client is None:
            self._client = triton_aio.InferenceServerClient(self.address, **tls_options())
            self._client.register_plugin(HubAuth(self.token))
        return self._client


def _backend(handler) -> InferBackend:
    backend = handler.settings.get("gpulab_infer")
    if backend is None:
        raise web.HTTPError(503, "the inference service is not configured (GPULAB_INFER_URL is not set)")
    return backend


class RequestError(web.HTTPError):
    """An HTTP error naming the request ``field`` at fault."""

    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(status, message.replace("%", "%%"))
        self.field = field


class ModelsProxyHandler(ServiceProxyHandler):
    @property
    def auth_resource(self) -> str:
        return "gpulab:infer" if self.request.method == "GET" else "gpulab:deploy"

    @property
    def backend(self) -> InferBackend:
        return _backend(self)


class ModelsHandler(ModelsProxyHandler):
    @web.authenticated
    async def get(self):
        await self.forward("/models")

    @web.authenticated
    async def post(self):
        await self.forward("/models")


class ModelHandler(ModelsProxyHandler):
    @web.authenticated
    async def get(self, name):
        await self.forward(f"/models/{name}")

    @web.authenticated
    async def delete(self, name):
        await self.forward(f"/models/{name}")


class InferHandler(GpulabHandler):
    """``POST /models/{name}/infer``: one inference through the gateway."""

    auth_resource = "gpulab:infer"

    @web.authenticated
    async def post(self, name):
        backend = _backend(self)
        try:
            body, binary = kserve.split(self.request.body, self.request.headers.get(kserve.HEADER_LENGTH))
        except BadInput as e:
            raise RequestError(400, e.message, e.field) from None
        inputs = body.get("inputs")
        if not isinstance(inputs, dict | list) or not inputs:
            raise RequestError(400, 'give "inputs": {"<tensor>": [...]} or KServe v2 input tensors', "inputs")
        requested = [o.get("name") if isinstance(o, dict) else o for o in body.get("outputs") or []]
        if not all(isinstance(o, str) for o in requested):
            raise RequestError(400, 'outputs are names, or KServe v2 {"name": ...} objects', "outputs")
        version = str(body.get("version") or "")
        kserve_form = isinstance(inputs, list)
        key = (name, version)
        try:
            with trace.use_span(self._span, end_on_exit=False):  # the request's span: its traceparent goes along
                if kserve_form:
                    arrays = kserve.request_arrays(inputs, binary)
                elif binary:
                    raise BadInput("binary data goes with KServe v2 input tensors (a list under \"inputs\")",
                                   "inputs")
                else:
                    if key not in backend.metadata:
                        backend.metadata[key] = await backend.client.get_model_metadata(name, version, as_json=True)
                    arrays = to_arrays(backend.metadata[key], inputs)
                result = await backend.client.infer(name, infer_inputs(triton_aio, arrays), version,
                                                    [triton_aio.InferRequestedOutput(o) for o in requested] or None,
                                                    client_timeout=60)
        except BadInput as e:
            raise RequestError(400, e.message, e.field) from None
        except InferenceServerException as e:
            backend.metadata.pop(key, None)  # it may have been redeployed with other inputs
            message = message_of(e)
            tensor = tensor_of(message)
            raise RequestError(HTTP_STATUS.get(status_of(e), 502), message,
                               f"inputs.{tensor}" if tensor else None) from None
        if not kserve_form:
            response = result.get_response()
            self.finish({"model_name": response.model_name, "model_version": response.model_version,
                         "outputs": {o: kserve.json_array(a) for o, a in outputs_of(result).items()}})
            return
        answer, header_length = kserve.response_body(result, *kserve.binary_outputs(body))
        if header_length is None:
            self.finish(answer)
            return
        self.set_header(kserve.HEADER_LENGTH, str(header_length))
        self.finish(answer, set_content_type="application/octet-stream")

    def _log(self):
        """Successful inferences are logged only with debug logging on, as JupyterHub treats health checks: at
        hundreds a second their lines would bury the rest of the log. Their request metrics are still recorded."""
        if self.get_status() < 300 and not access_log.isEnabledFor(logging.DEBUG):
            prometheus_log_method(self)
            return
        super()._log()

    def write_error(self, status_code, **kwargs):
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if not isinstance(exc, RequestError):
            return super().write_error(status_code, **kwargs)
        self.set_header("Content-Type", "application/json")  # the gateway's 5xx messages say what is wrong
        self.finish(json.dumps({"error": {"code": status_code, "message": exc.log_message.replace("%%", "%"),
                                          "field": exc.field}}))


MODEL = r"(?P<name>[A-Za-z0-9][A-Za-z0-9_.-]{0,63})"
ROUTES = [
    ("/models", ModelsHandler),
    (f"/models/{MODEL}", ModelHandler),
    (f"/models/{MODEL}/infer", InferHandler),
]
