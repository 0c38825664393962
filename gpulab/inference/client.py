"""Calling models through ``gpulab-infer`` with the stock ``tritonclient``: shared by the kernel API and the
server extension.

:class:`HubAuth` is a tritonclient plugin: registered on a client, it adds ``authorization: token <hub token>``
and the current ``traceparent`` to every call, so callers never pass headers. :func:`to_arrays` and
:func:`infer_inputs` turn ``{name: array-like}`` (or one array, for single-input models) into request tensors.
"""

import os
import re

import numpy as np
from tritonclient._plugin import InferenceServerClientPlugin
from tritonclient.utils import InferenceServerException, np_to_triton_dtype, triton_to_np_dtype

from .. import tracing


class HubAuth(InferenceServerClientPlugin):
    """Adds the hub token and the current ``traceparent`` to each call; headers the caller passes win."""

    def __init__(self, token: str):
        self.authorization = f"token {token}"

    def __call__(self, request):
        request.headers = tracing.inject({"authorization": self.authorization, **(request.headers or {})})


def tls_options() -> dict:
    """``InferenceServerClient`` keyword arguments for the gateway: TLS verified against
    ``$GPULAB_INFER_TLS_CA`` when the platform serves it with TLS, else none (plaintext)."""
    ca = os.environ.get("GPULAB_INFER_TLS_CA")
    return {"ssl": True, "root_certificates": ca} if ca else {}


class BadInput(ValueError):
    """Inputs that cannot be sent: ``field`` (``inputs.<tensor>``) and a message naming the tensor."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.message, self.field = message, field


def status_of(exc: InferenceServerException) -> str:
    """``INVALID_ARGUMENT`` from tritonclient's ``StatusCode.INVALID_ARGUMENT``."""
    return (exc.status() or "StatusCode.UNKNOWN").removeprefix("StatusCode.")


def message_of(exc: InferenceServerException) -> str:
    """Triton's message without its ``[request id: ...]`` prefix."""
    return re.sub(r"^\[request id: [^\]]*\]\s*", "", exc.message() or "").strip()


def tensor_of(message: str) -> str | None:
    """The tensor a Triton error message names (``... input 'x' ...``)."""
    match = re.search(r"input '([^']+)'", message)
    return match and match[1]


def to_arrays(metadata: dict, inputs) -> dict[str, np.ndarray]:
    """``inputs`` (``{name: array-like}``, or one array-like for a single-input model) as numpy arrays; arrays
    are sent as they are, anything else is converted to the input's datatype. ``metadata`` is the model's
    (``get_model_metadata(..., as_json=True)``)."""
    declared = {t["name"]: t["datatype"] for t in metadata["inputs"]}
    if not isinstance(inputs, dict):
        if len(declared) != 1:
            raise BadInput(
                f"model '{metadata['name']}' has {len(declared)} inputs ({', '.join(declared)}): pass {{name: array}}",
                "inputs",
            )
        inputs = {next(iter(declared)): inputs}
    arrays = {}
    for name, value in inputs.items():
        if name not in declared:
            raise BadInput(
                f"model '{metadata['name']}' has no input '{name}' (its inputs: {', '.join(declared)})",
                f"inputs.{name}",
            )
        if isinstance(value, np.ndarray):
            arrays[name] = value
            continue
        try:
            arrays[name] = np.asarray(value, dtype=triton_to_np_dtype(declared[name]))
        except (TypeError, ValueError) as e:
            raise BadInput(f"input '{name}' takes {declared[name]} values: {e}", f"inputs.{name}") from None
    return arrays


def infer_inputs(module, arrays: dict[str, np.ndarray]) -> list:
    """``module.InferInput`` tensors (``module``: ``tritonclient.grpc`` or its ``aio``) holding ``arrays``."""
    tensors = []
    for name, array in arrays.items():
        datatype = np_to_triton_dtype(array.dtype)
        if datatype is None:
            raise BadInput(f"input '{name}': numpy {array.dtype} has no Triton datatype", f"inputs.{name}")
        tensor = module.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors


def outputs_of(result) -> dict[str, np.ndarray]:
    """Every output of an ``InferResult`` as numpy arrays."""
    return {output.name: result.as_numpy(output.name) for output in result.get_response().outputs}
