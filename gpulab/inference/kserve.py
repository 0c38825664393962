"""KServe v2 REST inference bodies: JSON tensors and the binary tensor extension, as ``tritonclient.http``
writes and reads them.

In the binary form the request carries ``Inference-Header-Content-Length: <n>``: its first n bytes are the JSON
header and the rest the inputs' bytes, in order, each such input declaring ``"parameters": {"binary_data_size":
<bytes>}`` instead of ``data``. Outputs are answered in binary when the request asks (``"parameters":
{"binary_data_output": true}``, or ``"binary_data": true`` on an output): Triton's raw output bytes go out as they
came over gRPC, never through numpy or JSON.
"""

import json

import numpy as np
from tritonclient.utils import deserialize_bytes_tensor, triton_to_np_dtype

from .client import BadInput

HEADER_LENGTH = "Inference-Header-Content-Length"


def split(body: bytes, header_length: str | None) -> tuple[dict, memoryview]:
    """The JSON header of ``body`` and the binary data after it (empty without ``header_length``)."""
    end = len(body)
    if header_length is not None:
        try:
            end = int(header_length)
        except ValueError:
            end = -1
        if not 0 <= end <= len(body):
            raise BadInput(
                f"{HEADER_LENGTH} must be a byte count from 0 to the body's {len(body)} bytes, not '{header_length}'",
                HEADER_LENGTH,
            )
    try:
        header = json.loads(bytes(body[:end]) or b"{}")
    except ValueError as e:
        raise BadInput(f"body is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise BadInput("body must be a JSON object")
    return header, memoryview(body)[end:]


def request_arrays(inputs: list, binary: memoryview) -> dict[str, np.ndarray]:
    """KServe v2 input tensors as arrays: ``data`` (flat or nested) or their share of ``binary``."""
    arrays, offset = {}, 0
    for i, tensor in enumerate(inputs):
        if not isinstance(tensor, dict) or not {"name", "shape", "datatype"} <= tensor.keys():
            raise BadInput(
                "each KServe v2 input needs name, shape, datatype, and data or binary_data_size", f"inputs[{i}]"
            )
        name, shape, datatype = tensor["name"], tensor["shape"], tensor["datatype"]
        size = (tensor.get("parameters") or {}).get("binary_data_size")
        try:
            dtype = triton_to_np_dtype(datatype)
            if dtype is None:
                raise ValueError(f"unknown datatype '{datatype}'")
            if size is None:
                if "data" not in tensor:
                    raise ValueError("give data, or parameters.binary_data_size with the binary extension")
                arrays[name] = np.asarray(tensor["data"], dtype=dtype).reshape(shape)
                continue
            if type(size) is not int or size < 0 or offset + size > len(binary):
                raise ValueError(
                    f"binary_data_size {size!r} does not fit the {len(binary) - offset} bytes of "
                    "binary data left in the body"
                )
            chunk = binary[offset : offset + size]
            offset += size
            if dtype == np.object_:  # BYTES: length-prefixed elements
                arrays[name] = deserialize_bytes_tensor(bytes(chunk)).reshape(shape)
                continue
            needed = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            if size != needed:
                raise ValueError(f"shape {shape} of {datatype} takes {needed} bytes, binary_data_size is {size}")
            arrays[name] = np.frombuffer(chunk, dtype).reshape(shape)
        except (TypeError, ValueError) as e:
            raise BadInput(f"input '{name}': {e}", f"inputs.{name}") from None
    if offset != len(binary):
        raise BadInput(f"the inputs declare {offset} bytes of binary data, the body carries {len(binary)}", "inputs")
    return arrays


def request_problem(body: bytes, header_length: str | None) -> str | None:
    """What makes ``body`` no KServe v2 inference request (naming the field), or None: how the gateway tells a
    client's error from Triton's own failure when Triton answers 500, as 2.51 does for JSON it cannot parse or
    read (members missing or of the wrong type)."""
    try:
        header, binary = split(body, header_length)
        inputs = header.get("inputs")
        if not isinstance(inputs, list) or not inputs:
            raise BadInput("inputs: give a list of input tensors", "inputs")
        request_arrays(inputs, binary)
        outputs = header.get("outputs", [])
        if not isinstance(outputs, list) or not all(
            isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs
        ):
            raise BadInput('outputs: give a list of {"name": <output>} objects', "outputs")
        for key, kind, what in (("id", str, "a string"), ("parameters", dict, "a JSON object")):
            if key in header and not isinstance(header[key], kind):
                raise BadInput(f"{key}: must be {what}", key)
    except BadInput as e:
        return e.message
    except (AttributeError, TypeError, ValueError) as e:  # members of the wrong type deeper down
        return f"body is not a KServe v2 inference request: {e}"
    return None


def binary_outputs(header: dict) -> tuple[bool, set[str]]:
    """Whether every output is wanted in binary, and the outputs asked for in binary one by one."""
    every = (header.get("parameters") or {}).get("binary_data_output") is True
    named = {
        o.get("name")
        for o in header.get("outputs") or []
        if isinstance(o, dict) and (o.get("parameters") or {}).get("binary_data") is True
    }
    return every, named


def json_array(array: np.ndarray) -> list:
    if array.dtype == np.object_:  # BYTES
        array = np.vectorize(lambda v: v.decode("utf-8", "replace") if isinstance(v, bytes) else v, otypes=[object])(
            array
        )
    return array.tolist()


def response_body(result, every_binary: bool, binary_names: set[str]) -> tuple[bytes, int | None]:
    """The answer to a KServe v2 request for ``result`` (a gRPC ``InferResult``), and its JSON header's length
    when outputs follow in binary."""
    response = result.get_response()
    outputs, chunks = [], []
    for i, output in enumerate(response.outputs):
        tensor = {"name": output.name, "datatype": output.datatype, "shape": list(output.shape)}
        if every_binary or output.name in binary_names:
            raw = response.raw_output_contents[i]
            tensor["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            tensor["data"] = json_array(result.as_numpy(output.name).ravel())
        outputs.append(tensor)
    header = json.dumps(
        {"model_name": response.model_name, "model_version": response.model_version, "outputs": outputs}
    ).encode()
    return (b"".join([header, *chunks]), len(header)) if chunks else (header, None)
