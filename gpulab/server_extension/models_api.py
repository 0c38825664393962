"""``/gpulab/api/v1/models...`` in the user's server: deploy, list and delete models (forwarded to gpulab-infer's
HTTP API) and call them (``/models/{name}/infer``, over gRPC to the gateway), acting for this server's user
with the server's token.

Reading and inference need ``custom:gpulab:infer``, deploying and deleting ``custom:gpulab:deploy``. Inference
bodies are ``{"inputs": {"x": [[...]]}, "outputs": [...], "version": 2}`` (answered with ``{"outputs":
{"y": [[...]]}}``) or KServe v2 (``{"inputs": [{"name", "shape", "datatype", "data"}]}``, answered in kind),
with the binary tensor extension for large tensors (``kserve.py``). Triton's errors keep their message: bad
input 400 naming the tensor and its expected shape, unknown model 404, oversized 413.
"""

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
from ..service.client import HubServiceClient
from ..service.errors import APIError, error_code, http_status
from .handlers import GpulabHandler
from .jobs_api import ServiceProxyHandler, client_of, forwarding


class InferChannel:
    """gpulab-infer's gRPC side as this server sees it (``$GPULAB_INFER_ADDRESS``): one aio client on the server's
    event loop sending the server's token with every call, and the models' metadata read so far."""

    def __init__(self, address: str | None, token: str):
        self.address = address
        self.token = token
        self._client: triton_aio.InferenceServerClient | None = None
        self.metadata: dict[tuple[str, str], dict] = {}

    @classmethod
    def from_env(cls) -> "InferChannel":
        return cls(os.environ.get("GPULAB_INFER_ADDRESS"), os.environ.get("JUPYTERHUB_API_TOKEN", ""))

    @property
    def client(self) -> triton_aio.InferenceServerClient:
        if not self.address:
            raise APIError(
                503, "the inference gateway is not configured (GPULAB_INFER_ADDRESS is not set)", code="unavailable"
            )
        if self._client is None:
            self._client = triton_aio.InferenceServerClient(self.address, **tls_options())
            self._client.register_plugin(HubAuth(self.token))
        return self._client


class ModelsProxyHandler(ServiceProxyHandler):
    @property
    def auth_resource(self) -> str:
        return "gpulab:infer" if self.request.method == "GET" else "gpulab:deploy"

    @property
    def service(self) -> HubServiceClient:
        return client_of(self, "gpulab_infer")


class InferHandler(GpulabHandler):
    """``POST /models/{name}/infer``: one inference through the gateway."""

    auth_resource = "gpulab:infer"

    @web.authenticated
    async def post(self, name):
        client_of(self, "gpulab_infer")  # inference without the service's HTTP API is not set up either
        backend: InferChannel = self.settings["gpulab_infer_grpc"]
        try:
            body, binary = kserve.split(self.request.body, self.request.headers.get(kserve.HEADER_LENGTH))
        except BadInput as e:
            raise APIError(400, e.message, e.field, code="invalid") from None
        inputs = body.get("inputs")
        if not isinstance(inputs, dict | list) or not inputs:
            raise APIError(400, 'give "inputs": {"<tensor>": [...]} or KServe v2 input tensors', "inputs", "invalid")
        requested = [o.get("name") if isinstance(o, dict) else o for o in body.get("outputs") or []]
        if not all(isinstance(o, str) for o in requested):
            raise APIError(400, 'outputs are names, or KServe v2 {"name": ...} objects', "outputs", "invalid")
        version = str(body.get("version") or "")
        kserve_form = isinstance(inputs, list)
        key = (name, version)
        try:
            with trace.use_span(self._span, end_on_exit=False):  # the request's span: its traceparent goes along
                if kserve_form:
                    arrays = kserve.request_arrays(inputs, binary)
                elif binary:
                    raise BadInput('binary data goes with KServe v2 input tensors (a list under "inputs")', "inputs")
                else:
                    if key not in backend.metadata:
                        backend.metadata[key] = await backend.client.get_model_metadata(name, version, as_json=True)
                    arrays = to_arrays(backend.metadata[key], inputs)
                result = await backend.client.infer(
                    name,
                    infer_inputs(triton_aio, arrays),
                    version,
                    [triton_aio.InferRequestedOutput(o) for o in requested] or None,
                    client_timeout=60,
                )
        except BadInput as e:
            raise APIError(400, e.message, e.field, code="invalid") from None
        except InferenceServerException as e:
            backend.metadata.pop(key, None)  # it may have been redeployed with other inputs
            message = message_of(e)
            tensor = tensor_of(message)
            raise APIError(
                http_status(status_of(e), 502),
                message,
                f"inputs.{tensor}" if tensor else None,
                error_code(status_of(e), "bad_gateway"),
            ) from None
        if not kserve_form:
            response = result.get_response()
            self.finish(
                {
                    "model_name": response.model_name,
                    "model_version": response.model_version,
                    "outputs": {o: kserve.json_array(a) for o, a in outputs_of(result).items()},
                }
            )
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


MODEL = r"(?P<name>[A-Za-z0-9][A-Za-z0-9_.-]{0,63})"
ROUTES = [
    ("/models", forwarding("/models", "GET", "POST", base=ModelsProxyHandler)),
    (f"/models/{MODEL}", forwarding("/models/{name}", "GET", "DELETE", base=ModelsProxyHandler)),
    (f"/models/{MODEL}/infer", InferHandler),
]
