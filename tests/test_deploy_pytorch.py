"""PyTorch models on the deploy path: a trained model logged with mlflow.pytorch is exported to ONNX by
``python -m gpulab.inference.convert`` (the child process gpulab-infer runs for every deploy), served by a
real Triton (bundled binary, Python backend + onnxruntime), and answers as the model does in-process.

Real parts: PyTorch (CPU), MLflow tracking on SQLite, Triton 2.51, the stock tritonclient.
"""

import json
import os
import secrets
import subprocess
import sys

import numpy as np
import pytest
import tritonclient.grpc as triton

from gpulab.inference.triton import write_onnx_model
from tests.support.triton import start_tritons

torch = pytest.importorskip("torch", reason="PyTorch is in the dev extra; scripts/test installs it")


def train_mlp(features: int, classes: int) -> tuple:
    """A small classifier trained for a few steps on separable synthetic data; returns it and a batch."""
    torch.manual_seed(0)
    x = torch.randn(256, features)
    y = (x[:, :classes].argmax(dim=1)).long()
    model = torch.nn.Sequential(torch.nn.Linear(features, 16), torch.nn.ReLU(), torch.nn.Linear(16, classes))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(50):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval(), x[:7].numpy()


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """The model logged twice to one MLflow run, in MLflow's default format (``pt2``, torch.export) as
    ``model`` and in its pickle format as ``pickled``: tracking URI, sources, the batch and its outputs."""
    import mlflow
    import mlflow.pytorch

    work = tmp_path_factory.mktemp("pytorch")
    uri = f"sqlite:///{work / 'mlflow.sqlite'}"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("pytorch-deploy", artifact_location=str(work / "artifacts"))
    model, batch = train_mlp(features=8, classes=3)
    with torch.no_grad():
        expected = model(torch.from_numpy(batch)).numpy()
    with mlflow.start_run(experiment_id=experiment) as run:
        mlflow.pytorch.log_model(model, name="model", input_example=batch)
        mlflow.pytorch.log_model(model, name="pickled", input_example=batch, serialization_format="pickle")
    runs = f"runs:/{run.info.run_id}"
    return {"uri": uri, "pt2": f"{runs}/model", "pickle": f"{runs}/pickled", "batch": batch, "expected": expected}


def convert(logged, source: str, out_dir, allow_pickle: bool) -> tuple[int, dict]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": logged["uri"]}
    env.pop("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", None)
    if allow_pickle:
        env["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "true"
    out_dir.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [sys.executable, "-m", "gpulab.inference.convert", source, str(out_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    return done.returncode, json.loads(done.stdout.strip().splitlines()[-1])


SIGNATURE = {
    "flavor": "pytorch",
    "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 8]}],
    "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, 3]}],
}


def infer(server, model: str, batch: np.ndarray) -> np.ndarray:
    client = triton.InferenceServerClient(server.grpc_address)
    request = triton.InferInput("input", list(batch.shape), "FP32")
    request.set_data_from_numpy(batch)
    return client.infer(model, [request], headers=server.grpc_headers).as_numpy("output")


def test_pytorch_model_served_by_triton_matches_in_process(logged, tmp_path):
    """MLflow's default format converts without allowing pickles; the pickle format only with them."""
    refused = convert(logged, logged["pickle"], tmp_path / "refused", allow_pickle=False)
    assert refused[0] == 1 and refused[1]["error"]["status"] == 422, refused
    assert refused[1]["error"]["field"] == "source" and "pickle" in refused[1]["error"]["message"]
    assert not (tmp_path / "refused" / "model.onnx").exists()

    for name, source, allow_pickle in (("mlp", logged["pt2"], False), ("mlp-pickled", logged["pickle"], True)):
        code, answer = convert(logged, source, tmp_path / name, allow_pickle)
        assert (code, answer) == (0, SIGNATURE), (name, answer)
        write_onnx_model(tmp_path / "repo", name, tmp_path / name / "model.onnx")
    (server,) = start_tritons(1, tmp_path / "repo", tmp_path, secrets.token_urlsafe(16))
    try:
        for name in ("mlp", "mlp-pickled"):
            for batch in (logged["batch"], logged["batch"][:1]):  # the batch dimension stays dynamic
                result = infer(server, name, batch)
                expected = logged["expected"][: len(batch)]
                np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-5, err_msg=name)
    finally:
        server.stop()
