"""gpulab-infer in front of real Triton servers, behind a real hub.

Real parts: `gpulab up` (JupyterHub, proxy) running the gateway as the hub-managed service
`gpulab-infer`, two Triton 2.51 servers (bundled binary, Python-backend ONNX model), hub tokens,
and the stock `tritonclient.grpc` client.
"""

import asyncio
import json
import logging
import os
import queue
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import grpc
import numpy as np
import psutil
import pytest
import requests
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
import tritonclient.http as triton_http
from google.protobuf import json_format, text_format
from tornado import web
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException

from gpulab.config import OVERRIDES_ENV
from gpulab.errors import ConfigError
from gpulab.inference.triton import model_config, processes_hidden, write_onnx_model
from gpulab.net import free_port
from gpulab.service.supervisor import Supervisor
from gpulab.services.infer.app import InferenceGateway, build
from gpulab.services.infer.auth import HubTokenAuth, InvalidToken
from gpulab.services.infer.nginx import NginxDataPlane, serve_authorize
from gpulab.services.infer.replicas import NoReplicaError, ReplicaPool
from tests.support.gpulab_up import Platform
from tests.support.net import next_loopback
from tests.support.openapi import Spec
from tests.support.tls import self_signed
from tests.support.triton import crash, linear_onnx, perf_analyzer, start_tritons

HOST = next_loopback()
PLANES = ("python", "nginx")
REST_SPEC = Spec(Path(__file__).parent.parent / "gpulab" / "services" / "infer" / "rest-openapi.yaml")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A model repository with ``digits`` and ``private`` (the same [1,4] -> [1,3] linear model)."""
    work = tmp_path_factory.mktemp("models")
    w, b = linear_onnx(work / "linear.onnx")
    for name in ("digits", "private"):
        write_onnx_model(work / "repo", name, work / "linear.onnx")
    return {"repo": work / "repo", "onnx": work / "linear.onnx", "w": w, "b": b}


@pytest.fixture(scope="module")
def tritons(models, tmp_path_factory):
    key = secrets.token_urlsafe(24)
    # one on TCP ports with the key, as an admin's own Triton; one on unix sockets, as the platform's
    servers = start_tritons(2, models["repo"], tmp_path_factory.mktemp("triton"), key, sockets=1)
    yield servers
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def hub(tritons, models, tmp_path_factory):
    hub = Platform(tmp_path_factory.mktemp("infer") / "data", host=HOST)
    address, rest = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    replicas = [t.grpc_address for t in tritons]
    http_replicas = [t.http_address for t in tritons]
    config = """
c.Platform.mlflow_service = False
c.Platform.jobs_service = False
c.Roles.group_roles = {"deployers": ["gpulab-deployer"]}
c.Roles.extra_roles = c.Roles.extra_roles + [
    {"name": "test-metrics", "scopes": ["read:metrics"], "services": ["test-admin"]}]
c.InferenceGateway.data_plane = "python"  # the nginx service sets its own
c.InferenceGateway.model_allow = {"private": ["bob", "group:ml"]}
c.InferenceGateway.max_request_bytes = 1024 * 1024
c.InferenceGateway.health_interval = 0.5
c.InferenceGateway.failure_threshold = 2
c.InferenceGateway.recovery_timeout = 3
c.InferenceGateway.token_cache_seconds = 3
"""
    service = {
        "name": "gpulab-infer",
        "command": [sys.executable, "-m", "gpulab.services.infer"],
        "info": {"grpc_address": address, "rest_address": rest},
        "environment": {"GPULAB_CONFIG": str(hub.config_file)},
    }
    # what the hub passes its own gateway: settings in $GPULAB_CONFIG_OVERRIDES
    settings = {
        "address": address,
        "rest_address": rest,
        "restricted_key": tritons[0].restricted_key,
        "replicas": replicas,
        "http_replicas": http_replicas,
        "model_repository": str(models["repo"]),  # the replicas', with its records
    }
    service["environment"][OVERRIDES_ENV] = json.dumps({"InferenceGateway": settings})
    # a second gateway on the same replicas, serving TLS only
    tls_address = f"127.0.0.1:{free_port()}"
    hub.tls_cert, tls_key = self_signed(tmp_path_factory.mktemp("tls"))
    tls = {"tls_cert_file": str(hub.tls_cert), "tls_key_file": str(tls_key)}
    tls_settings = {**settings, **tls, "address": tls_address, "rest_address": ""}
    tls_service = {
        **service,
        "name": "gpulab-infer-tls",
        "info": {"grpc_address": tls_address},
        "environment": {**service["environment"], OVERRIDES_ENV: json.dumps({"InferenceGateway": tls_settings})},
    }
    # a third on the same replicas: the nginx data plane, 2 workers, serving TLS
    nginx_address, nginx_rest = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    nginx = {**settings, **tls, "data_plane": "nginx", "processes": 2}
    nginx.update(address=nginx_address, rest_address=nginx_rest)
    nginx_service = {
        **service,
        "name": "gpulab-infer-nginx",
        "info": {"grpc_address": nginx_address, "rest_address": nginx_rest},
        "environment": {**service["environment"], OVERRIDES_ENV: json.dumps({"InferenceGateway": nginx})},
    }
    hub.start(config, services=[service, tls_service, nginx_service])
    hub.gateway, hub.tls_gateway = address, tls_address
    hub.gateways = {"python": address, "nginx": nginx_address}
    hub.rest = {"python": f"http://{rest}", "nginx": f"https://{nginx_rest}"}  # nginx serves TLS
    for user, groups in [("alice", []), ("bob", []), ("carol", ["ml"]), ("dave", ["deployers"])]:
        hub.create_user(user, groups=groups)
    for plane in PLANES:  # the services start after the hub answers
        wait_ready(connect(hub, plane), hub.token("alice"))
    yield hub
    hub.stop()


@pytest.fixture(scope="module")
def tokens(hub):
    return {
        "alice": hub.token("alice"),
        "bob": hub.token("bob"),
        "dave": hub.token("dave"),
        "carol": hub.token("carol", scopes=["custom:gpulab:infer"]),
        "noscope": hub.token("alice", scopes=["read:users:name!user=alice"]),
    }


@pytest.fixture(params=PLANES)
def plane(request) -> str:
    """The data plane in front of the gateway: the Python gateway alone, or nginx (over TLS) before it."""
    return request.param


@pytest.fixture
def client(hub, plane):
    return connect(hub, plane)


def connect(hub, plane: str, aio: bool = False, **options):
    """A stock client of the gateway with ``plane`` (TLS for nginx)."""
    tls = {"ssl": True, "root_certificates": str(hub.tls_cert)} if plane == "nginx" else {}
    return (triton_aio if aio else triton).InferenceServerClient(hub.gateways[plane], **tls, **options)


def auth(token: str, scheme: str = "token") -> dict:
    return {"authorization": f"{scheme} {token}"}


def infer(client, token, model="digits", x=None, name="x", datatype="FP32", scheme="token"):
    x = np.random.default_rng().standard_normal((1, 4)).astype(np.float32) if x is None else x
    tensor = triton.InferInput(name, list(x.shape), datatype)
    tensor.set_data_from_numpy(x)
    return x, client.infer(model, [tensor], headers=auth(token, scheme) if token else None).as_numpy("y")


def error(call, *args, **kwargs) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call(*args, **kwargs)
    return info.value


def gateway_metrics(hub, plane: str = "python") -> str:
    service = "gpulab-infer" if plane == "python" else "gpulab-infer-nginx"
    r = requests.get(f"{hub.url}/services/{service}/metrics", headers=auth(hub.admin_token), timeout=10)
    assert r.status_code == 200, r.text
    return r.text


def metric(text: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    values = [
        float(m.group(2))
        for m in re.finditer(rf"^{name}\{{(.*)\}} (\S+)$", text, re.MULTILINE)
        if all(f'{k}="{v}"' in m.group(1) for k, v in labels.items())
    ]
    assert values, f"no {name}{{{want}}}"
    return sum(values)


def delta(before: str, after: str, name: str, **labels) -> float:
    """How much a metric grew between two scrapes (absent before: from 0)."""
    try:
        old = metric(before, name, **labels)
    except AssertionError:
        old = 0.0
    return metric(after, name, **labels) - old


def test_onnx_signature_and_repository_entry(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["ids"], ["out"])],
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 8])],
        [helper.make_tensor_value_info("out", TensorProto.INT64, ["batch", 8])],
    )
    onnx.save(helper.make_model(graph), str(tmp_path / "m.onnx"))
    model_dir = write_onnx_model(tmp_path / "repo", "ids", tmp_path / "m.onnx", version=3)
    config = json_format.MessageToDict(
        text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    )
    assert config["backend"] == "python"
    assert config["input"] == [{"name": "ids", "dataType": "TYPE_INT64", "dims": ["-1", "8"]}]
    assert config["output"] == [{"name": "out", "dataType": "TYPE_INT64", "dims": ["-1", "8"]}]
    assert sorted(p.name for p in (model_dir / "3").iterdir()) == ["model.onnx", "model.py"]


HOSTILE_NAMES = [
    'x", data_type: TYPE_FP32, dims: [1] }\n] parameters { key: "EXECUTION_ENV_PATH" }\ninput [ { name: "z',
    "x y",
    "",
    "a" * 257,
    "x\u00e9",
]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_a_tensor_name_that_is_not_plain_is_refused(tmp_path, name):
    """A name from the user's ONNX graph goes into config.pbtxt: one that would need quoting (or could add
    settings of its own to the config) is refused, naming it, before anything is written."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", [name], ["out"])],
        "g",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1])],
    )
    onnx.save(helper.make_model(graph), str(tmp_path / "m.onnx"))
    with pytest.raises(ValueError, match="tensor name .* is not allowed"):
        write_onnx_model(tmp_path / "repo", "m", tmp_path / "m.onnx")
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize(
    "options, hidden",
    [
        ("rw", False),
        ("rw,hidepid=0", False),
        ("rw,hidepid=off", False),
        ("rw,hidepid=invisible", True),
        ("rw,hidepid=2", True),
        ("rw,hidepid=ptraceable", True),
    ],
)
def test_the_key_on_the_command_line_counts_as_kept_only_where_proc_hides_it(options, hidden):
    mountinfo = (
        f"22 27 0:21 / /proc rw,relatime - proc proc {options}\n"
        "25 1 0:5 / /dev rw,nosuid - devtmpfs udev rw,size=4096k\n"
    )
    assert processes_hidden(mountinfo) is hidden
    assert not processes_hidden("25 1 0:5 / /dev rw,nosuid - devtmpfs udev rw,hidepid=2\n")  # not /proc's


def test_config_strings_are_quoted_whatever_they_hold():
    """model_config writes Triton's ModelConfig protobuf as text: a string reads back as itself, adding nothing."""
    hostile = HOSTILE_NAMES[0]
    text = model_config("m", [{"name": hostile, "data_type": "TYPE_FP32", "dims": [1]}], [])
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert [t.name for t in config.input] == [hostile] and not config.parameters and len(config.input) == 1


def test_an_onnx_model_with_external_data_is_refused(tmp_path):
    """Triton would read an external-data tensor from wherever its location points (any file the serving
    account can read)."""
    import onnx

    linear_onnx(tmp_path / "m.onnx")
    model = onnx.load(str(tmp_path / "m.onnx"))
    onnx.save(
        model,
        str(tmp_path / "ext.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    with pytest.raises(ValueError, match="tensor 'W' keeps its data in an external file"):
        write_onnx_model(tmp_path / "repo", "m", tmp_path / "ext.onnx")


async def test_a_failing_http_endpoint_takes_the_replica_out_of_rest_calls_only():
    """A replica whose HTTP endpoint refuses connections (a wrong port) trips that endpoint's own breaker: REST
    calls find no replica, gRPC calls still go to it."""
    pool = ReplicaPool(
        ["127.0.0.1:1"], (), failure_threshold=2, recovery_timeout=30, http_addresses=[f"127.0.0.1:{free_port()}"]
    )
    try:
        for _ in range(2):
            with pytest.raises(aiohttp.ClientConnectorError):
                await pool.forward(lambda r: r.fetch("GET", "/v2", b"", {}), True, http=True)
        with pytest.raises(NoReplicaError, match="HTTP endpoint .* is unavailable \\(circuit open"):
            pool.pick(http=True)
        assert pool.pick() is pool.replicas[0] and pool.replicas[0].healthy
    finally:
        await pool.close()


async def test_token_lookups_are_cached():
    """One hub request per token per TTL, shared by concurrent callers; unknown tokens are cached too; the
    cache is bounded (least recently used out)."""
    calls = []

    class User(web.RequestHandler):
        async def get(self):
            calls.append(self.request.headers["Authorization"])
            await asyncio.sleep(0.05)
            if self.request.headers["Authorization"] != "token good":
                raise web.HTTPError(403)
            self.finish({"name": "alice", "kind": "user", "scopes": ["custom:gpulab:admin"], "groups": ["ml"]})

    port = free_port()
    server = web.Application([("/hub/api/user", User)]).listen(port, "127.0.0.1")
    try:
        hub_auth = HubTokenAuth(f"http://127.0.0.1:{port}/hub/api", ttl=0.5, max_entries=2)
        who = await asyncio.gather(*(hub_auth.identify("good") for _ in range(10)))
        assert len(calls) == 1 and who[0].name == "alice" and who[0].groups == {"ml"}
        assert "custom:gpulab:infer" in who[0].scopes  # the admin scope's subscopes
        for _ in range(2):
            with pytest.raises(InvalidToken):
                await hub_auth.identify("bad")
        assert len(calls) == 2
        await asyncio.sleep(0.6)
        await hub_auth.identify("good")
        assert len(calls) == 3  # expired
        for token in ("bad", "worse"):
            with pytest.raises(InvalidToken):
                await hub_auth.identify(token)
        await hub_auth.identify("good")
        assert len(calls) == 6  # evicted
    finally:
        server.stop()


def test_gateway_address_is_in_the_hub_services_api(hub):
    service = hub.api("GET", "/services/gpulab-infer").json()
    assert service["info"] == {"grpc_address": hub.gateway, "rest_address": hub.rest["python"].split("//")[1]}


def test_metrics_need_read_metrics(hub, plane, tokens):
    url = f"{hub.url}/services/{'gpulab-infer' if plane == 'python' else 'gpulab-infer-nginx'}/metrics"
    assert requests.get(url, timeout=10).status_code == 401
    refused = requests.get(url, headers=auth(tokens["alice"]), timeout=10)
    assert refused.status_code == 403 and "read:metrics" in refused.text
    assert metric(gateway_metrics(hub, plane), "gpulab_infer_replica_healthy") >= 1


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_perf_analyzer_through_the_gateway_with_a_token_only(hub, plane, protocol):
    """Triton's own load generator (2.51) measures through the gateway, over gRPC and over REST, with a hub
    token sent as metadata or header (-H), and is refused as unauthenticated without one."""
    url = hub.gateways[plane] if protocol == "grpc" else hub.rest[plane]
    base = [perf_analyzer(), "-m", "digits", "-i", protocol, "-u", url, "-p", "300", "--max-trials", "6", "-s", "999"]
    if plane == "nginx":
        base += (
            ["--ssl-grpc-use-ssl", f"--ssl-grpc-root-certifications-file={hub.tls_cert}"]
            if protocol == "grpc"
            else [f"--ssl-https-ca-certificates-file={hub.tls_cert}", "--ssl-https-verify-peer=1"]
        )
    measured = subprocess.run(
        [*base, "-H", f"authorization:token {hub.token('alice')}"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert measured.returncode == 0, measured.stdout + measured.stderr
    throughput = re.search(r"Throughput: ([\d.]+) infer/sec", measured.stdout)
    assert throughput and float(throughput[1]) > 0, measured.stdout
    refused = subprocess.run(base, capture_output=True, text=True, timeout=120, check=False)
    output = refused.stdout + refused.stderr
    assert refused.returncode != 0 and "Throughput:" not in output, output
    assert "missing 'authorization: token <hub token>' metadata" in output, output


def test_infer_through_gateway_matches_numpy(client, tokens, models):
    for scheme in ("token", "bearer"):
        x, y = infer(client, tokens["alice"], scheme=scheme)
        np.testing.assert_allclose(y, x @ models["w"] + models["b"], rtol=1e-5, atol=1e-6)
    headers = auth(tokens["alice"])
    assert client.is_server_live(headers=headers) and client.is_server_ready(headers=headers)
    assert client.is_model_ready("digits", headers=headers)
    meta = client.get_model_metadata("digits", headers=headers, as_json=True)
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": ["1", "4"]}]
    assert client.get_model_config("digits", headers=headers, as_json=True)["config"]["backend"] == "python"


def rest_client(hub, plane: str) -> triton_http.InferenceServerClient:
    """The stock ``tritonclient.http`` client of the gateway's REST port (TLS for nginx)."""
    scheme, address = hub.rest[plane].split("://")
    tls = {"ssl": True, "ssl_options": {"ca_certs": str(hub.tls_cert)}} if scheme == "https" else {}
    return triton_http.InferenceServerClient(address, **tls)


def test_rest_infer_through_gateway_matches_numpy(hub, plane, tokens, models):
    """KServe v2 REST on the gateway's REST port, with the stock tritonclient.http: binary and JSON tensors,
    health, metadata and config, each with a hub token."""
    client = rest_client(hub, plane)
    headers = {"Authorization": f"token {tokens['alice']}"}
    x = np.random.default_rng().standard_normal((1, 4)).astype(np.float32)
    for binary in (True, False):
        tensor = triton_http.InferInput("x", [1, 4], "FP32")
        tensor.set_data_from_numpy(x, binary_data=binary)
        output = triton_http.InferRequestedOutput("y", binary_data=binary)
        y = client.infer("digits", [tensor], outputs=[output], headers=dict(headers)).as_numpy("y")  # it adds to them
        np.testing.assert_allclose(y, x @ models["w"] + models["b"], rtol=1e-5, atol=1e-6)
    assert client.is_server_live(headers=headers) and client.is_server_ready(headers=headers)
    assert client.is_model_ready("digits", headers=headers)
    assert client.get_model_metadata("digits", headers=headers)["inputs"] == [
        {"name": "x", "datatype": "FP32", "shape": [1, 4]}
    ]
    assert client.get_model_config("digits", headers=headers)["backend"] == "python"
    client.close()


def test_rest_spec_has_every_route():
    from gpulab.services.infer.rest import MODEL, ROUTES

    routes = set()
    for path, method, _ in ROUTES:
        for model in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            routes.add((path.replace(MODEL, model), method.lower()))
    assert routes == {
        (path, method) for path, item in REST_SPEC.doc["paths"].items() for method in item if method != "parameters"
    }


def test_rest_errors_name_the_problem(hub, plane, tokens):
    """The gateway's refusals on the REST port are KServe errors with the HTTP status of the gRPC code, as its
    spec says; Triton's own answers (unknown model, wrong shape) pass through."""
    verify = str(hub.tls_cert) if plane == "nginx" else True
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}

    def call(token, path="/v2/models/digits/infer", method="POST", **kwargs):
        headers = {"Authorization": f"token {token}"} if token else {}
        kwargs = kwargs or {"json": body}
        return requests.request(method, hub.rest[plane] + path, headers=headers, verify=verify, timeout=30, **kwargs)

    def refused(r, status: int, message: str) -> None:
        assert r.status_code == status and message in r.json()["error"], (r.status_code, r.text)
        REST_SPEC.validate("/v2/models/{model}/infer", "post", status, r.json())

    refused(call(None), 401, "missing 'authorization: token <hub token>'")
    refused(call("not-a-token"), 401, "invalid or expired hub token")
    refused(call(tokens["noscope"]), 403, "lacks the scope custom:gpulab:infer")
    refused(call(tokens["alice"], "/v2/models/private/infer"), 403, "alice may not use model 'private'")
    assert call(tokens["bob"], "/v2/models/private/infer").status_code == 200
    refused(call(tokens["alice"], "/v2/models/nope/infer"), 404, "nope")
    wrong = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]}
    refused(call(tokens["alice"], json=wrong), 400, "input 'x'")
    refused(call(tokens["alice"], data=b"\0" * (1024 * 1024 + 1)), 413, "larger than the gateway's limit")
    refused(call(tokens["alice"], "/v2/models/dig%0Aits/infer"), 400, "a model name has no control characters")
    r = call(tokens["alice"], "/v2/repository/models/digits/unload")
    assert r.status_code == 404 and "not offered" in r.json()["error"], r.text
    r = call(tokens["alice"], method="GET")
    assert r.status_code == 405 and "takes POST" in r.json()["error"], r.text
    assert call(tokens["alice"]).status_code == 200  # nothing above broke the port


def test_rest_path_tricks_reach_only_the_checked_model(hub, plane, tokens):
    """Raw paths with dot segments (which HTTP libraries would normalize away) reach only the model authorised:
    nginx checks its normalized path and sends Triton that path; the Python gateway's routes take no "..".
    alice may use digits, not private."""
    import http.client
    import ssl

    host, port = hub.rest[plane].split("://")[1].rsplit(":", 1)
    if plane == "nginx":
        connection = http.client.HTTPSConnection(
            host, int(port), context=ssl.create_default_context(cafile=str(hub.tls_cert)), timeout=30
        )
    else:
        connection = http.client.HTTPConnection(host, int(port), timeout=30)
    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]})

    def post(path: str) -> tuple[int, dict]:
        connection.request(
            "POST", path, body, {"Authorization": f"token {tokens['alice']}", "Content-Type": "application/json"}
        )
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"{}")

    status, answer = post("/v2/models/digits/../private/infer")
    assert status == (403 if plane == "nginx" else 404) and "error" in answer, (status, answer)
    status, answer = post("/v2/models/private/../digits/infer")  # Triton itself answers 404 to the raw path
    if plane == "nginx":
        assert status == 200 and answer["model_name"] == "digits", (status, answer)
    else:
        assert status == 404 and "not offered" in answer["error"], (status, answer)
    for path in ("/v2/models/./stats", "/v2/models/%2e/stats"):  # resolved, it would be every model's statistics
        connection.request("GET", path, headers={"Authorization": f"token {tokens['alice']}"})
        response = connection.getresponse()
        answer = json.loads(response.read())
        assert response.status == 400 and answer == {"error": "'.' is not a model name"}, (path, answer)
    connection.close()


def test_tls_settings_are_checked(tmp_path):
    cert, key = self_signed(tmp_path)
    with pytest.raises(ConfigError, match="InferenceGateway.tls_key_file: TLS needs both"):
        InferenceGateway(tls_cert_file=str(cert)).server_credentials()
    key.chmod(0o644)
    with pytest.raises(ConfigError, match="InferenceGateway.tls_key_file: secret file .* readable by group or others"):
        InferenceGateway(tls_cert_file=str(cert), tls_key_file=str(key)).server_credentials()
    key.chmod(0o600)
    with pytest.raises(ConfigError, match="InferenceGateway.tls_cert_file: cannot read"):
        InferenceGateway(tls_cert_file=str(tmp_path / "missing.pem"), tls_key_file=str(key)).server_credentials()
    assert isinstance(
        InferenceGateway(tls_cert_file=str(cert), tls_key_file=str(key)).server_credentials(), grpc.ServerCredentials
    )
    assert InferenceGateway().server_credentials() is None


def test_nginx_settings_are_checked(tmp_path):
    config = {"replicas": ["127.0.0.1:1"], "address": f"127.0.0.1:{free_port()}"}
    with pytest.raises(ConfigError, match="InferenceGateway.nginx_path: nginx-missing not found .*data_plane"):
        NginxDataPlane(InferenceGateway(**config, nginx_path="nginx-missing")).prepare()
    plane = NginxDataPlane(InferenceGateway(**config, nginx_modules_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match=r"InferenceGateway.data_plane: nginx cannot start: dlopen\(\) .*ndk_http"):
        plane.prepare()
    assert not plane.run_dir.exists()
    assert InferenceGateway(**config, nginx_path="nginx-missing").plane() == "python"  # auto falls back
    assert InferenceGateway(**config, data_plane="nginx", nginx_path="nginx-missing").plane() == "nginx"


def test_tls_gateway_serves_tls_only(hub, tokens, models, monkeypatch):
    """With tls_cert_file and tls_key_file the gateway serves TLS only: the stock client with TLS and the
    certificate works, plaintext does not, and gpulab's own clients follow $GPULAB_INFER_TLS_CA."""
    from gpulab.kernels.inference import InferenceClient

    secure = triton.InferenceServerClient(hub.tls_gateway, ssl=True, root_certificates=str(hub.tls_cert))
    deadline = time.monotonic() + 30
    while not secure.is_server_ready(headers=auth(tokens["alice"])):  # it starts after the hub answers
        assert time.monotonic() < deadline, "the TLS gateway never became ready"
        time.sleep(0.3)
    x, y = infer(secure, tokens["alice"])
    np.testing.assert_allclose(y, x @ models["w"] + models["b"], rtol=1e-5)
    assert error(infer, secure, None).status() == "StatusCode.UNAUTHENTICATED"
    plain = triton.InferenceServerClient(hub.tls_gateway)
    assert error(plain.is_server_ready, headers=auth(tokens["alice"])).status() == "StatusCode.UNAVAILABLE"

    monkeypatch.setenv("GPULAB_INFER_TLS_CA", str(hub.tls_cert))
    client = InferenceClient(url="http://127.0.0.1:9/unused", address=hub.tls_gateway, token=tokens["alice"])
    out = client.infer("digits", {"x": x})
    np.testing.assert_allclose(out["y"], x @ models["w"] + models["b"], rtol=1e-5)


def test_missing_or_bad_token_is_unauthenticated(client, tokens):
    e = error(infer, client, None)
    assert e.status() == "StatusCode.UNAUTHENTICATED" and "authorization" in e.message()
    assert error(infer, client, "not-a-token").status() == "StatusCode.UNAUTHENTICATED"
    e = error(client.is_server_live, headers={"authorization": "basic abc"})
    assert e.status() == "StatusCode.UNAUTHENTICATED"


def test_a_revoked_token_stops_working_within_one_cache_window(hub, plane):
    """On nginx too: its decision is kept only as long as the Python gateway's own lookup it came from."""
    r = hub.api("POST", "/users/alice/tokens", json={"note": "revoked below"})
    token, token_id = r.json()["token"], r.json()["id"]
    client = connect(hub, plane)
    client.get_model_metadata("digits", headers=auth(token))  # the Python gateway looks the token up now
    looked_up = time.monotonic()
    time.sleep(2.4)  # 0.8 of token_cache_seconds
    infer(client, token)  # on nginx: a decision from that lookup, 0.6 s before it expires
    assert hub.api("DELETE", f"/users/alice/tokens/{token_id}").status_code == 204
    while True:
        try:
            infer(client, token)
        except InferenceServerException as e:
            assert e.status() == "StatusCode.UNAUTHENTICATED", e
            break
        assert time.monotonic() - looked_up < 3 + 1.0, "the revoked token still works past token_cache_seconds"
        time.sleep(0.1)


def test_token_without_infer_scope_is_denied(client, tokens):
    e = error(infer, client, tokens["noscope"])
    assert e.status() == "StatusCode.PERMISSION_DENIED" and "custom:gpulab:infer" in e.message()


def test_bad_input_names_the_tensor(client, tokens):
    e = error(infer, client, tokens["alice"], x=np.ones((1, 5), np.float32))
    assert e.status() == "StatusCode.INVALID_ARGUMENT" and "'x'" in e.message() and "[1,4]" in e.message()
    e = error(infer, client, tokens["alice"], x=np.ones((1, 4), np.float64), datatype="FP64")
    assert e.status() == "StatusCode.INVALID_ARGUMENT" and "'x'" in e.message() and "FP32" in e.message()
    e = error(infer, client, tokens["alice"], name="z")
    assert e.status() == "StatusCode.INVALID_ARGUMENT" and "'z'" in e.message()


def test_unknown_model_is_not_found(client, tokens):
    e = error(infer, client, tokens["alice"], model="nope")
    assert e.status() == "StatusCode.NOT_FOUND" and "nope" in e.message()


def test_oversized_request_is_resource_exhausted(client, tokens):
    e = error(infer, client, tokens["alice"], x=np.ones((1, 300_000), np.float32))
    assert e.status() == "StatusCode.RESOURCE_EXHAUSTED"


def test_model_allow_list(client, tokens):
    e = error(infer, client, tokens["alice"], model="private")
    assert e.status() == "StatusCode.PERMISSION_DENIED" and "private" in e.message()
    infer(client, tokens["bob"], model="private")  # listed by name
    infer(client, tokens["carol"], model="private")  # member of group:ml (a token with one scope sees its groups)
    alice = auth(tokens["alice"])
    assert client.get_inference_statistics("digits", headers=alice).model_stats[0].name == "digits"
    e = error(client.get_inference_statistics, headers=alice)  # every model's statistics: private's too
    assert e.status() == "StatusCode.PERMISSION_DENIED"


def raw_call(hub, plane: str, method: str):
    """A gRPC method of the gateway taking and giving raw bytes, as an attacker's own client would send them."""
    if plane == "nginx":
        channel = grpc.secure_channel(hub.gateways[plane], grpc.ssl_channel_credentials(hub.tls_cert.read_bytes()))
    else:
        channel = grpc.insecure_channel(hub.gateways[plane])
    return channel.unary_unary(f"/inference.GRPCInferenceService/{method}")


def test_a_request_that_names_its_model_twice_is_refused(hub, plane, tokens):
    """protobuf keeps the last of a repeated field: ``digits`` then ``private`` is a request for ``private``,
    which alice may not call. The gateway reads the whole message and refuses it on both planes, even for a
    caller who may use both models; the same request naming its model once is answered."""
    pb = triton.service_pb2
    x = np.ones((1, 4), np.float32)
    tensor = pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, 4])
    digits = pb.ModelInferRequest(model_name="digits", inputs=[tensor], raw_input_contents=[x.tobytes()])
    twice = digits.SerializeToString() + pb.ModelInferRequest(model_name="private").SerializeToString()
    assert pb.ModelInferRequest.FromString(twice).model_name == "private"  # what Triton would run
    model_infer = raw_call(hub, plane, "ModelInfer")
    for user in ("alice", "bob"):
        with pytest.raises(grpc.RpcError) as refused:
            model_infer(twice, metadata=[("authorization", f"token {tokens[user]}")], timeout=30)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (user, refused.value)
        assert "names its model more than once" in refused.value.details(), refused.value.details()
    before = gateway_metrics(hub, plane)
    answer = pb.ModelInferResponse.FromString(
        model_infer(digits.SerializeToString(), metadata=[("authorization", f"token {tokens['alice']}")], timeout=30)
    )
    assert answer.model_name == "digits"
    if plane == "nginx":  # nginx read the name and served the call itself, not the Python gateway behind it
        served = delta(
            before,
            gateway_metrics(hub, plane),
            "gpulab_infer_requests_total",
            rpc="ModelInfer",
            model="digits",
            code="OK",
            process="nginx",
        )
        assert served == 1, served

    unload = pb.RepositoryModelUnloadRequest(model_name="private").SerializeToString()
    twice = pb.RepositoryModelUnloadRequest(model_name="digits").SerializeToString() + unload
    with pytest.raises(grpc.RpcError) as refused:
        raw_call(hub, plane, "RepositoryModelUnload")(
            twice, metadata=[("authorization", f"token {tokens['dave']}")], timeout=30
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value
    assert "names its model more than once" in refused.value.details(), refused.value.details()


def test_model_control_needs_deploy_scope_and_the_platform_key(client, tokens, tritons, models):
    write_onnx_model(models["repo"], "fresh", models["onnx"])
    alice = auth(tokens["alice"])
    for call in (
        lambda: client.load_model("fresh", headers=alice),
        lambda: client.unload_model("digits", headers=alice),
        lambda: client.get_model_repository_index(headers=alice),
    ):
        e = error(call)
        assert e.status() == "StatusCode.PERMISSION_DENIED" and "custom:gpulab:deploy" in e.message()
    direct = triton.InferenceServerClient(tritons[0].grpc_address)
    for call in (
        lambda: direct.load_model("fresh"),
        lambda: direct.unload_model("digits"),
        lambda: direct.load_model("fresh", headers={"gpulab-triton-key": tritons[0].restricted_key}),
    ):
        assert "restricted" in error(call).message()
    assert not direct.is_model_ready("fresh", headers=tritons[0].grpc_headers)

    dave = auth(tokens["dave"])
    for call in (lambda: client.load_model("fresh", headers=dave), lambda: client.unload_model("digits", headers=dave)):
        e = error(call)  # no record: the platform's models, not dave's to change
        assert e.status() == "StatusCode.PERMISSION_DENIED" and "belongs to the platform" in e.message(), e.message()
    (models["repo"] / "gpulab-models.json").write_text(json.dumps({"fresh": {"owner": "dave", "versions": {}}}))
    e = error(client.load_model, "fresh", headers=dave, files={"file:1/model.py": b"import os"})
    assert e.status() == "StatusCode.PERMISSION_DENIED" and "override" in e.message()
    client.load_model("fresh", headers=dave)  # his own (as the deploy API records it)
    for server in tritons:  # loaded on every replica
        assert triton.InferenceServerClient(server.grpc_address).is_model_ready("fresh", headers=server.grpc_headers)
    index = client.get_model_repository_index(headers=dave, as_json=True)["models"]
    assert {m["name"] for m in index} == {"digits", "fresh"}  # not private, which dave may not call
    infer(client, tokens["alice"], model="fresh")
    client.unload_model("fresh", headers=dave)
    assert error(infer, client, tokens["alice"], model="fresh").status() == "StatusCode.NOT_FOUND"
    (models["repo"] / "gpulab-models.json").unlink()


def test_stream_infer(client, tokens, models):
    results = queue.Queue()
    client.start_stream(lambda result, error: results.put((result, error)), headers=auth(tokens["alice"]))
    try:
        xs = [np.full((1, 4), i, np.float32) for i in range(3)]
        for x in xs:
            tensor = triton.InferInput("x", [1, 4], "FP32")
            tensor.set_data_from_numpy(x)
            client.async_stream_infer("digits", [tensor])
        for x in xs:
            result, err = results.get(timeout=10)
            assert err is None
            np.testing.assert_allclose(result.as_numpy("y"), x @ models["w"] + models["b"], rtol=1e-5, atol=1e-5)
    finally:
        client.stop_stream()


async def test_traceparent_and_platform_key_reach_the_replica(hub, plane, tokens):
    """A gateway (in-process; for nginx, nginx in front of it) before a recording replica: the caller's
    ``traceparent`` continues, the platform key is added and the caller's token is not passed on."""
    seen = []

    async def record(request: bytes, context) -> bytes:
        seen.append(dict(context.invocation_metadata()))
        return b""

    replica = grpc.aio.server()
    replica.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "inference.GRPCInferenceService", {"ModelInfer": grpc.unary_unary_rpc_method_handler(record)}
            ),
        )
    )
    replica_port = replica.add_insecure_port("127.0.0.1:0")
    await replica.start()
    conf = InferenceGateway(
        replicas=[f"127.0.0.1:{replica_port}"],
        restricted_key="k3y",
        address=(address := f"127.0.0.1:{free_port()}"),
        model_allow={"other": ["bob"]},  # so nginx reads the model name from each request
    )
    gateway = build(conf, hub.url + "/hub/api")
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((gateway.handler(),))
    nginx = NginxDataPlane(conf) if plane == "nginx" else None
    supervisor = Supervisor(logging.getLogger("test"))
    port = server.add_insecure_port(nginx.python_address if nginx else "127.0.0.1:0")
    await server.start()
    try:
        if nginx:
            serve_authorize(gateway, nginx.authorize_socket)
            nginx.prepare()
            await supervisor.start(nginx.child())
        trace_id = secrets.token_hex(16)
        tensor = triton.InferInput("x", [1, 4], "FP32")
        tensor.set_data_from_numpy(np.ones((1, 4), np.float32))
        client = triton_aio.InferenceServerClient(address if nginx else f"127.0.0.1:{port}")
        await client.infer(
            "digits",
            [tensor],
            headers={**auth(tokens["alice"]), "traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"},
        )
        if nginx:  # a body larger than nginx keeps in memory (it goes to a file, read back for the model name)
            big = triton.InferInput("x", [1, 1_000_000], "FP32")
            big.set_data_from_numpy(np.ones((1, 1_000_000), np.float32))
            await client.infer("digits", [big], headers=auth(tokens["alice"]))
            with pytest.raises(InferenceServerException, match="lacks the scope custom:gpulab:infer"):
                await client.infer("digits", [tensor], headers=auth(tokens["noscope"]))
        await client.close()
    finally:
        await supervisor.stop()
        if nginx:
            nginx.remove()
        await server.stop(0)
        await gateway.pool.close()
        await replica.stop(0)
    metadata = seen[0]
    assert len(seen) == (2 if plane == "nginx" else 1)
    assert metadata["triton-grpc-protocol-gpulab-triton-key"] == "k3y"
    assert metadata["traceparent"].split("-")[1] == trace_id
    assert "authorization" not in metadata


def test_gateway_processes_share_the_port(hub, tokens, tritons, models, tmp_path):
    """processes=2: connections spread over both processes, /metrics merges them by process, an extra
    process that dies is restarted, and SIGTERM to the first stops both."""
    proc, address, http = start_gateway(hub, tritons, tmp_path, {"processes": 2})
    first = psutil.Process(proc.pid)

    def extra_process(other_than: int | None = None) -> psutil.Process:
        """The extra process (not ``other_than``) once it serves: its metrics show in the merged ones."""
        deadline = time.monotonic() + 30
        while True:
            children = [c for c in first.children() if c.pid != other_than]
            try:
                text = requests.get(http + "/metrics", headers=auth(hub.admin_token), timeout=10).text
            except requests.ConnectionError:
                text = ""
            if len(children) == 1 and 'process="1"' in text:
                return children[0]
            assert time.monotonic() < deadline and proc.poll() is None, (tmp_path / "gateway.log").read_text()
            time.sleep(0.2)

    def spread(calls: int) -> None:
        # one connection each (gRPC otherwise shares one connection among channels to the same address)
        clients = [
            triton.InferenceServerClient(address, channel_args=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(calls)
        ]
        for client in clients:
            x, y = infer(client, tokens["alice"])
            np.testing.assert_allclose(y, x @ models["w"] + models["b"], rtol=1e-5, atol=1e-6)
            client.close()

    try:
        extra = extra_process()
        wait_ready(triton.InferenceServerClient(address), tokens["alice"])
        spread(24)
        text = requests.get(http + "/metrics", headers=auth(hub.admin_token), timeout=10).text
        served = {
            p: metric(text, "gpulab_infer_requests_total", rpc="ModelInfer", code="OK", process=p) for p in ("0", "1")
        }
        assert served["0"] >= 1 and served["1"] >= 1 and sum(served.values()) == 24, served
        assert metric(text, "gpulab_infer_replica_healthy", process="1") == 2

        extra.kill()
        extra_process(other_than=extra.pid)  # a new one, serving
        assert f"process 1 (pid {extra.pid}) exited" in (tmp_path / "gateway.log").read_text()
        spread(12)
        text = requests.get(http + "/metrics", headers=auth(hub.admin_token), timeout=10).text
        assert metric(text, "gpulab_infer_requests_total", rpc="ModelInfer", code="OK", process="1") >= 1
    finally:
        children = first.children()
        proc.terminate()
        assert proc.wait(timeout=15) == 0
    psutil.wait_procs(children, timeout=5)
    assert not any(child.is_running() for child in children)


def start_gateway(hub, tritons, tmp_path, settings: dict) -> tuple[subprocess.Popen, str, str]:
    """``python -m gpulab.services.infer`` outside the hub with ``c.InferenceGateway`` ``settings`` (log in
    ``tmp_path``); returns the process, its gRPC address and its HTTP URL."""
    address, http = f"127.0.0.1:{free_port()}", f"http://{HOST}:{free_port(HOST)}"
    env = {
        **os.environ,
        "JUPYTERHUB_API_URL": f"{hub.url}/hub/api",
        "JUPYTERHUB_SERVICE_URL": http + "/",
        "GPULAB_CONFIG": str(hub.config_file),
        OVERRIDES_ENV: json.dumps(
            {
                "InferenceGateway": {
                    "address": address,
                    "replicas": [t.grpc_address for t in tritons],
                    "restricted_key": tritons[0].restricted_key,
                    **settings,
                }
            }
        ),
    }
    with (tmp_path / "gateway.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gpulab.services.infer"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    return proc, address, http


def test_nginx_stops_when_the_gateway_dies(hub, tokens, tritons, tmp_path):
    """The gateway killed outright: nginx is told by the kernel (parent-death signal) and stops with its workers,
    freeing the port for the gateway's next start."""
    proc, address, _ = start_gateway(hub, tritons, tmp_path, {"data_plane": "nginx"})
    try:
        wait_ready(triton.InferenceServerClient(address), tokens["alice"])
        nginx = [p for p in psutil.Process(proc.pid).children(recursive=True) if p.name() == "nginx"]
        assert len(nginx) == 2  # master and one worker
    finally:
        proc.kill()
        proc.wait()
    _, alive = psutil.wait_procs(nginx, timeout=10)
    assert not alive, (tmp_path / "gateway.log").read_text()


def wait_ready(client, token: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            if client.is_server_ready(headers=auth(token)):
                return
        except InferenceServerException:
            pass
        assert time.monotonic() < deadline, "the gateway never became ready"
        time.sleep(0.2)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_requests_spread_over_replicas(hub, plane, client, tokens, tritons, protocol):
    rest = rest_client(hub, plane)
    headers, tensor = {"Authorization": f"token {tokens['alice']}"}, triton_http.InferInput("x", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 4), np.float32))
    before = gateway_metrics(hub, plane)
    triton_before = [server.metrics() for server in tritons]
    for _ in range(40):
        if protocol == "grpc":
            infer(client, tokens["alice"])
        else:
            rest.infer("digits", [tensor], headers=headers)
    rest.close()
    after = gateway_metrics(hub, plane)
    for server, triton_old in zip(tritons, triton_before):
        sent = delta(before, after, "gpulab_infer_replica_requests_total", replica=server.grpc_address)
        assert 10 <= sent <= 30, (server.grpc_address, sent)
        triton_new = server.metrics()
        assert delta(triton_old, triton_new, "nv_inference_request_success", model="digits") == sent
    assert delta(before, after, "gpulab_infer_requests_total", rpc="ModelInfer", model="digits", code="OK") == 40


def test_nginx_is_restarted_when_killed(hub, tokens, models):
    """nginx killed outright (its workers left running, holding the port): the gateway stops what is left of it,
    starts a new nginx, and calls succeed again."""
    [master] = nginx_masters(hub)
    workers = master.children()
    master.kill()
    deadline = time.monotonic() + 20
    while not (masters := [p for p in nginx_masters(hub) if p.pid != master.pid]):
        assert time.monotonic() < deadline, "nginx was not restarted"
        time.sleep(0.2)
    psutil.wait_procs(workers, timeout=5)
    assert not any(w.is_running() for w in workers)
    client = connect(hub, "nginx")
    deadline = time.monotonic() + 10
    while True:  # the new nginx may still be coming up
        try:
            x, y = infer(client, tokens["alice"])
            break
        except InferenceServerException:
            assert time.monotonic() < deadline, "calls fail after the restart"
            time.sleep(0.2)
    np.testing.assert_allclose(y, x @ models["w"] + models["b"], rtol=1e-5, atol=1e-6)
    assert masters[0].is_running()


def nginx_masters(hub) -> list[psutil.Process]:
    masters = []
    for process in hub.descendants():
        try:
            if process.name() == "nginx" and "master" in " ".join(process.cmdline()):
                masters.append(process)
        except psutil.Error:  # gone, or a zombie not reaped yet
            pass
    return masters


def test_a_hung_replica_gets_no_calls_once_its_health_check_fails(hub, plane, client, tokens, tritons):
    """A replica that stops answering but keeps its connections open (SIGSTOP; a wedged GPU server looks the
    same to its callers) gets no new calls once the gateway's health check times out, on both planes (nginx
    follows the Python gateway's checks); once it answers again it gets calls again."""
    hung = tritons[0]
    os.kill(hung.proc.pid, signal.SIGSTOP)
    try:
        time.sleep(3)  # a check (interval 0.5 s, timing out after 0.5 s), and nginx reading the result
        before = gateway_metrics(hub, plane)
        started = time.monotonic()
        for _ in range(20):
            infer(client, tokens["alice"])  # would hang on the stopped replica
        assert time.monotonic() - started < 5
        after = gateway_metrics(hub, plane)
        for server, calls in ((hung, 0), (tritons[1], 20)):
            sent = metric(after, "gpulab_infer_replica_requests_total", replica=server.grpc_address) - metric(
                before, "gpulab_infer_replica_requests_total", replica=server.grpc_address
            )
            assert sent == calls, (server.grpc_address, sent)
    finally:
        os.kill(hung.proc.pid, signal.SIGCONT)
    wait_spread(hub, plane, client, tokens["alice"], tritons)


def wait_spread(hub, plane: str, client, token: str, tritons) -> None:
    """Until calls through ``plane`` reach every replica (a replica back from a failure may first wait out its
    breaker's recovery_timeout)."""
    deadline = time.monotonic() + 15
    while True:
        before = gateway_metrics(hub, plane)
        try:
            for _ in range(10):
                infer(client, token)
        except InferenceServerException as e:  # every replica may still be marked failed from a restart
            assert e.status() == "StatusCode.UNAVAILABLE" and time.monotonic() < deadline, str(e)
            time.sleep(0.5)
            continue
        after = gateway_metrics(hub, plane)
        idle = [
            t.grpc_address
            for t in tritons
            if metric(after, "gpulab_infer_replica_requests_total", replica=t.grpc_address)
            == metric(before, "gpulab_infer_replica_requests_total", replica=t.grpc_address)
        ]
        if not idle:
            return
        assert time.monotonic() < deadline, f"replicas {idle} got no calls"
        time.sleep(0.5)


async def test_replica_failures_breakers_and_recovery(hub, plane, tokens, tritons):
    """Kill one replica under load, then both, then bring one back (and then the other, for the next plane)."""
    await asyncio.to_thread(wait_spread, hub, plane, connect(hub, plane), tokens["alice"], tritons)
    client = connect(hub, plane, aio=True)
    headers = auth(tokens["alice"])
    x = np.ones((1, 4), np.float32)
    log = []  # (time the call started, error or None)

    async def call():
        tensor = triton.InferInput("x", [1, 4], "FP32")
        tensor.set_data_from_numpy(x)
        try:
            await client.infer("digits", [tensor], headers=headers)
            return None
        except InferenceServerException as e:
            return e

    async def worker(stop: asyncio.Event):
        while not stop.is_set():
            log.append((time.monotonic(), await call()))

    stop = asyncio.Event()
    workers = [asyncio.create_task(worker(stop)) for _ in range(4)]
    await asyncio.sleep(1.5)
    killed_at = time.monotonic()
    await asyncio.to_thread(crash, tritons[0])
    await asyncio.sleep(3)
    stop.set()
    await asyncio.gather(*workers)
    failures = [(t, e) for t, e in log if e is not None]
    assert len(log) > 200
    assert len(failures) <= 4, [str(e) for _, e in failures]  # at most the 4 calls in flight on the killed one
    assert all(t < killed_at + 0.5 and e.status() == "StatusCode.UNAVAILABLE" for t, e in failures), [
        str(e) for _, e in failures
    ]
    assert sum(1 for t, e in log if t > killed_at + 0.5 and e is None) > 100

    await asyncio.to_thread(crash, tritons[1])
    deadline = time.monotonic() + 10
    if plane == "python":
        while metric(gateway_metrics(hub), "gpulab_infer_breaker_state", state="open") < 2:
            assert time.monotonic() < deadline, gateway_metrics(hub)
            await asyncio.sleep(0.2)
    else:  # nginx marks each replica failed after failure_threshold failed calls
        while "circuit open" not in ((e := await call()) and e.message() or ""):
            assert time.monotonic() < deadline, str(e)
    elapsed, messages = [], []
    for _ in range(20):
        started = time.perf_counter()
        e = await call()
        elapsed.append(time.perf_counter() - started)
        assert e is not None and e.status() == "StatusCode.UNAVAILABLE"
        messages.append(e.message())
    # fail fast: the gateway answers without trying the replicas (allowing for a busy shared machine's outliers)
    assert sorted(elapsed)[17] < 0.010 and max(elapsed) < 0.1, elapsed
    # (nginx probes a replica again once its recovery time is up: that call names only the replica it tried)
    assert any("circuit open" in message and all(t.grpc_address in message for t in tritons) for message in messages), (
        messages
    )
    if plane == "python":
        assert all(f"Triton replica {t.grpc_address}" in messages[-1] for t in tritons), messages[-1]
    rest = await asyncio.to_thread(  # REST fails fast too, naming the replicas
        requests.post,
        f"{hub.rest[plane]}/v2/models/digits/infer",
        headers={"Authorization": headers["authorization"]},
        json={"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]},
        timeout=10,
        verify=str(hub.tls_cert) if plane == "nginx" else True,
    )
    # (nginx: 502 when a replica still reported up was tried, and refused, first)
    assert rest.status_code in ((502, 503) if plane == "nginx" else (503,)), rest.text
    assert all(t.grpc_address in rest.json()["error"] for t in tritons), rest.text

    for server in tritons:
        server.stop()  # clean up after the crash
    await asyncio.to_thread(tritons[0].start)
    deadline = time.monotonic() + 15
    while (e := await call()) is not None:
        assert time.monotonic() < deadline, str(e)
        await asyncio.sleep(0.2)
    assert all([await call() is None for _ in range(20)])
    await client.close()
    await asyncio.to_thread(tritons[1].start)
