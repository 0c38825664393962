"""The MLflow service behind hub auth: a real `gpulab up` (hub + proxy) manages `python -m gpulab.services.mlflow`.

Clients go through the hub's proxy, as users and jobs do: API tokens, the browser OAuth flow
with the MLflow UI's same-origin fetches, streamed artifact uploads and downloads, and MLflow's own
permissions per hub user (sharing "group", the default: the creator's hub groups may read).
"""

import hashlib
import json
import os
import sys
import time
from urllib.parse import urljoin

import mlflow
import psutil
import pytest
import requests
from mlflow import MlflowClient

from gpulab.config import OVERRIDES_ENV
from tests.support.gpulab_up import Platform
from tests.support.login import password_login
from tests.support.net import next_loopback

PREFIX = "/services/mlflow"
SAME_ORIGIN = {"Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "cors"}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    work = tmp_path_factory.mktemp("mlflow-service")
    service = {
        "name": "mlflow",
        "command": [sys.executable, "-m", "gpulab.services.mlflow"],
        "environment": {  # as the hub passes its own MLflow's settings
            OVERRIDES_ENV: json.dumps(
                {
                    "MLflowService": {
                        "backend_store_uri": f"sqlite:///{work / 'mlflow.db'}",
                        "artifacts_destination": str(work / "artifacts"),
                    },
                    "Platform": {"mlflow_sharing": "group"},
                }
            )
        },
    }
    platform = Platform(work / "data", host=next_loopback())
    platform.start('c.Login.admin_users = {"admin", "carol"}', services=[service])
    try:
        for user, groups in [("alice", ["ml"]), ("bob", []), ("carol", []), ("dave", ["ml"])]:
            platform.create_user(user, groups=groups)
        platform.mlflow_token = platform.token("alice", scopes=["access:services!service=mlflow"])
        started = time.monotonic()
        while time.monotonic() - started < 90:
            r = requests.get(f"{platform.url}{PREFIX}/health", headers=auth(platform.mlflow_token), timeout=10)
            if r.status_code == 200:
                break
            assert r.status_code == 502, r.text  # the proxy is up; MLflow is starting
            time.sleep(0.5)
        else:
            raise TimeoutError(f"MLflow behind the hub not ready:\n{platform.log_tail()}")
    except BaseException:
        platform.stop()
        raise
    print(f"hub up in {platform.startup_seconds:.1f}s, MLflow through it {time.monotonic() - started:.1f}s later")
    processes = platform.descendants()
    yield platform
    assert platform.stop() == 0
    time.sleep(0.5)
    left = [p.cmdline() for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, f"left running: {left}"


def auth(token: str, kind: str = "token") -> dict:
    return {"Authorization": f"{kind} {token}"}


def test_requests_without_valid_hub_credentials_are_refused(hub):
    api = f"{hub.url}{PREFIX}/api/2.0/mlflow/experiments/search?max_results=1"
    assert requests.get(api, timeout=10).status_code == 401
    assert requests.post(api, json={}, timeout=10).status_code == 401
    assert requests.get(api, headers=auth("not-a-token"), timeout=10).status_code == 401
    no_scope = hub.token("alice", scopes=["read:users:name!user=alice"])
    assert requests.get(api, headers=auth(no_scope), timeout=10).status_code == 403

    with requests.Session() as session:  # refusals close the connection cleanly: no 503s from the hub's proxy
        assert [session.post(api, json={"x": i}, timeout=10).status_code for i in range(30)] == [401] * 30
    # a refused POST on the connection a refused GET left open in the proxy's pool: answered, not reset (503)
    assert [
        requests.request(method, api, json={} if method == "POST" else None, timeout=10).status_code
        for method in ["GET", "POST"] * 15
    ] == [401] * 30

    page = requests.get(f"{hub.url}{PREFIX}/", headers={"Accept": "text/html"}, allow_redirects=False, timeout=10)
    assert page.status_code == 302
    location = urljoin(page.url, page.headers["Location"])
    assert location.startswith(f"{hub.url}/hub/api/oauth2/authorize?client_id=service-mlflow&"), location


def test_mlflow_client_with_a_hub_token(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", hub.mlflow_token)  # sent as "Authorization: Bearer"
    client = MlflowClient(f"{hub.url}{PREFIX}")
    experiment_id = client.create_experiment("through-the-hub")
    run = client.create_run(experiment_id, run_name="r1", tags={"gpulab.user": "alice"})
    for step in range(3):
        client.log_metric(run.info.run_id, "loss", 1.0 / (step + 1), step=step)
    model = tmp_path / "model.bin"
    model.write_bytes(os.urandom(6 * 2**20))
    client.log_artifact(run.info.run_id, str(model), "weights")
    client.set_terminated(run.info.run_id)

    assert [m.value for m in client.get_metric_history(run.info.run_id, "loss")] == [1.0, 0.5, 1 / 3]
    back = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id,
        artifact_path="weights/model.bin",
        dst_path=str(tmp_path / "back"),
        tracking_uri=f"{hub.url}{PREFIX}",
    )
    assert hashlib.sha256(open(back, "rb").read()).digest() == hashlib.sha256(model.read_bytes()).digest()


def test_raw_artifact_upload_download_and_head(hub):
    headers = auth(hub.mlflow_token, "Bearer")
    data = os.urandom(5 * 2**20)
    # with Content-Length: MLflow 3.17 reads no chunked body on Flask routes, which artifact
    # uploads are under --static-prefix (its streaming artifact routes are not prefixed)
    r = requests.post(
        f"{hub.url}{PREFIX}/api/2.0/mlflow/experiments/create", json={"name": "raw"}, headers=headers, timeout=30
    )
    assert r.status_code == 200, r.text
    url = f"{hub.url}{PREFIX}/api/2.0/mlflow-artifacts/artifacts/{r.json()['experiment_id']}/data.bin"
    r = requests.put(url, data=data, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    r = requests.get(url, headers=headers, stream=True, timeout=60)
    assert r.status_code == 200 and b"".join(r.iter_content(2**16)) == data
    r = requests.head(f"{hub.url}{PREFIX}/health", headers=headers, timeout=10)
    assert r.status_code == 200 and r.content == b""


def test_browser_logs_in_via_the_hub_and_uses_the_ui(hub):
    password = (hub.data_dir / "secrets" / "admin-password").read_text().strip()
    browser = password_login(hub.url, "admin", password)
    page = browser.get(f"{hub.url}{PREFIX}/", headers={"Accept": "text/html"}, timeout=30)
    assert page.status_code == 200 and page.url == f"{hub.url}{PREFIX}/", page.url
    assert "static-files/" in page.text
    assert any(c.path == f"{PREFIX}/" for c in browser.cookies)  # the service's OAuth cookie

    search = f"{hub.url}{PREFIX}/ajax-api/2.0/mlflow/experiments/search"
    r = browser.post(search, json={"max_results": 10}, headers=SAME_ORIGIN, timeout=30)
    assert r.status_code == 200, r.text
    assert "Default" in {e["name"] for e in r.json()["experiments"]}
    # cookie auth without an XSRF token: only same-origin fetches
    assert browser.post(search, json={}, timeout=30).status_code == 401
    cross = {**SAME_ORIGIN, "Sec-Fetch-Site": "cross-site", "Origin": "https://evil.example"}
    assert browser.post(search, json={}, headers=cross, timeout=30).status_code == 401


def test_experiments_runs_and_models_are_their_creators(hub):
    """MLflow's own permissions, per hub user: alice's objects are hers to change; bob, signed in with his own
    token, may not change them nor, in no group of hers, read them; dave, in her group "ml", may read them
    only; carol, a hub admin, may do anything."""
    api = f"{hub.url}{PREFIX}/api/2.0/mlflow"
    users = ("alice", "bob", "carol", "dave")
    tokens = {user: hub.token(user, scopes=["access:services!service=mlflow"]) for user in users}

    def call(user, method, path, extra_headers=None, **body):
        headers = {**auth(tokens[user], "Bearer"), **(extra_headers or {})}
        return requests.request(
            method,
            f"{api}/{path}",
            headers=headers,
            timeout=30,
            **({"params": body} if method == "GET" else {"json": body}),
        )

    def ok(r):
        assert r.status_code == 200, r.text
        return r.json()

    experiment = ok(call("alice", "POST", "experiments/create", name="alice-exp"))["experiment_id"]
    run = ok(call("alice", "POST", "runs/create", experiment_id=experiment))["run"]["info"]["run_id"]
    ok(call("alice", "POST", "registered-models/create", name="alice-model"))
    version = ok(
        call("alice", "POST", "model-versions/create", name="alice-model", source=f"runs:/{run}/model", run_id=run)
    )["model_version"]["version"]
    reads = [
        ("GET", "runs/get", {"run_id": run}),
        ("GET", "experiments/get", {"experiment_id": experiment}),
        ("GET", "registered-models/get", {"name": "alice-model"}),
    ]
    writes = [
        ("POST", "runs/delete", {"run_id": run}),
        ("POST", "runs/set-tag", {"run_id": run, "key": "mlflow.user", "value": "bob"}),
        ("POST", "runs/log-metric", {"run_id": run, "key": "loss", "value": 0.0, "timestamp": 0}),
        ("POST", "runs/create", {"experiment_id": experiment}),
        ("POST", "experiments/update", {"experiment_id": experiment, "new_name": "bobs-now"}),
        ("POST", "experiments/delete", {"experiment_id": experiment}),
        ("POST", "registered-models/alias", {"name": "alice-model", "alias": "prod", "version": version}),
        ("DELETE", "model-versions/delete", {"name": "alice-model", "version": version}),
        ("DELETE", "registered-models/delete", {"name": "alice-model"}),
    ]
    forged = {"X-Gpulab-User": "alice", "X-Gpulab-Admin": "1", "X-Gpulab-Groups": '["ml"]'}
    for method, path, body in reads + writes:
        r = call("bob", method, path, **body)
        assert r.status_code == 403, (path, r.status_code, r.text)
        # naming alice in the headers MLflow takes the caller from does not make bob alice: the proxy sets them
        r = call("bob", method, path, forged, **body)
        assert r.status_code == 403, (path, "forged headers", r.status_code, r.text)
    for method, path, body in reads:  # alice's group reads...
        ok(call("dave", method, path, **body))
    for method, path, body in writes:  # ...and changes nothing
        r = call("dave", method, path, **body)
        assert r.status_code == 403, (path, "group member", r.status_code, r.text)
    found = {
        user: {e["name"] for e in ok(call(user, "POST", "experiments/search", max_results=100)).get("experiments", [])}
        for user in ("bob", "dave")
    }
    assert "alice-exp" not in found["bob"] and "alice-exp" in found["dave"], found  # search shows what one may read
    assert ok(call("alice", "GET", "runs/get", run_id=run))["run"]["info"]["status"] == "RUNNING"  # all intact
    ok(call("alice", "POST", "registered-models/alias", name="alice-model", alias="prod", version=version))
    ok(call("carol", "POST", "runs/delete", run_id=run))  # an admin may
    ok(call("bob", "POST", "experiments/create", name="bob-exp"))  # and bob has his own


@pytest.mark.parametrize(
    "sharing, permission", [("group", "NO_PERMISSIONS"), ("everyone", "READ"), ("private", "NO_PERMISSIONS")]
)
def test_sharing_sets_what_others_may_do(tmp_path, sharing, permission):
    from gpulab.errors import ConfigError
    from gpulab.services.mlflow import auth_config

    text = auth_config(tmp_path / "auth.ini", "sqlite:///x", sharing).read_text()
    assert f"default_permission = {permission}\n" in text
    assert "authorization_function = gpulab.services.mlflow.auth:authenticate_from_proxy" in text
    with pytest.raises(ConfigError, match="Platform.mlflow_sharing must be one of group, everyone, private"):
        auth_config(tmp_path / "auth.ini", "sqlite:///x", "friends")
