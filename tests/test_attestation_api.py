"""GPU node attestation through a real hub: gpulab-jobs' /attestation API, the server extension
forwarding to it, attestation-gated jobs, and the NRAS API key kept out of users' servers and kernels.

Real parts: `gpulab up` (JupyterHub, configurable-http-proxy, gpulab-jobs holding the attestation
service), a user's Jupyter server and kernel, the local executor and runner, MLflow on SQLite.
Tokens are minted by tests/support/attestation.py; its JWKS is served on 127.0.0.1.
"""

import hashlib
import json
import secrets
import time
from pathlib import Path

import psutil
import pytest
import requests
from traitlets.config import Config

from gpulab.secrets import write_secret_file
from gpulab.services.jobs.executors.base import PoolCapacity
from gpulab.services.jobs.executors.ray import RayExecutor
from gpulab.services.jobs.models import JobSpec
from gpulab.services.jobs.openapi import SPEC_PATH
from gpulab.services.jobs.queue import JobQueue
from gpulab.services.jobs.store import JobStore
from tests.support.attestation import NONCE_NOT_MATCHING, EatMinter, attestation_hub_config, served_minter
from tests.support.browser import chromium_page, hub_login
from tests.support.gpulab_up import Platform
from tests.support.jobs import Client
from tests.support.openapi import Spec

SPEC = Spec(SPEC_PATH)
EXT_SPEC = Spec(Path(__file__).parent.parent / "gpulab" / "server_extension" / "openapi.yaml")
GATED_NODE = "gpu-gated-0"  # the local executor's node name
MAX_FAILURES = 8
NRAS_KEY_VAR = "GPULAB_NRAS_API_KEY"
FILE_KEY = "nras-file-key-" + secrets.token_hex(8)
ENV_KEY = "nras-env-key-" + secrets.token_hex(8)


@pytest.fixture(scope="module")
def minter():
    with served_minter() as minter:
        yield minter


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("attest")


@pytest.fixture(scope="module")
def hub(work, minter, gpulab_up):
    key_file = work / "nras-api-key"
    write_secret_file(key_file, FILE_KEY)
    config = attestation_hub_config(work, minter, key_file, GATED_NODE, MAX_FAILURES)
    config += 'c.Login.admin_users = {"carol"}\n'
    # mallory: a second ordinary user, the attacker; trudy: another one, locked out by the lockout test
    users = {"alice": ["ml"], "mallory": ["ml"], "trudy": ["ml"], "carol": []}
    # the key in `gpulab up`'s environment too; jobs reach work/mlflow
    return gpulab_up(config, users=users, env={NRAS_KEY_VAR: ENV_KEY}, work=work)


@pytest.fixture(scope="module")
def alice(hub):
    return Client(hub, "alice")


@pytest.fixture(scope="module")
def carol(hub):
    return Client(hub, "carol")  # an admin


def enrol(hub: Platform, admin: Client, node: str, gpus: int = 1) -> Client:
    """Enrol ``node`` (as the admin) and return a client holding the node's own credential."""
    r = admin.request("POST", "/attestation/enrolments", json={"node": node, "gpus": gpus})
    assert r.status_code == 201, r.text
    SPEC.validate("/attestation/enrolments", "POST", 201, r.json())
    assert r.json()["credential"].startswith(f"node:{node}:") and r.json()["ueids"] is None
    return Client(hub, node, token=r.json()["credential"])


def node_state(client: Client, name: str) -> dict:
    return next(n for n in client.request("GET", "/attestation/nodes").json()["nodes"] if n["node"] == name)


def nonce_for(client: Client, node: str) -> str:
    r = client.request("POST", "/attestation/nonce", json={"node": node})
    assert r.status_code == 200, r.text
    SPEC.validate("/attestation/nonce", "POST", 200, r.json())
    assert len(r.json()["nonce"]) == 64 and r.json()["expires_at"].endswith("Z")
    return r.json()["nonce"]


def attest(client: Client, minter: EatMinter, node: str) -> tuple[requests.Response, list]:
    """Nonce for ``node`` -> NRAS's answer to it (minted) -> verify; the response and the EAT."""
    nonce = nonce_for(client, node)
    eat = json.loads(minter.mint(nonce))
    return client.request("POST", "/attestation/verify", json={"node": node, "nonce": nonce, "token": eat}), eat


def fingerprint(eat: list) -> str:
    return hashlib.sha256(eat[0][1].encode()).hexdigest()


def processes(hub: Platform, marker: str, whole_word: bool = False) -> list[psutil.Process]:
    """The platform's live processes whose command line contains ``marker`` (``whole_word``: ends with it,
    so ``-m gpulab.services.jobs`` is the service, not its jobs' supervisors)."""
    found = []
    for p in hub.descendants():
        try:
            line = " ".join(p.cmdline())
            if p.status() != psutil.STATUS_ZOMBIE and (line.endswith(marker) if whole_word else marker in line):
                found.append(p)
        except psutil.Error:
            pass
    return found


def test_nonce_verify_and_node_state(hub, carol, alice, minter):
    node_a = enrol(hub, carol, "gpu-a-0")
    r, eat = attest(node_a, minter, "gpu-a-0")
    assert r.status_code == 200, r.text
    SPEC.validate("/attestation/verify", "POST", 200, r.json())
    result = r.json()
    assert result["verdict"] is True and result["reason"] == "ok" and result["node"] == "gpu-a-0"
    assert result["fingerprint"] == fingerprint(eat) and result["kid"] == minter.key.kid
    assert result["devices"]["GPU-0"]["kind"] == "GPU" and result["devices"]["GPU-0"]["secboot"] is True

    r = alice.request("GET", "/attestation/nodes")
    assert r.status_code == 200, r.text
    SPEC.validate("/attestation/nodes", "GET", 200, r.json())
    node = next(n for n in r.json()["nodes"] if n["node"] == "gpu-a-0")
    assert node["valid"] and node["problem"] is None and node["user"] == "node:gpu-a-0"
    assert node["fingerprint"] == fingerprint(eat) and node["last_reason"] == "ok"
    assert node["devices"]["GPU-0"] == result["devices"]["GPU-0"]

    nonce = nonce_for(node_a, "gpu-a-0")  # the EAT may also come as its JSON text
    r = node_a.request(
        "POST", "/attestation/verify", json={"node": "gpu-a-0", "nonce": nonce, "token": minter.mint(nonce)}
    )
    assert r.status_code == 200, r.text


def test_wrong_or_used_nonces_are_refused_with_their_reason(hub, carol, minter):
    alice = enrol(hub, carol, "gpu-b-0")  # the node's own identity
    nonce = nonce_for(alice, "gpu-b-0")
    eat = json.loads(minter.mint(secrets.token_hex(32)))  # NRAS answered another nonce
    r = alice.request("POST", "/attestation/verify", json={"node": "gpu-b-0", "nonce": nonce, "token": eat})
    assert r.status_code == 422, r.text
    SPEC.validate("/attestation/verify", "POST", 422, r.json())
    assert r.json()["error"]["code"] == "nonce_mismatch" and r.json()["error"]["field"] == "token"

    eat = json.loads(minter.mint(nonce))  # the right answer, but the nonce was used up by the refusal
    r = alice.request("POST", "/attestation/verify", json={"node": "gpu-b-0", "nonce": nonce, "token": eat})
    assert r.status_code == 422 and r.json()["error"]["code"] == "nonce_unknown", r.text
    assert r.json()["error"]["field"] == "nonce"

    nonce = nonce_for(alice, "gpu-b-0")  # a node's credential speaks for its node only
    eat = json.loads(minter.mint(nonce))
    r = alice.request("POST", "/attestation/verify", json={"node": "gpu-b-1", "nonce": nonce, "token": eat})
    assert r.status_code == 403 and r.json()["error"]["code"] == "not_node_identity", r.text
    assert r.json()["error"]["field"] == "node"

    node = next(n for n in alice.request("GET", "/attestation/nodes").json()["nodes"] if n["node"] == "gpu-b-0")
    assert not node["valid"] and node["last_reason"] == "nonce_mismatch"

    r = alice.request("POST", "/attestation/nonce", json={"node": "no spaces/allowed"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "node", r.text
    r = alice.request("POST", "/attestation/verify", json={"node": "gpu-b-0", "nonce": nonce})
    assert r.status_code == 422 and r.json()["error"]["field"] == "token", r.text


def test_attest_scope_is_required_and_admins_have_it(hub, alice, carol):
    narrowed = Client(
        hub, "alice", hub.token("alice", scopes=["access:services!service=gpulab-jobs", "custom:gpulab:jobs"])
    )
    for method, path in (
        ("POST", "/attestation/nonce"),
        ("POST", "/attestation/verify"),
        ("GET", "/attestation/nodes"),
    ):
        r = narrowed.request(method, path, json={"node": "gpu-a-0"})
        assert r.status_code == 403 and "custom:gpulab:attest" in r.json()["error"]["message"], r.text
    assert narrowed.request("GET", "/jobs").status_code == 200
    # gpulab-admin only: custom:gpulab:attest as a subscope of custom:gpulab:admin
    assert carol.request("GET", "/attestation/nodes").status_code == 200
    r = carol.request("POST", "/attestation/nonce", json={"node": "gpu-c-0"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "node_not_enrolled", r.text
    assert r.json()["error"]["field"] == "node"
    SPEC.validate("/attestation/nonce", "POST", 404, r.json())
    enrol(hub, carol, "gpu-c-0")
    assert carol.request("POST", "/attestation/nonce", json={"node": "gpu-c-0"}).status_code == 200
    for who in (alice, Client(hub, "gpu-c-0", token=f"node:gpu-c-0:{secrets.token_urlsafe(32)}")):
        r = who.request("POST", "/attestation/enrolments", json={"node": "gpu-x-0", "gpus": 1})
        assert r.status_code in (401, 403), r.text
    r = carol.request("POST", "/attestation/enrolments", json={"node": "gpu-c-0", "gpus": 1})
    assert r.status_code == 409 and r.json()["error"]["field"] == "node", r.text
    r = carol.request("POST", "/attestation/enrolments", json={"node": "gpu-c-1", "gpus": 1, "ueids": ["1"]})
    assert r.status_code == 422 and r.json()["error"]["field"] == "gpus", r.text


def test_another_user_cannot_attest_or_revoke_a_node(hub, carol, minter):
    """mallory, an ordinary user with her own real token, goes after a node that attested itself: she
    cannot get a nonce for it, cannot post NRAS's failure verdict against it, cannot relay evidence for
    it nor list or remove enrolments; the node's state stays exactly as the node left it."""
    node = enrol(hub, carol, "gpu-f-0")
    r, _ = attest(node, minter, "gpu-f-0")
    assert r.status_code == 200, r.text
    before = node_state(carol, "gpu-f-0")
    mallory = Client(hub, "mallory")
    r = mallory.request("POST", "/attestation/nonce", json={"node": "gpu-f-0"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "not_node_identity", r.text
    assert r.json()["error"]["field"] == "node"
    SPEC.validate("/attestation/nonce", "POST", 403, r.json())
    nonce = nonce_for(node, "gpu-f-0")  # even holding a live nonce of the node's (seen on the wire)
    failed = json.loads(minter.mint(nonce, failure=NONCE_NOT_MATCHING))
    for path, body in (
        ("/attestation/verify", {"token": failed}),
        ("/attestation/evidence", {"evidence_list": [{"evidence": "ZQ==", "certificate": "Yw=="}]}),
    ):
        r = mallory.request("POST", path, json={"node": "gpu-f-0", "nonce": nonce, **body})
        assert r.status_code == 403 and r.json()["error"]["code"] == "not_node_identity", r.text
    assert mallory.request("GET", "/attestation/enrolments").status_code == 403
    assert mallory.request("DELETE", "/attestation/enrolments/gpu-f-0").status_code == 403
    after = node_state(carol, "gpu-f-0")
    assert after == before and after["valid"] and after["last_reason"] == "ok", after


def test_nras_failure_verdict_revokes_the_node(hub, carol, minter):
    node = enrol(hub, carol, "gpu-g-0")
    r, _ = attest(node, minter, "gpu-g-0")
    assert r.status_code == 200, r.text
    nonce = nonce_for(node, "gpu-g-0")
    eat = json.loads(minter.mint(nonce, failure=NONCE_NOT_MATCHING))  # NRAS's error form: no eat_nonce
    r = node.request("POST", "/attestation/verify", json={"node": "gpu-g-0", "nonce": nonce, "token": eat})
    assert r.status_code == 422 and r.json()["error"]["code"] == "overall_result_false", r.text
    SPEC.validate("/attestation/verify", "POST", 422, r.json())
    assert r.json()["error"]["details"]["nvidia_errors"] == {"GPU-0": NONCE_NOT_MATCHING}
    assert "NONCE_NOT_MATCHING" in r.json()["error"]["message"]
    state = node_state(carol, "gpu-g-0")
    assert state["revoked"] and not state["valid"] and state["last_reason"] == "overall_result_false", state
    assert state["nvidia_errors"] == {"GPU-0": NONCE_NOT_MATCHING}


def test_devices_differing_from_the_enrolment_are_refused(hub, carol, minter):
    node = enrol(hub, carol, "gpu-h-0")
    r, _ = attest(node, minter, "gpu-h-0")  # pins the GPU it presented
    assert r.status_code == 200, r.text
    listed = next(n for n in carol.request("GET", "/attestation/enrolments").json()["nodes"] if n["node"] == "gpu-h-0")
    assert listed["ueids"] == [minter.ueid("GPU-0")] and "credential" not in listed
    nonce = nonce_for(node, "gpu-h-0")
    eat = json.loads(minter.mint(nonce, device={"ueid": "4242"}))  # a genuine token, but for another GPU
    r = node.request("POST", "/attestation/verify", json={"node": "gpu-h-0", "nonce": nonce, "token": eat})
    assert r.status_code == 422 and r.json()["error"]["code"] == "device_mismatch", r.text
    assert r.json()["error"]["field"] == "token"
    assert node_state(carol, "gpu-h-0")["problem"] == "attestation revoked (device_mismatch)"
    assert carol.request("DELETE", "/attestation/enrolments/gpu-h-0").status_code == 204
    r = node.request("POST", "/attestation/nonce", json={"node": "gpu-h-0"})  # the credential is gone
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthenticated", r.text
    assert all(n["node"] != "gpu-h-0" for n in carol.request("GET", "/attestation/nodes").json()["nodes"])


def test_lockout_is_per_caller_and_a_forged_forwarded_for_does_not_dodge_it(hub):
    """Users run code on the platform's loopback, so they can reach gpulab-jobs directly and claim any
    X-Forwarded-For: the lockout follows their hub identity, whatever address they claim."""
    (service,) = processes(hub, "-m gpulab.services.jobs", whole_word=True)
    direct = service.environ()["JUPYTERHUB_SERVICE_URL"].rstrip("/") + "/services/gpulab-jobs/api/v1"
    mallory = Client(hub, "trudy")
    body = {"node": "gpu-d-0", "nonce": "0" * 64, "token": "[]"}
    for i in range(MAX_FAILURES):
        forged = {**mallory.headers, "X-Forwarded-For": f"198.51.100.{i}"}
        r = requests.post(f"{direct}/attestation/verify", json=body, headers=forged, timeout=30)
        assert r.status_code == 403 and r.json()["error"]["code"] == "not_node_identity", r.text
    for forged_ip in ("203.0.113.9", "127.0.0.1"):
        forged = {**mallory.headers, "X-Forwarded-For": forged_ip}
        r = requests.post(f"{direct}/attestation/nonce", json={"node": "gpu-d-0"}, headers=forged, timeout=30)
        assert r.status_code == 429 and r.json()["error"]["code"] == "locked_out", r.text
        assert int(r.headers["Retry-After"]) > 0
    SPEC.validate("/attestation/nonce", "POST", 429, r.json())
    r = requests.post(
        f"{mallory.base}/attestation/nonce", json={"node": "gpu-d-0"}, headers=mallory.headers, timeout=30
    )  # through the hub's proxy, too
    assert r.status_code == 429 and r.json()["error"]["code"] == "locked_out", r.text


def test_server_extension_forwards_attestation(hub, alice, carol, minter):
    """The extension acts for its server's user: alice may see the nodes, not attest one."""
    node = enrol(hub, carol, "gpu-e-0")
    assert attest(node, minter, "gpu-e-0")[0].status_code == 200
    hub.spawn("alice")
    base = f"{hub.url}/user/alice/gpulab/api/v1/attestation"
    r = requests.post(f"{base}/nonce", json={"node": "gpu-e-0"}, headers=alice.headers, timeout=30)
    assert r.status_code == 403 and r.json()["error"]["code"] == "not_node_identity", r.text
    EXT_SPEC.validate("/attestation/nonce", "POST", 403, r.json())
    eat = json.loads(minter.mint("0" * 64))
    r = requests.post(
        f"{base}/verify", json={"node": "gpu-e-0", "nonce": "0" * 64, "token": eat}, headers=alice.headers, timeout=30
    )
    assert r.status_code == 403 and r.json()["error"]["field"] == "node", r.text
    EXT_SPEC.validate("/attestation/verify", "POST", 403, r.json())
    r = requests.get(f"{base}/nodes", headers=alice.headers, timeout=30)
    assert r.status_code == 200, r.text
    EXT_SPEC.validate("/attestation/nodes", "GET", 200, r.json())
    assert next(n for n in r.json()["nodes"] if n["node"] == "gpu-e-0")["valid"]

    no_attest = {"Authorization": f"token {hub.token('alice', scopes=['access:servers!user=alice'])}"}
    r = requests.get(f"{base}/nodes", headers=no_attest, timeout=30)
    assert r.status_code == 403 and "custom:gpulab:attest" in r.json()["error"]["message"], r.text
    EXT_SPEC.validate("/attestation/nodes", "GET", 403, r.json())


@pytest.mark.browser
def test_lab_attestation_tab_shows_each_node(hub, alice, output_dir):
    """In alice's JupyterLab (real Chromium), the gpulab panel's Attestation tab shows what the API says of
    each node: attested (by whom) or not, with the reason."""
    nodes = alice.request("GET", "/attestation/nodes").json()["nodes"]
    assert any(n["valid"] for n in nodes) and any(not n["valid"] for n in nodes), nodes
    with chromium_page() as page:
        try:
            hub_login(page, hub, "alice")
            page.locator(".jp-SideBar [data-id='gpulab-panel']").click(timeout=60_000)
            panel = page.locator(".jp-gpulab-Panel")
            panel.get_by_role("tab", name="Attestation").click()
            for node in nodes:
                card = panel.locator(f"[data-node='{node['node']}']")
                status = "attested" if node["valid"] else "revoked" if node["revoked"] else "not attested"
                card.locator(".jp-gpulab-state", has_text=status).wait_for(timeout=30_000)
                text = card.inner_text()
                gpus = len(node["devices"])
                assert f"{gpus} GPU{'' if gpus == 1 else 's'} ·" in text, text
                if node["valid"]:
                    assert f"by {node['user']}" in text, text
                elif node["problem"]:
                    assert node["problem"] in text, text
        except Exception:
            page.screenshot(path=str(output_dir / "lab-attestation-tab-failure.png"))
            raise
        page.screenshot(path=str(output_dir / "lab-attestation-tab.png"))


def test_gated_job_waits_for_its_node_and_carries_the_fingerprint(hub, alice, carol, minter, work):
    from mlflow import MlflowClient

    code = "import os; print('fingerprint=' + os.environ['GPULAB_ATTESTATION_FINGERPRINT'], flush=True)"
    job = alice.submit(entrypoint=["python", "-c", code], attestation="required")
    deadline = time.monotonic() + 20
    while "attestation" not in (waiting := alice.request("GET", f"/jobs/{job['id']}").json())["state_reason"]:
        assert time.monotonic() < deadline, waiting
        time.sleep(0.2)
    assert waiting["state"] == "queued" and waiting["attestation_fingerprint"] is None
    assert waiting["state_reason"] == f"waiting: attestation required: node {GATED_NODE}: node never attested"

    r, eat = attest(enrol(hub, carol, GATED_NODE), minter, GATED_NODE)
    assert r.status_code == 200, r.text
    done = alice.wait(job["id"], timeout=120)
    assert done["state"] == "succeeded", done
    SPEC.validate("/jobs/{job_id}", "GET", 200, done)
    assert done["attestation_fingerprint"] == fingerprint(eat) and done["attestation_node"] == GATED_NODE
    assert f"fingerprint={fingerprint(eat)}" in alice.request("GET", f"/jobs/{job['id']}/logs").text
    run = MlflowClient(f"sqlite:///{work / 'mlflow' / 'mlflow.sqlite'}").get_run(done["mlflow_run_id"])
    assert run.data.tags["gpulab.attestation_fingerprint"] == fingerprint(eat)


def test_the_api_key_stays_in_gpulab_jobs(hub, alice):
    hub.spawn("alice")
    (service,) = processes(hub, "-m gpulab.services.jobs", whole_word=True)
    assert service.environ().get(NRAS_KEY_VAR) == ENV_KEY  # handed to gpulab-jobs alone, which read the file
    assert f"attestation: NRAS API key from {hub.data_dir.parent / 'nras-api-key'}" in hub.log_path.read_text()

    kernel = requests.post(
        f"{hub.url}/user/alice/api/kernels", json={"name": "python3"}, headers=alice.headers, timeout=60
    )
    assert kernel.status_code == 201, kernel.text
    try:
        deadline = time.monotonic() + 30
        while not (kernels := processes(hub, "ipykernel")) and time.monotonic() < deadline:
            time.sleep(0.2)
        user_side = processes(hub, "jupyterhub.singleuser") + kernels
        assert len(user_side) >= 2 and kernels
        for proc in user_side:
            env = proc.environ()
            assert NRAS_KEY_VAR not in env, proc.cmdline()
            assert not [k for k, v in env.items() if FILE_KEY in v or ENV_KEY in v], proc.cmdline()
    finally:
        requests.delete(f"{hub.url}/user/alice/api/kernels/{kernel.json()['id']}", headers=alice.headers, timeout=30)
    log = hub.log_path.read_text()
    assert FILE_KEY not in log and ENV_KEY not in log


class OfflineRay(RayExecutor):
    """The Ray executor with a fixed capacity instead of a cluster."""

    async def capacity(self):
        return {"default": PoolCapacity(gpus=0, cpus=4.0)}


@pytest.mark.parametrize(
    "executor_class, why",
    [
        (OfflineRay, "attestation gating is not supported on the ray executor yet"),
        ("local", "no attestation service is configured"),
    ],
)
async def test_gated_jobs_wait_where_gating_is_impossible(tmp_path, executor_class, why):
    store = JobStore(url=f"sqlite:///{tmp_path / 'jobs.sqlite'}")
    queue = JobQueue(
        config=Config({"JobQueue": {"executor_class": executor_class}}), store=store, data_dir=str(tmp_path)
    )
    row, _ = await queue.submit("alice", [], JobSpec(name="g", entrypoint=["true"], attestation="required"))
    await queue.tick()
    row = store.get_job(row.id)
    assert (row.state, row.state_reason) == ("queued", f"waiting: attestation required: {why}")
    store.engine.dispose()
