"""Schemathesis runs (``fuzz.py``) of the deploy API (gpulab-infer's ``/models``, through the hub) and of the
KServe v2 REST spec (the gateway's REST port) with a deployed model, on the embedded platform (hub, MLflow,
Triton 2.51 and the gateway), the REST spec on both data planes (nginx in front, and the Python gateway
alone). As alice, who deployed the model, and as bob, who may not deploy; after each of bob's runs alice's
model is still deployed, at its version, and still answers right."""

from pathlib import Path

import numpy as np
import pytest
import requests

from gpulab.services import infer
from tests.security.fuzz import EXAMPLES, schemathesis
from tests.support.gpulab_up import Platform
from tests.support.net import next_loopback
from tests.support.triton import linear_onnx, triton_python

pytestmark = pytest.mark.timeout(1200)
DEPLOY_API = "/services/gpulab-infer/api/v1"
MODEL = "linear"
HOSTS = {"auto": next_loopback(), "python": next_loopback()}
SPEC_PATH = Path(infer.__file__).with_name("openapi.yaml")
REST_SPEC_PATH = Path(infer.__file__).with_name("rest-openapi.yaml")


def start(tmp_path_factory, plane: str) -> Platform:
    """The platform with ``plane`` serving the gateway's ports, alice (a deployer) and bob (not one), and
    ``linear`` (y = x·W + b, x [1, 4] FP32): an ONNX model alice logs to MLflow and deploys (``hub.deployed``)."""
    triton_python()  # skips without the Triton venv
    work = tmp_path_factory.mktemp(f"fuzz-infer-{plane}")
    hub = Platform(work / "data", host=HOSTS[plane]).start(f"""
c.Platform.inference_service = True
c.Platform.jobs_service = False
c.Roles.group_roles = {{"deployers": ["gpulab-deployer"]}}
c.InferenceGateway.data_plane = {plane!r}
""")
    try:
        hub.create_user("alice", groups=["deployers"])
        hub.create_user("bob")
        token = hub.token("alice")
        hub.wait_for_inference(token)
        hub.wait_for_mlflow(token)
        folder = work / MODEL
        folder.mkdir()
        w, b = linear_onnx(folder / "model.onnx")
        (folder / "MLmodel").write_text("flavors:\n  onnx:\n    data: model.onnx\n")
        mp = pytest.MonkeyPatch()
        mp.setenv("MLFLOW_TRACKING_URI", f"{hub.url}/services/mlflow")
        mp.setenv("MLFLOW_TRACKING_TOKEN", token)
        mp.setenv("MLFLOW_EXPERIMENT_NAME", "fuzz")
        try:
            import mlflow

            with mlflow.start_run() as run:
                mlflow.log_artifacts(str(folder), MODEL)
        finally:
            mp.undo()
        r = requests.post(
            f"{hub.url}{DEPLOY_API}/models",
            headers={"Authorization": f"token {token}"},
            timeout=300,
            json={"source": f"runs:/{run.info.run_id}/{MODEL}", "name": MODEL},
        )
        assert r.status_code == 201, r.text
        rest = "http://" + hub.api("GET", "/services/gpulab-infer").json()["info"]["rest_address"]
        hub.deployed = {"model": r.json(), "w": w, "b": b, "rest": rest}
    except BaseException:
        hub.stop()
        raise
    return hub


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """The default data plane: nginx (with the lua module, as scripts/setup installs it) in front."""
    hub = start(tmp_path_factory, "auto")
    yield hub
    hub.stop()


@pytest.fixture(scope="module")
def python_plane(tmp_path_factory):
    """The Python gateway serving the ports itself."""
    hub = start(tmp_path_factory, "python")
    yield hub
    hub.stop()


def still_served(hub) -> None:
    """alice's model is deployed at its version and answers y = x·W + b."""
    token, deployed = hub.token("alice"), hub.deployed
    r = requests.get(f"{hub.url}{DEPLOY_API}/models/{MODEL}", headers={"Authorization": f"token {token}"}, timeout=60)
    assert r.status_code == 200 and r.json()["versions"] == deployed["model"]["versions"], r.text
    x = np.ones((1, 4), dtype=np.float32)
    r = requests.post(
        f"{deployed['rest']}/v2/models/{MODEL}/infer",
        headers={"Authorization": f"token {token}"},
        json={"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": x.ravel().tolist()}]},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["outputs"][0]["data"], (x @ deployed["w"] + deployed["b"]).ravel(), rtol=1e-5)


def fuzz_rest(hub, user: str, work) -> dict:
    """Every operation that names a model names the deployed one (version 1), so the calls reach Triton."""
    config = f'[parameters]\n"path.model" = "{MODEL}"\n"path.version" = 1\n'
    result = schemathesis(REST_SPEC_PATH, hub.deployed["rest"], hub.token(user), work, config=config)
    assert result["test_cases"]["generated"] >= 5 * EXAMPLES, result["test_cases"]
    still_served(hub)
    return result


@pytest.mark.parametrize("user", ["alice", "bob"])
def test_the_inference_rest_spec_holds_for_every_generated_call(hub, tmp_path, user):
    fuzz_rest(hub, user, tmp_path)


@pytest.mark.parametrize("user", ["bob", "alice"])  # alice last: her run may delete what it deploys
def test_the_deploy_api_spec_holds_for_every_generated_call(hub, tmp_path, user):
    result = schemathesis(SPEC_PATH, hub.url + DEPLOY_API, hub.token(user), tmp_path)
    assert result["test_cases"]["generated"] >= 3 * EXAMPLES, result["test_cases"]
    if user == "bob":
        still_served(hub)


@pytest.mark.parametrize("user", ["alice", "bob"])
def test_the_inference_rest_spec_holds_on_the_python_data_plane_too(python_plane, tmp_path, user):
    fuzz_rest(python_plane, user, tmp_path)
