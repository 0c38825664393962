"""Fetch a model from MLflow and convert it to ONNX: ``python -m gpulab.inference.convert SOURCE OUT_DIR [--float32]``.

gpulab-infer runs this in a child process with a scrubbed environment (``MLFLOW_TRACKING_URI`` and little
else: no hub token, no Triton key), so that loading a user's model, which can run code from the model
file, never happens inside the gateway. It writes ``OUT_DIR/model.onnx`` and prints one JSON line:
``{"flavor", "inputs", "outputs"}`` (tensors as ``{"name", "datatype", "shape"}``), or ``{"error": {"status", "message", "field"}}`` (and exits 1).

Flavors: ``onnx`` (used as is), ``sklearn`` (skl2onnx; the skops format loads only the types skops trusts
by default, pickled formats only when ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=true``) and ``pytorch``
(torch.export + the ONNX dynamo exporter; needs torch and onnxscript; MLflow's ``pt2`` format needs no
pickle, its older pickle format only where pickles are allowed). Inputs follow the MLflow signature: its tensor
names, dtypes and shapes (-1 stays dynamic); columns become one ``[-1, n_columns]`` tensor. ``--float32``
(GPU backends) turns float64 inputs into float32.
"""

import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

OPSET = 17
PICKLE_ADVICE = (
    "loading it runs code from the file; log it in the skops format (MLflow's default for "
    "scikit-learn) or ask an admin to set InferenceGateway.allow_pickle"
)


class ConvertError(Exception):
    def __init__(self, status: int, message: str, field: str | None = "source"):
        super().__init__(message)
        self.status, self.message, self.field = status, message, field


def fetch(source: str, dest: Path) -> Path:
    """Download the MLflow model at ``source`` (``runs:/...`` or ``models:/...``) into ``dest``."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        path = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dest)))
    except MlflowException as e:
        message = e.message.splitlines()[0]
        if e.error_code == "PERMISSION_DENIED":  # MLflow's permissions, for the deployer (gpulab-infer acts for them);
            # MLflow answers so for a run that does not exist too: say neither which
            raise ConvertError(
                404, f"no model at {source} that you may read in MLflow (there is none, or it is not shared with you)"
            ) from None
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE") or "Failed to download" in message:
            raise ConvertError(404, f"no model at {source} in MLflow: {message}") from None
        raise ConvertError(503, f"cannot fetch {source} from MLflow: {message}") from None
    except OSError as e:
        raise ConvertError(503, f"cannot fetch {source} from MLflow: {e}") from None
    if not (path / "MLmodel").exists():
        raise ConvertError(404, f"{source} is not an MLflow model (it has no MLmodel file)")
    return path


def input_specs(signature, float32: bool) -> list[tuple[str, np.dtype, list[int]]]:
    """``(name, dtype, shape)`` per model input from an MLflow signature ([] without one)."""
    if signature is None or signature.inputs is None:
        return []
    schema = signature.inputs
    if schema.is_tensor_spec():
        specs = [(spec.name, np.dtype(spec.type), list(spec.shape)) for spec in schema.inputs]
        names = ["input"] if len(specs) == 1 else [f"input_{i}" for i in range(len(specs))]
        specs = [(name or default, dtype, shape) for (name, dtype, shape), default in zip(specs, names)]
    else:
        dtypes = {np.dtype(t.to_numpy()) for t in schema.input_types()}
        if len(dtypes) != 1 or next(iter(dtypes)).kind not in "biuf":
            raise ConvertError(
                422,
                "the model's signature has columns of several or non-numeric types; "
                "log it with a tensor signature (e.g. input_example as a numpy array)",
            )
        specs = [("input", dtypes.pop(), [-1, len(schema.inputs)])]
    return [
        (name, np.dtype(np.float32) if float32 and dtype == np.float64 else dtype, shape)
        for name, dtype, shape in specs
    ]


def _allow_pickle(what: str) -> None:
    if os.environ.get("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "").lower() != "true":
        raise ConvertError(422, f"{what} is a pickle: {PICKLE_ADVICE}")


def sklearn_to_onnx(model_dir: Path, flavor: dict, specs: list, out: Path) -> None:
    from skl2onnx import to_onnx
    from skl2onnx.common import data_types
    from sklearn.base import is_classifier

    fmt = flavor.get("serialization_format", "cloudpickle")
    if fmt == "skops":
        import skops.io
        from skops.io.exceptions import UntrustedTypesFoundException

        try:
            model = skops.io.load(model_dir / flavor["pickled_model"])
        except UntrustedTypesFoundException as e:
            raise ConvertError(422, f"the model holds types skops does not trust: {e}") from None
    else:
        _allow_pickle(f"this scikit-learn model ({fmt})")
        import mlflow.sklearn

        model = mlflow.sklearn.load_model(str(model_dir))
    if not specs:
        features = getattr(model, "n_features_in_", None)
        if features is None:
            raise ConvertError(
                422,
                "the model has no signature and does not say how many features it takes; "
                "log it with input_example or signature",
            )
        specs = [("input", np.dtype(np.float32), [-1, features])]
    if len(specs) != 1:
        raise ConvertError(422, f"a scikit-learn model takes one input; its signature has {len(specs)}")
    name, dtype, shape = specs[0]
    types = {
        "float32": data_types.FloatTensorType,
        "float64": data_types.DoubleTensorType,
        "int64": data_types.Int64TensorType,
        "int32": data_types.Int32TensorType,
    }
    if dtype.name not in types:
        raise ConvertError(422, f"input '{name}': {dtype.name} inputs are not supported for scikit-learn models")
    initial = [(name, types[dtype.name]([None if d == -1 else d for d in shape]))]
    try:
        onnx_model = to_onnx(
            model,
            initial_types=initial,
            target_opset=OPSET,
            options={"zipmap": False} if is_classifier(model) else None,
        )
    except Exception as e:  # noqa: BLE001 - skl2onnx raises many kinds; all mean "cannot convert"
        raise ConvertError(422, f"cannot convert {type(model).__name__} to ONNX: {e}") from None
    out.write_bytes(onnx_model.SerializeToString())


def pytorch_to_onnx(model_dir: Path, flavor: dict, specs: list, out: Path) -> None:
    """Export with torch.export and the ONNX dynamo exporter. MLflow's default ``pt2`` format is loaded with
    ``torch.export.load`` (no pickle); the older pickle format only where pickles are allowed."""
    try:
        import torch
    except ImportError:
        raise ConvertError(
            422,
            "PyTorch models need torch and onnxscript installed (in gpulab-infer's "
            "environment: pip install 'gpulab[pytorch]')",
        ) from None
    if not specs:
        raise ConvertError(422, "PyTorch models need a tensor signature: log them with input_example or signature")
    exported = model_dir / flavor.get("model_data", "data") / "model.pt2"
    try:
        if exported.exists():
            program = torch.export.load(str(exported))
        else:
            _allow_pickle("this PyTorch model (MLflow's pickle format)")
            import mlflow.pytorch

            model = mlflow.pytorch.load_model(str(model_dir), map_location="cpu").eval()
            # size 2 for dynamic dimensions: torch.export specializes dimensions of size 0 and 1
            dummy = tuple(
                torch.zeros([2 if d == -1 else d for d in shape], dtype=getattr(torch, dtype.name))
                for _, dtype, shape in specs
            )
            dynamic = tuple(
                {i: torch.export.Dim.DYNAMIC for i, d in enumerate(shape) if d == -1} for _, _, shape in specs
            )
            program = torch.export.export(model, dummy, dynamic_shapes=dynamic)
        with contextlib.redirect_stdout(sys.stderr):  # the exporter reports progress on stdout
            torch.onnx.export(
                program,
                f=str(out),
                dynamo=True,
                external_data=False,
                input_names=[s[0] for s in specs],
                output_names=["output"],
            )
    except ConvertError:
        raise
    except Exception as e:  # noqa: BLE001 - torch.export and the exporter raise many kinds; all mean "cannot convert"
        raise ConvertError(422, f"cannot export the PyTorch model to ONNX: {type(e).__name__}: {e}") from None


def convert(model_dir: Path, out: Path, float32: bool = False) -> str:
    """Write ``out`` (ONNX) from the MLflow model in ``model_dir``; returns the flavor used."""
    from mlflow.models import Model

    mlmodel = Model.load(str(model_dir / "MLmodel"))
    flavors = mlmodel.flavors
    _check_paths(model_dir, flavors)
    if "onnx" in flavors:
        shutil.copyfile(model_dir / flavors["onnx"]["data"], out)
        return "onnx"
    specs = input_specs(mlmodel.signature, float32)
    if "sklearn" in flavors:
        sklearn_to_onnx(model_dir, flavors["sklearn"], specs, out)
        return "sklearn"
    if "pytorch" in flavors:
        pytorch_to_onnx(model_dir, flavors["pytorch"], specs, out)
        return "pytorch"
    raise ConvertError(
        422,
        f"cannot deploy a model with flavors {', '.join(sorted(flavors))}: "
        "gpulab deploys scikit-learn, PyTorch and ONNX models",
    )


def _check_paths(model_dir: Path, flavors: dict) -> None:
    """Every string in the MLmodel's flavors that names a file must name one inside the model's own directory:
    ``data: /etc/...`` or ``../..`` would have the converter read (and deploy) a file of the gateway's."""
    root = model_dir.resolve()

    def check(value, where: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                check(item, f"{where}.{key}")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                check(item, f"{where}[{i}]")
        elif isinstance(value, str) and value:
            try:
                inside = (root / value).resolve().is_relative_to(root)
            except (OSError, ValueError):
                inside = False
            if not inside:
                raise ConvertError(
                    422, f"the model's MLmodel file points outside the model's directory: {where} = {value[:200]!r}"
                )

    for name, conf in flavors.items():
        check(conf, f"flavors.{name}")


def signature(path: Path) -> tuple[list[dict], list[dict]]:
    """The ONNX model's inputs and outputs as Triton will serve them (KServe v2 datatype names)."""
    import onnx

    from .triton import onnx_signature

    try:
        tensors = onnx_signature(onnx.load(str(path), load_external_data=False))
    except ValueError as e:
        raise ConvertError(422, f"Triton cannot serve this ONNX model: {e}") from None
    return tuple(
        [{"name": t["name"], "datatype": t["data_type"].removeprefix("TYPE_"), "shape": t["dims"]} for t in specs]
        for specs in tensors
    )


def main(argv: list[str]) -> int:
    source, out_dir = argv[0], Path(argv[1])
    try:
        with tempfile.TemporaryDirectory(prefix="gpulab-mlflow-") as tmp:
            flavor = convert(fetch(source, Path(tmp)), out_dir / "model.onnx", float32="--float32" in argv)
        inputs, outputs = signature(out_dir / "model.onnx")
    except ConvertError as e:
        print(json.dumps({"error": {"status": e.status, "message": e.message, "field": e.field}}), flush=True)
        return 1
    print(json.dumps({"flavor": flavor, "inputs": inputs, "outputs": outputs}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
