"""From a trained model to predictions: deploy through gpulab-infer, infer over REST and from a real kernel.

Real parts: `gpulab up` with its built-in services (JupyterHub, proxy, MLflow, the embedded Triton 2.51 and
the gateway gpulab-infer), an SGD classifier on the digits data set logged to the platform's MLflow through
the hub with the user's token, alice's server (the gpulab server extension) spawned by the hub, and a
jupyter_client kernel with that server's environment.
"""

import json
import secrets
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as triton
import tritonclient.http as triton_http
from sklearn.datasets import load_digits
from sklearn.linear_model import SGDClassifier
from tritonclient.utils import InferenceServerException

from gpulab.inference.client import HubAuth
from gpulab.inference.kserve import HEADER_LENGTH
from gpulab.inference.triton import write_onnx_model
from gpulab.kernels.inference import InferenceClient, InferenceError
from tests.support.browser import chromium_page, hub_login
from tests.support.kernel import Kernel
from tests.support.net import next_loopback
from tests.support.openapi import Spec
from tests.support.server_kernel import run_in_server_kernel
from tests.support.triton import linear_onnx, triton_python

pytestmark = pytest.mark.timeout(900)
ROOT = Path(__file__).parent.parent
HOST = next_loopback()
CONFIG = """
c.Platform.inference_service = True
c.Platform.jobs_service = False
c.Roles.group_roles = {"deployers": ["gpulab-deployer"]}
c.InferenceGateway.max_request_bytes = 1024 * 1024
c.InferenceGateway.health_interval = 0.5
"""
EXTENSION = Spec(ROOT / "gpulab" / "server_extension" / "openapi.yaml")
SERVICE = Spec(ROOT / "gpulab" / "services" / "infer" / "openapi.yaml")


@pytest.fixture(scope="module")
def hub(gpulab_up):
    triton_python()  # skips without the Triton venv
    hub = gpulab_up(CONFIG, users={"alice": ["deployers"], "bob": [], "carol": ["deployers"]})
    hub.tokens = {user: hub.token(user) for user in ("alice", "bob", "carol")}
    hub.gateway = hub.wait_for_inference(hub.tokens["alice"])
    return hub


@pytest.fixture(scope="module")
def trained(hub, tmp_path_factory):
    """The model, trained here and logged to the platform's MLflow through the hub with alice's token (also
    registered as ``digits``), plus a fake model of an unsupported flavor."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"{hub.url}/services/mlflow")
    mp.setenv("MLFLOW_TRACKING_TOKEN", hub.tokens["alice"])
    mp.setenv("MLFLOW_EXPERIMENT_NAME", "digits")  # alice's own: MLflow's Default is read-only to users
    try:
        import mlflow
        import mlflow.sklearn

        X, y = load_digits(return_X_y=True)
        X = X / 16.0
        model = SGDClassifier(loss="log_loss", random_state=0)
        for _ in range(5):
            model.partial_fit(X, y, classes=np.arange(10))
        fake = tmp_path_factory.mktemp("fake")
        (fake / "MLmodel").write_text("flavors:\n  xgboost:\n    data: model.xgb\n")
        # hostile models: one whose MLmodel points at a file of the gateway's, one with a tensor name that would
        # add settings to Triton's config if pasted into it
        escape = tmp_path_factory.mktemp("escape")
        (escape / "MLmodel").write_text("flavors:\n  onnx:\n    data: /etc/hostname\n")
        hostile = tmp_path_factory.mktemp("hostile")
        linear_onnx(hostile / "model.onnx", input_name='x", data_type: TYPE_FP32, dims: [1] }\n] backend: "x')
        (hostile / "MLmodel").write_text("flavors:\n  onnx:\n    data: model.onnx\n")
        with mlflow.start_run() as run:
            mlflow.sklearn.log_model(model, name="model", input_example=X[:2], registered_model_name="digits")
            mlflow.log_artifacts(str(fake), "fake")
            mlflow.log_artifacts(str(escape), "escape")
            mlflow.log_artifacts(str(hostile), "hostile")
    finally:
        mp.undo()
    return {"run_id": run.info.run_id, "model": model, "X": X}


@pytest.fixture(scope="module")
def rest(hub):
    """POST/GET/DELETE on alice's server's /gpulab/api/v1 (her server is spawned by the hub)."""
    hub.spawn("alice")

    def call(method, path, token=None, headers=None, **kwargs):
        headers = {"Authorization": f"token {token or hub.tokens['alice']}", **(headers or {})}
        return requests.request(
            method, f"{hub.url}/user/alice/gpulab/api/v1{path}", timeout=300, headers=headers, **kwargs
        )

    return call


@pytest.fixture(scope="module")
def deployed(rest, trained):
    """``digits`` version 1, deployed through the server extension from the bare run id."""
    r = rest("POST", "/models", json={"source": trained["run_id"], "name": "digits"})
    assert r.status_code == 201, r.text
    return r.json()


@pytest.fixture(scope="module")
def kernel(hub, rest, deployed, tmp_path_factory):
    kernel = Kernel("python3", env=hub.server_env("alice"), cwd=str(tmp_path_factory.mktemp("notebook")))
    setup = kernel.run(
        "%load_ext gpulab\nimport json, numpy as np\nfrom gpulab.kernels import inference as gi\n"
        "from sklearn.datasets import load_digits\nX = load_digits().data / 16.0"
    )
    assert setup.reply["status"] == "ok" and not setup.stderr, setup.messages
    yield kernel
    kernel.stop()


def error(r: requests.Response, status: int, spec_path: str, method: str, spec: Spec = EXTENSION) -> dict:
    assert r.status_code == status, r.text
    spec.validate(spec_path, method, status, r.json())
    return r.json()["error"]


@pytest.mark.parametrize(
    "backend, expected, files",
    [
        (
            "python-onnx",
            {"backend": "python", "instanceGroup": [{"count": 1, "kind": "KIND_CPU"}]},
            {"model.onnx", "model.py"},
        ),
        (
            "onnxruntime",
            {"backend": "onnxruntime", "instanceGroup": [{"count": 1, "kind": "KIND_GPU"}]},
            {"model.onnx"},
        ),
        (
            "tensorrt",
            {
                "backend": "onnxruntime",
                "instanceGroup": [{"count": 1, "kind": "KIND_GPU"}],
                "optimization": {"executionAccelerators": {"gpuExecutionAccelerator": [{"name": "tensorrt"}]}},
            },
            {"model.onnx"},
        ),
    ],
)
def test_repository_entry_per_backend(tmp_path, backend, expected, files):
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    linear_onnx(tmp_path / "m.onnx")
    model_dir = write_onnx_model(tmp_path / "repo", "m", tmp_path / "m.onnx", version=2, backend=backend)
    config = json_format.MessageToDict(
        text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    )
    assert config == {
        "name": "m",
        **expected,
        "versionPolicy": {"latest": {"numVersions": 1}},
        "input": [{"name": "x", "dataType": "TYPE_FP32", "dims": ["1", "4"]}],
        "output": [{"name": "y", "dataType": "TYPE_FP32", "dims": ["1", "3"]}],
    }
    assert {p.name for p in model_dir.iterdir()} == {"config.pbtxt", "2"}  # nothing staged left behind
    assert {p.name for p in (model_dir / "2").iterdir()} == files


def test_deploy_from_a_run_lists_the_model_with_its_signature(rest, deployed, hub):
    EXTENSION.validate("/models", "post", 201, deployed)
    assert deployed["name"] == "digits" and deployed["owner"] == "alice" and deployed["ready"]
    assert deployed["backend"] == "python-onnx"
    assert deployed["inputs"] == [{"name": "input", "datatype": "FP64", "shape": [-1, 64]}]
    assert deployed["outputs"] == [
        {"name": "label", "datatype": "INT64", "shape": [-1]},
        {"name": "probabilities", "datatype": "FP64", "shape": [-1, 10]},
    ]
    [v1] = deployed["versions"]
    assert v1["version"] == 1 and v1["state"] == "READY" and v1["flavor"] == "sklearn"
    assert v1["source"].startswith("runs:/") and v1["deployed_by"] == "alice"

    listed = rest("GET", "/models")
    assert listed.status_code == 200, listed.text
    EXTENSION.validate("/models", "get", 200, listed.json())
    assert [m["name"] for m in listed.json()["models"]] == ["digits"]
    one = rest("GET", "/models/digits", token=hub.tokens["alice"])
    assert one.status_code == 200 and one.json()["versions"] == deployed["versions"]
    repo = hub.data_dir / "models"
    assert {"model.onnx", "model.py"} <= {p.name for p in (repo / "digits" / "1").iterdir()}
    assert json.loads((repo / "gpulab-models.json").read_text())["digits"]["owner"] == "alice"


@pytest.mark.browser
def test_lab_models_tab_shows_the_deployed_model(hub, deployed, output_dir):
    """In bob's JupyterLab (real Chromium), the gpulab panel's Models tab lists alice's model, ready, with its
    version and signature; the Jobs tab says this platform runs no job service."""
    with chromium_page() as page:
        try:
            hub_login(page, hub, "bob")
            page.locator(".jp-SideBar [data-id='gpulab-panel']").click(timeout=60_000)
            panel = page.locator(".jp-gpulab-Panel")
            panel.get_by_role("alert").filter(has_text="job service is not configured").wait_for(timeout=30_000)
            panel.get_by_role("tab", name="Models").click()
            card = panel.locator("[data-model='digits']")
            card.locator(".jp-gpulab-state-succeeded", has_text="ready").wait_for(timeout=30_000)
            text = " ".join(card.inner_text().split())
            assert "v1 READY" in text, text
            assert "input FP64[-1,64] → label INT64[-1], probabilities FP64[-1,10]" in text, text
            assert "owner: alice" in card.get_attribute("title")
        except Exception:
            page.screenshot(path=str(output_dir / "lab-models-tab-failure.png"))
            raise
        page.screenshot(path=str(output_dir / "lab-models-tab.png"))


def test_rest_predictions_match_the_model_in_process(rest, deployed, trained):
    X, model = trained["X"][:40], trained["model"]
    r = rest("POST", "/models/digits/infer", json={"inputs": {"input": X.tolist()}})
    assert r.status_code == 200, r.text
    EXTENSION.validate("/models/{name}/infer", "post", 200, r.json())
    body = r.json()
    assert body["model_name"] == "digits" and body["model_version"] == "1"
    assert body["outputs"]["label"] == model.predict(X).tolist()
    np.testing.assert_allclose(body["outputs"]["probabilities"], model.predict_proba(X), rtol=1e-9, atol=1e-12)

    kserve = {
        "inputs": [{"name": "input", "shape": [2, 64], "datatype": "FP64", "data": X[:2].ravel().tolist()}],
        "outputs": [{"name": "label"}],
    }
    r = rest("POST", "/models/digits/infer", json=kserve)
    assert r.status_code == 200, r.text
    assert r.json()["outputs"] == [
        {"name": "label", "datatype": "INT64", "shape": [2], "data": model.predict(X[:2]).tolist()}
    ]


def test_rest_kserve_binary_bodies_as_tritonclient_http_writes_and_reads_them(rest, deployed, trained):
    X, model = trained["X"][:50], trained["model"]
    tensor = triton_http.InferInput("input", list(X.shape), "FP64")
    tensor.set_data_from_numpy(X)  # binary
    body, json_size = triton_http.InferenceServerClient.generate_request_body([tensor])  # every output binary
    r = rest("POST", "/models/digits/infer", data=body, headers={HEADER_LENGTH: str(json_size)})
    assert r.status_code == 200, r.text[:300]
    assert r.headers["Content-Type"] == "application/octet-stream" and int(r.headers[HEADER_LENGTH]) < 500
    result = triton_http.InferenceServerClient.parse_response_body(
        r.content, header_length=int(r.headers[HEADER_LENGTH])
    )
    assert result.get_response()["model_name"] == "digits"
    assert result.as_numpy("label").tolist() == model.predict(X).tolist()
    np.testing.assert_allclose(result.as_numpy("probabilities"), model.predict_proba(X), rtol=1e-9, atol=1e-12)

    # binary in, one output asked for as JSON: a JSON answer
    body, json_size = triton_http.InferenceServerClient.generate_request_body(
        [tensor], outputs=[triton_http.InferRequestedOutput("label", binary_data=False)]
    )
    r = rest("POST", "/models/digits/infer", data=body, headers={HEADER_LENGTH: str(json_size)})
    assert r.status_code == 200 and HEADER_LENGTH not in r.headers, r.text[:300]
    EXTENSION.validate("/models/{name}/infer", "post", 200, r.json())
    assert r.json()["outputs"] == [
        {"name": "label", "datatype": "INT64", "shape": [50], "data": model.predict(X).tolist()}
    ]

    # JSON in, binary out
    r = rest(
        "POST",
        "/models/digits/infer",
        json={
            "inputs": [{"name": "input", "shape": [2, 64], "datatype": "FP64", "data": X[:2].ravel().tolist()}],
            "outputs": [{"name": "label", "parameters": {"binary_data": True}}],
        },
    )
    assert r.status_code == 200, r.text[:300]
    result = triton_http.InferenceServerClient.parse_response_body(
        r.content, header_length=int(r.headers[HEADER_LENGTH])
    )
    assert result.as_numpy("label").tolist() == model.predict(X[:2]).tolist()


def test_rest_bad_binary_bodies_name_the_field(rest, deployed, trained):
    path, method = "/models/{name}/infer", "post"
    X = trained["X"][:50]
    tensor = triton_http.InferInput("input", list(X.shape), "FP64")
    tensor.set_data_from_numpy(X)
    body, json_size = triton_http.InferenceServerClient.generate_request_body([tensor])

    def post(data, header=str(json_size)):
        return rest("POST", "/models/digits/infer", data=data, headers={HEADER_LENGTH: header})

    e = error(post(body[:-64]), 400, path, method)  # cut short
    assert e["field"] == "inputs.input" and "does not fit the 25536 bytes" in e["message"], e
    e = error(post(body[:json_size].replace(b"[50,64]", b"[51,64]") + body[json_size:]), 400, path, method)
    assert (
        e["field"] == "inputs.input" and "[51, 64] of FP64 takes 26112 bytes, binary_data_size is 25600" in e["message"]
    ), e
    e = error(post(body + b"\0" * 8), 400, path, method)
    assert e["field"] == "inputs" and "declare 25600 bytes" in e["message"] and "25608" in e["message"], e
    for header in ("many", str(len(body) + 1), "-1"):
        e = error(post(body, header), 400, path, method)
        assert e["field"] == HEADER_LENGTH and header in e["message"], e
    e = error(post(body, str(json_size - 1)), 400, path, method)
    assert "not valid JSON" in e["message"], e
    simple = json.dumps({"inputs": {"input": X.tolist()}}).encode()
    e = error(post(simple + b"\0" * 8, str(len(simple))), 400, path, method)
    assert e["field"] == "inputs" and "KServe v2" in e["message"], e
    e = error(
        rest("POST", "/models/digits/infer", json={"inputs": {"input": X.tolist()}, "outputs": [{"nam": 1}]}),
        400,
        path,
        method,
    )
    assert e["field"] == "outputs", e


def test_successful_inferences_stay_out_of_the_access_log_failures_do_not(rest, deployed, trained, hub):
    tag = secrets.token_hex(4)  # in the query string, so this test's log lines can be told apart
    X = trained["X"][:2].tolist()
    for _ in range(3):
        assert rest("POST", f"/models/digits/infer?t={tag}", json={"inputs": {"input": X}}).status_code == 200
    assert rest("POST", f"/models/digits/infer?t={tag}", json={"inputs": {"z": X}}).status_code == 400
    assert rest("GET", f"/whoami?t={tag}").status_code == 200
    deadline = time.monotonic() + 10
    while True:
        lines = [line for line in hub.log_path.read_text(errors="replace").splitlines() if tag in line]
        if any("200 GET" in line for line in lines) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert any("400 POST" in line and "/infer" in line for line in lines), lines  # failures: logged
    assert any("200 GET" in line and "/whoami" in line for line in lines), lines  # other requests: logged
    assert not any("200 POST" in line for line in lines), lines


def test_rest_bad_input_unknown_model_and_oversized(rest, deployed):
    path, method = "/models/{name}/infer", "post"
    e = error(rest("POST", "/models/digits/infer", json={"inputs": {"input": [[0.5] * 65]}}), 400, path, method)
    assert "'input'" in e["message"] and "[-1,64]" in e["message"] and e["field"] == "inputs.input", e
    e = error(rest("POST", "/models/digits/infer", json={"inputs": {"z": [[0.5] * 64]}}), 400, path, method)
    assert e["field"] == "inputs.z" and "no input 'z'" in e["message"] and "input" in e["message"]
    e = error(rest("POST", "/models/digits/infer", json={"inputs": {"input": [["a"] * 64]}}), 400, path, method)
    assert e["field"] == "inputs.input" and "FP64" in e["message"]
    e = error(rest("POST", "/models/nope/infer", json={"inputs": {"input": [[0.5] * 64]}}), 404, path, method)
    assert "nope" in e["message"]
    e = error(
        rest("POST", "/models/digits/infer", json={"inputs": {"input": [[0.5] * 64] * 2500}}), 413, path, method
    )  # 1.28 MB of FP64 over the gateway's 1 MiB
    assert e["message"]


def test_deploy_errors_name_the_field(rest, trained, hub):
    run = trained["run_id"]
    cases = [
        ({"source": f"runs:/{'0' * 32}/model", "name": "x"}, 404, "source", f"runs:/{'0' * 32}/model"),
        ({"source": f"runs:/{run}/nothing", "name": "x"}, 404, "source", f"runs:/{run}/nothing"),
        ({"source": "models:/nope/1", "name": "x"}, 404, "source", "models:/nope/1"),
        ({"source": f"runs:/{run}/fake", "name": "x"}, 422, "source", "xgboost"),
        ({"source": f"runs:/{run}/escape", "name": "x"}, 422, "source", "outside the model's directory"),
        ({"source": f"runs:/{run}/hostile", "name": "x"}, 422, "source", "is not allowed"),
        ({"source": "s3://bucket/model", "name": "x"}, 400, "source", "s3://bucket/model"),
        ({"source": run, "name": "../etc"}, 400, "name", "name"),
        ({"source": run, "name": "x", "backend": "tensorflow"}, 400, "backend", "python-onnx"),
        ({"source": run, "name": "x", "backend": ["onnxruntime"]}, 400, "backend", "python-onnx"),
        ({"source": ["runs:/x/model"], "name": "x"}, 400, "source", "runs:/<run_id>/model"),
    ]
    for body, status, field, mentioned in cases:
        e = error(rest("POST", "/models", json=body), status, "/models", "post")
        assert e["field"] == field and mentioned in e["message"], (body, e)
    assert not (hub.data_dir / "models" / "x").exists()


def test_deploy_needs_the_deploy_scope_and_ownership(rest, deployed, trained, hub):
    service = f"{hub.url}/services/gpulab-infer/api/v1"
    body = {"source": trained["run_id"], "name": "bobs"}
    r = requests.post(
        f"{service}/models", json=body, headers={"Authorization": f"token {hub.tokens['bob']}"}, timeout=60
    )
    e = error(r, 403, "/models", "post", SERVICE)
    assert "custom:gpulab:deploy" in e["message"]
    infer_only = hub.token("alice", scopes=["access:servers!user=alice", "custom:gpulab:infer"])
    e = error(rest("POST", "/models", token=infer_only, json=body), 403, "/models", "post")
    assert "custom:gpulab:deploy" in e["message"]
    assert rest("GET", "/models", token=infer_only).status_code == 200
    assert error(rest("DELETE", "/models/digits", token=infer_only), 403, "/models/{name}", "delete")

    carol = {"Authorization": f"token {hub.tokens['carol']}"}  # a deployer, but digits is alice's
    r = requests.post(f"{service}/models", json={**body, "name": "digits"}, headers=carol, timeout=60)
    assert "belongs to alice" in error(r, 403, "/models", "post", SERVICE)["message"]
    r = requests.delete(f"{service}/models/digits", headers=carol, timeout=60)
    assert "belongs to alice" in error(r, 403, "/models/{name}", "delete", SERVICE)["message"]
    r = requests.get(f"{service}/models", timeout=60)
    assert error(r, 401, "/models", "get", SERVICE)["code"] == "unauthenticated"


def test_infer_from_a_kernel(kernel, deployed, trained):
    X, model = trained["X"], trained["model"]
    result = kernel.run(
        "y = gi.infer('digits', X[:50])\nprint(json.dumps(y['label'].tolist()))\n"
        "print(json.dumps(y['probabilities'].tolist()))"
    )
    assert result.reply["status"] == "ok" and not result.stderr, result.messages
    labels, probabilities = (json.loads(line) for line in result.stdout.splitlines())
    assert labels == model.predict(X[:50]).tolist()
    np.testing.assert_allclose(probabilities, model.predict_proba(X[:50]), rtol=1e-9, atol=1e-12)

    magic = kernel.run("out = %infer digits X[100:110]\nprint(json.dumps(out['label'].tolist()))")
    assert magic.reply["status"] == "ok" and not magic.stderr, magic.messages
    assert json.loads(magic.stdout) == model.predict(X[100:110]).tolist()
    asynchronous = kernel.run(
        "import asyncio\nys = await asyncio.gather(*(gi.infer_async('digits', X[i:i + 1]) "
        "for i in range(8)))\nprint(json.dumps([int(y['label'][0]) for y in ys]))"
    )
    assert asynchronous.reply["status"] == "ok" and not asynchronous.stderr, asynchronous.messages
    assert json.loads(asynchronous.stdout) == model.predict(X[:8]).tolist()
    stock = kernel.run(
        "import tritonclient.grpc as tg\nc = gi.triton_client()\nt = tg.InferInput('input', [3, 64], 'FP64')\n"
        "t.set_data_from_numpy(X[:3])\nprint(c.infer('digits', [t]).as_numpy('label').tolist())\n"
        "print(gi.models())"
    )
    assert stock.reply["status"] == "ok" and not stock.stderr, stock.messages
    assert stock.stdout.splitlines()[0] == str(model.predict(X[:3]).tolist())
    assert "digits" in stock.stdout and "input FP64[-1,64] -> label INT64[-1]" in stock.stdout
    rest = kernel.run(
        "import tritonclient.http as th\nc = gi.rest_client()\n"
        "t = th.InferInput('input', [3, 64], 'FP64')\nt.set_data_from_numpy(X[:3])\n"
        "print(c.infer('digits', [t]).as_numpy('label').tolist())"
    )
    assert rest.reply["status"] == "ok" and not rest.stderr, rest.messages  # KServe v2 REST on the gateway
    assert rest.stdout.splitlines()[0] == str(model.predict(X[:3]).tolist())


@pytest.mark.parametrize(
    "line, message",
    [
        ("%infer digits X[:2, :10]", "%infer: unexpected shape for input 'input' for model 'digits'. Expected [-1,64]"),
        ("%infer nope X[:2]", "%infer: Request for unknown model: 'nope' is not found"),
        ("%infer digits", "%infer: error: give the model and the input"),
        ("%infer digits undefined_name", "%infer: error: undefined_name: NameError"),
        ("%infer digits {'z': X[:1]}", "%infer: model 'digits' has no input 'z' (its inputs: input)"),
        ("%deploy runs:/abc/model", "%deploy: error: the following arguments are required: --name"),
        ("%deploy x --name y --backend tf", "%deploy: error: argument --backend: invalid choice: 'tf'"),
        ("%deploy 0123 --name y", "%deploy: source '0123' is not runs:/<run_id>/<path>"),
    ],
)
def test_magic_errors_are_one_line(kernel, line, message):
    result = kernel.run(line)
    assert result.reply["status"] == "ok" and not result.errors, result.messages
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.strip().startswith(message), result.stderr


def test_deploy_magic_and_undeploy_from_a_kernel(kernel, trained, hub):
    result = kernel.run(
        f"m = %deploy runs:/{trained['run_id']}/model --name digits-k\nprint(repr(m))\n"
        "print(gi.infer(m, X[:1])['label'].tolist())\ngi.undeploy('digits-k')\n"
        "print([m.name for m in gi.models()])"
    )
    assert result.reply["status"] == "ok" and not result.stderr, result.messages
    lines = result.stdout.splitlines()
    assert lines[0].startswith("<gpulab Model 'digits-k' v1 ready: input FP64[-1,64] -> label INT64[-1]")
    assert lines[1] == str(trained["model"].predict(trained["X"][:1]).tolist())
    assert lines[2] == "['digits']"
    assert not (hub.data_dir / "models" / "digits-k").exists()
    assert "digits-k" not in json.loads((hub.data_dir / "models" / "gpulab-models.json").read_text())


def test_new_version_loads_without_failed_requests(rest, deployed, trained, hub):
    """Four clients loop on inference while version 2 deploys: every request succeeds, and they move to v2."""
    X = trained["X"][:4]
    seen, failures, stop = [], [], threading.Event()

    def loop():
        client = triton.InferenceServerClient(hub.gateway)
        client.register_plugin(HubAuth(hub.tokens["alice"]))
        tensor = triton.InferInput("input", [4, 64], "FP64")
        tensor.set_data_from_numpy(X)
        while not stop.is_set():
            try:
                seen.append((time.monotonic(), client.infer("digits", [tensor]).get_response().model_version))
            except InferenceServerException as e:
                failures.append(str(e))
        client.close()

    threads = [threading.Thread(target=loop) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1)
        r = rest("POST", "/models", json={"source": "models:/digits/1", "name": "digits"})
        deployed_at = time.monotonic()
        time.sleep(2)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert r.status_code == 201, r.text
    assert not failures, failures[:5]
    versions = [v for _, v in seen]
    assert versions[0] == "1" and {"1", "2"} <= set(versions), set(versions)
    assert all(v == "2" for t, v in seen if t > deployed_at), "version 1 served after the deploy answered"
    assert len(seen) > 100
    model = r.json()
    assert [v["version"] for v in model["versions"]] == [1, 2] and model["versions"][1]["state"] == "READY"
    assert model["versions"][0]["state"] in ("UNLOADING", "UNAVAILABLE")  # retired once its requests finished
    assert model["versions"][1]["source"] == "models:/digits/1"


def test_a_version_triton_cannot_load_is_rolled_back(rest, deployed, trained, hub):
    """The bundled Triton has no onnxruntime backend: the GPU entry is written, Triton refuses it, and the version
    is removed while the one before goes on serving."""
    before = rest("GET", "/models/digits").json()
    served = max(v["version"] for v in before["versions"] if v["state"] == "READY")
    r = rest("POST", "/models", json={"source": trained["run_id"], "name": "digits", "backend": "onnxruntime"})
    e = error(r, 422, "/models", "post")
    assert e["code"] == "load_failed" and e["field"] == "source" and "onnxruntime" in e["message"], e
    after = rest("GET", "/models/digits").json()
    assert [v["version"] for v in after["versions"]] == [v["version"] for v in before["versions"]]
    assert after["ready"] and after["backend"] == "python-onnx"
    model_dir = hub.data_dir / "models" / "digits"
    assert (
        not (model_dir / str(served + 1)).exists() and 'backend: "python"' in (model_dir / "config.pbtxt").read_text()
    )
    r = rest("POST", "/models/digits/infer", json={"inputs": {"input": trained["X"][:3].tolist()}})
    assert r.status_code == 200 and r.json()["model_version"] == str(served), r.text
    assert r.json()["outputs"]["label"] == trained["model"].predict(trained["X"][:3]).tolist()


def test_delete_unloads_and_removes_the_model(rest, trained, hub):
    r = rest("POST", "/models", json={"source": f"runs:/{trained['run_id']}/model", "name": "scratch"})
    assert r.status_code == 201, r.text
    client = InferenceClient(f"{hub.url}/services/gpulab-infer/api/v1", hub.gateway, hub.tokens["alice"])
    assert client.infer("scratch", trained["X"][:1])["label"].shape == (1,)
    r = rest("DELETE", "/models/scratch")
    assert r.status_code == 204, r.text
    error(rest("GET", "/models/scratch"), 404, "/models/{name}", "get")
    with pytest.raises(InferenceError) as info:
        client.infer("scratch", trained["X"][:1])
    assert info.value.status == "NOT_FOUND" and "scratch" in str(info.value)  # unloaded
    assert not (hub.data_dir / "models" / "scratch").exists()  # a restarted Triton will not load it again
    error(rest("DELETE", "/models/scratch"), 404, "/models/{name}", "delete")


def test_a_notebook_logs_to_the_platforms_mlflow_and_deploys_that_run(hub, rest):
    """In alice's real server (her account), with nothing configured in the notebook: mlflow.start_run() logs
    to the platform's MLflow as alice, not to ./mlruns, and the run deploys straight away."""
    code = """
import json, os, mlflow, mlflow.sklearn
from sklearn.datasets import load_digits
from sklearn.linear_model import SGDClassifier
from gpulab.kernels import inference as gi
X, y = load_digits(return_X_y=True)
model = SGDClassifier(loss="log_loss", random_state=0, max_iter=20).fit(X / 16.0, y)
with mlflow.start_run() as run:
    mlflow.sklearn.log_model(model, name="model", input_example=X[:2] / 16.0)
m = gi.deploy(f"runs:/{run.info.run_id}/model", "from-notebook")
labels = gi.infer("from-notebook", X[:5] / 16.0)["label"].tolist()
gi.undeploy("from-notebook")
print(json.dumps({"run": run.info.run_id, "mlruns": os.path.exists("mlruns"), "labels": labels,
                  "expected": model.predict(X[:5] / 16.0).tolist()}))
"""
    printed = run_in_server_kernel(hub.spawn("alice"), hub.tokens["alice"], code, timeout=600).splitlines()
    out = json.loads(printed[-1])
    assert not out["mlruns"] and out["labels"] == out["expected"], out
    # MLflow's own "View run ... at: <link>" points at the address alice signed in at
    assert f"at: {hub.url}/services/mlflow/#/experiments/" in printed[0], printed
    runs = f"{hub.url}/services/mlflow/api/2.0/mlflow/runs/get"
    r = requests.get(
        runs, params={"run_id": out["run"]}, headers={"Authorization": f"token {hub.tokens['alice']}"}, timeout=60
    )
    assert r.status_code == 200 and r.json()["run"]["info"]["run_id"] == out["run"], r.text
