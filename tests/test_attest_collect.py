"""`gpulab attest collect` (run on a GPU node) against a real hub and gpulab-jobs, and the
`/attestation/evidence` endpoint it posts to (directly and through the server extension).

Real parts: `gpulab up` (JupyterHub, configurable-http-proxy, gpulab-jobs holding the attestation
service and the NRAS API key), a user's Jupyter server, the local executor running a gated job,
and the `gpulab` CLI as a subprocess.

STAND-INS, because neither can run here:
- NVIDIA's evidence collector `nvattest` needs a confidential-computing GPU. FAKE_COLLECTOR, a tiny
  Python script, takes its place: it prints nvattest's JSON shapes, and reports what it was given
  (nonce, environment, working directory) so the tests can check how the CLI ran it.
- NVIDIA's Remote Attestation Service (NRAS) cannot be reached. FakeNras, a local HTTP server,
  takes its place: it checks the Bearer key and the request, and answers an EAT minted by
  tests/support/attestation.py for the request's nonce, signed by the keys the test JWKS serves.
"""

import base64
import json
import os
import re
import secrets
import stat
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest
import requests

from gpulab.secrets import write_secret_file
from gpulab.services.jobs.openapi import SPEC_PATH
from tests.support.attestation import NONCE_NOT_MATCHING, EatMinter, attestation_hub_config, served_minter
from tests.support.gpulab_up import Platform
from tests.support.jobs import Client
from tests.support.net import next_loopback
from tests.support.openapi import Spec

ROOT = Path(__file__).resolve().parent.parent
SPEC = Spec(SPEC_PATH)
EXT_SPEC = Spec(ROOT / "gpulab" / "server_extension" / "openapi.yaml")
GATED_NODE = "gpu-collect-0"  # the local executor's node name; enrolled with `gpulab nodes enroll`
ADMIN_NODES = [
    "gpu-direct-0",
    "gpu-wrong-0",
    "gpu-api-0",
    "gpu-verdict-0",
    *(f"gpu-{mode}-0" for mode in ("fail", "garbage", "sdk-error", "hang")),
]  # enrolled by carol
PLATFORM_KEY = "nras-platform-key-" + secrets.token_hex(8)  # gpulab-jobs' NRAS API key
NODE_KEY = "nras-node-key-" + secrets.token_hex(8)  # a node's own NRAS key (--direct-token)
EVIDENCE_LIST = [
    {
        "evidence": base64.b64encode(secrets.token_bytes(48)).decode(),
        "certificate": base64.b64encode(secrets.token_bytes(48)).decode(),
    }
    for _ in range(2)
]
COLLECTOR_ENV = {"PATH", "LD_LIBRARY_PATH", "HOME", "TMPDIR", "LC_CTYPE"}  # LC_CTYPE: Python's locale coercion
OUTPUTS: list[str] = []  # everything the CLI printed, checked for secrets at the end

FAKE_COLLECTOR = '''\
"""FAKE of NVIDIA's evidence collector nvattest (no confidential-computing GPU here); test use only.

argv: MODE NONCE REPORT [NRAS_URL NODE_KEY_FILE]. Writes what it got to REPORT and a DEBUG log into
its cwd (as NVIDIA's SDKs do), then per MODE: evidence (nvattest collect-evidence's JSON), eat (asks
NRAS itself with the node's key, prints nvattest attest's JSON), fail (secrets on stderr, exit 3),
garbage (no JSON), sdk-error (nvattest's JSON for an SDK failure), hang (sleeps, with a child).
"""
import json, os, stat, subprocess, sys, time, urllib.request

mode, nonce, report = sys.argv[1:4]
cwd = os.getcwd()
state = {"nonce": nonce, "env": dict(os.environ), "cwd": cwd, "cwd_mode": stat.S_IMODE(os.stat(cwd).st_mode),
         "cwd_entries": os.listdir(cwd), "pid": os.getpid()}
with open("nvattest-debug.log", "w") as log:
    log.write(f"DEBUG nonce {nonce} evidence {json.dumps(EVIDENCE_LIST)}\\n")
if mode == "hang":
    state["child"] = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]).pid
with open(report, "w") as f:
    json.dump(state, f)
print("[2025-06-01 12:00:00.000] [nvattest] [warning] a log line before the JSON, as spdlog writes them")
evidences = [{"version": "1.0", "arch": "HOPPER", "nonce": nonce, "driver_version": "575.03", **e}
             for e in EVIDENCE_LIST]
if mode == "evidence":
    print(json.dumps({"evidences": evidences, "result_code": 0, "result_message": "Ok"}, indent=4))
elif mode == "eat":
    nras_url, key_file = sys.argv[4:6]
    body = {"nonce": nonce, "arch": "HOPPER", "claims_version": "3.0", "evidence_list": EVIDENCE_LIST}
    request = urllib.request.Request(f"{nras_url}/v4/attest/gpu", data=json.dumps(body).encode(), headers={
        "Content-Type": "application/json", "Authorization": "Bearer " + open(key_file).read().strip()})
    eat = json.loads(urllib.request.urlopen(request, timeout=30).read())
    print(json.dumps({"result_code": 0, "result_message": "Ok", "claims": [], "detached_eat": eat}, indent=4))
elif mode == "fail":
    print("nvml failed; evidence " + json.dumps(EVIDENCE_LIST), file=sys.stderr)
    sys.exit(3)
elif mode == "garbage":
    print("GPU 0: not in confidential-computing mode")
elif mode == "sdk-error":
    print(json.dumps({"evidences": [], "result_code": 15, "result_message": "NVML init failed\\n\\x1b[2Jspoof"}))
    sys.exit(15)
elif mode == "hang":
    time.sleep(60)
'''


class FakeNras:
    """FAKE of NVIDIA's Remote Attestation Service (``POST /v4/attest/<device>``) on 127.0.0.1; test use only.

    Accepts only ``Authorization: Bearer <key>`` for a key in ``keys`` (key -> who), checks the request
    is NRAS v4's with this test's evidence, and answers an EAT minted for the request's nonce (or for
    ``answer_nonce`` when set: an NRAS answering another nonce). ``status`` forces an error answer;
    ``failure`` (NVIDIA's error details) answers NRAS's failure verdict in NRAS's own error form;
    ``calls`` records (who, device, nonce), never the key.
    """

    def __init__(self, minter: EatMinter, keys: dict[str, str]):
        self.calls: list[tuple] = []
        self.answer_nonce: str | None = None
        self.failure: dict | None = None
        self.status: int | None = None
        fake = self
        bearer = {f"Bearer {key}": who for key, who in keys.items()}

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                device = self.path.removeprefix("/v4/attest/")
                who = bearer.get(self.headers.get("Authorization", ""))
                fake.calls.append((who, device, body.get("nonce")))
                valid = (
                    device in ("gpu", "switch")
                    and body.get("evidence_list") == EVIDENCE_LIST
                    and set(body) == {"nonce", "arch", "claims_version", "evidence_list"}
                    and body["arch"] == "HOPPER"
                    and re.fullmatch("[0-9a-f]{64}", body["nonce"])
                )
                status = fake.status or (401 if who is None else 200 if valid else 400)
                names = [f"{device.upper()}-{i}" for i in range(len(EVIDENCE_LIST))]  # one token per device
                answer = (
                    minter.mint(fake.answer_nonce or body["nonce"], names=names, failure=fake.failure).encode()
                    if status == 200
                    else b"{}"
                )
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("attest-collect")


@pytest.fixture(scope="module")
def minter():
    with served_minter() as minter:
        yield minter


@pytest.fixture(scope="module")
def nras(minter):
    fake = FakeNras(minter, {PLATFORM_KEY: "platform", NODE_KEY: "node"})
    yield fake
    fake.close()


@pytest.fixture(scope="module")
def hub(work, minter, nras):
    key_file = work / "nras-api-key"
    write_secret_file(key_file, PLATFORM_KEY)
    hub = Platform(work / "data", host=next_loopback())
    config = attestation_hub_config(work, minter, key_file, GATED_NODE, max_failures=50)
    hub.start(config + f'c.Attestation.nras_url = "{nras.url}"\nc.Login.admin_users = {{"carol"}}\n')
    hub.create_user("alice", groups=["ml"])
    hub.create_user("carol")
    carol = Client(hub, "carol")
    for name in ADMIN_NODES:
        r = carol.request("POST", "/attestation/enrolments", json={"node": name, "gpus": len(EVIDENCE_LIST)})
        assert r.status_code == 201, r.text
    yield hub
    hub.stop()


@pytest.fixture(scope="module")
def alice(hub):
    return Client(hub, "alice")


@pytest.fixture(scope="module")
def node(work, hub, nras):
    """A 'GPU node': its gpulab config, a hub token file, its own NRAS key, the fake collector, a cwd."""
    home = work / "node"
    home.mkdir()
    (home / "cwd").mkdir()
    collector = home / "fake_nvattest.py"
    collector.write_text(f"EVIDENCE_LIST = {EVIDENCE_LIST!r}\n" + FAKE_COLLECTOR)
    write_secret_file(home / "hub-token", hub.token("carol"))  # an admin's: may attest any enrolled node
    enrolled = subprocess.run(
        [
            sys.executable,
            "-m",
            "gpulab",
            "nodes",
            "enroll",
            GATED_NODE,
            "--gpus",
            str(len(EVIDENCE_LIST)),
            "--data-dir",
            str(hub.data_dir),
        ],
        env=hub.env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert enrolled.returncode == 0, enrolled.stderr
    (credential,) = re.findall(r"^credential: (node:\S+)$", enrolled.stdout, re.MULTILINE)
    write_secret_file(home / "node-credential", credential)  # the node's own identity
    write_secret_file(home / "nras-node-key", NODE_KEY)
    command = [sys.executable, str(collector), "evidence", "{nonce}", str(home / "report.json")]
    (home / "gpulab_config.py").write_text(
        f"c.Attestation.collector_timeout = 3\nc.Attestation.collector_command = {command!r}\n"
    )
    return home


def fake(node: Path, mode: str, *extra: str) -> list[str]:
    """``--collector`` argv running the fake collector in ``mode``; it reports to ``node/report.json``."""
    return [
        "--collector",
        sys.executable,
        str(node / "fake_nvattest.py"),
        mode,
        "{nonce}",
        str(node / "report.json"),
        *extra,
    ]


def gpulab_attest(
    hub: Platform,
    node: Path,
    *args: str,
    token_file: bool | str = True,
    url: str | None = None,
    env: dict | None = None,
) -> subprocess.CompletedProcess:
    """``gpulab attest collect`` as a GPU node runs it, with secrets in its environment that the collector
    must not get; its output is recorded in OUTPUTS. ``token_file``: the admin's ``hub-token``, or the
    name of another file in ``node``; False: the token comes from the environment."""
    (node / "report.json").unlink(missing_ok=True)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("GPULAB_", "JUPYTERHUB_"))}
    base.update(
        {
            "GPULAB_CONFIG": str(node / "gpulab_config.py"),
            "LD_LIBRARY_PATH": "/opt/nvidia/lib",
            "GPULAB_NRAS_API_KEY": NODE_KEY,
            "JUPYTERHUB_API_TOKEN": hub.token("carol"),
        }
    )
    file = "hub-token" if token_file is True else token_file
    argv = [
        sys.executable,
        "-m",
        "gpulab",
        "attest",
        "collect",
        "--url",
        url or f"{hub.url}/services/gpulab-jobs/api/v1",
        *(["--token-file", str(node / file)] if file else []),
        *args,
    ]
    result = subprocess.run(
        argv, env={**base, **(env or {})}, cwd=node / "cwd", capture_output=True, text=True, timeout=120, check=False
    )
    OUTPUTS.append(result.stdout + result.stderr)
    return result


def report(node: Path) -> dict:
    return json.loads((node / "report.json").read_text())


def one_line(result: subprocess.CompletedProcess) -> str:
    output = result.stdout + result.stderr
    assert output.count("\n") == 1 and output.endswith("\n"), output
    return output.strip()


def node_state(client: Client, name: str) -> dict | None:
    r = client.request("GET", "/attestation/nodes")
    assert r.status_code == 200, r.text
    return next((n for n in r.json()["nodes"] if n["node"] == name), None)


def test_collect_attests_the_node_and_its_gated_job_runs(hub, alice, nras, node):
    code = "import os; print('fingerprint=' + os.environ['GPULAB_ATTESTATION_FINGERPRINT'], flush=True)"
    job = alice.submit(entrypoint=["python", "-c", code], attestation="required")
    deadline = time.monotonic() + 20
    while "node never attested" not in alice.request("GET", f"/jobs/{job['id']}").json()["state_reason"]:
        assert time.monotonic() < deadline
        time.sleep(0.2)

    # the node's own credential; the collector from c.Attestation.collector_command
    result = gpulab_attest(hub, node, "--node", GATED_NODE, token_file="node-credential")
    assert result.returncode == 0, result.stderr
    line = one_line(result)
    match = re.fullmatch(
        rf"gpulab: attest: node {GATED_NODE} valid: fingerprint ([0-9a-f]{{64}}), "
        r"devices GPU-0, GPU-1, token expires \S+Z",
        line,
    )
    assert match, line
    fingerprint = match[1]

    seen = report(node)  # how the collector was run
    assert re.fullmatch("[0-9a-f]{64}", seen["nonce"])
    assert set(seen["env"]) <= COLLECTOR_ENV, seen["env"]  # no token, no key, nothing else
    assert seen["env"]["HOME"] == seen["env"]["TMPDIR"] == seen["cwd"]
    assert seen["env"]["LD_LIBRARY_PATH"] == "/opt/nvidia/lib"
    assert seen["cwd_mode"] == 0o700 and seen["cwd_entries"] == [] and seen["cwd"] != str(node / "cwd")
    assert not Path(seen["cwd"]).exists()  # deleted, with the collector's DEBUG log
    assert not psutil.pid_exists(seen["pid"])
    assert list((node / "cwd").iterdir()) == []
    assert nras.calls[-1] == ("platform", "gpu", seen["nonce"])  # relayed by gpulab-jobs with its key

    state = node_state(alice, GATED_NODE)
    assert state["valid"] and state["fingerprint"] == fingerprint and state["user"] == f"node:{GATED_NODE}"
    assert set(state["devices"]) == {"GPU-0", "GPU-1"}
    done = alice.wait(job["id"], timeout=120)
    assert done["state"] == "succeeded" and done["attestation_fingerprint"] == fingerprint, done
    assert f"fingerprint={fingerprint}" in alice.request("GET", f"/jobs/{job['id']}/logs").text


def test_direct_token_is_verified_by_the_platform(hub, alice, nras, node):
    """A node with its own NRAS access: the collector gets the EAT itself; the platform verifies it."""
    calls = len(nras.calls)
    result = gpulab_attest(
        hub,
        node,
        "--node",
        "gpu-direct-0",
        "--direct-token",
        *fake(node, "eat", nras.url, str(node / "nras-node-key")),
        token_file=False,
    )
    assert result.returncode == 0, result.stderr
    assert one_line(result).startswith("gpulab: attest: node gpu-direct-0 valid: fingerprint ")
    assert nras.calls[calls:] == [("node", "gpu", report(node)["nonce"])]  # the node's key, not the platform's
    assert node_state(alice, "gpu-direct-0")["valid"]


def test_nras_failure_verdict_revokes_the_node(hub, alice, nras, node):
    """NRAS fails the node: its answer's device tokens come in NRAS's error form (no eat_nonce). The node
    ends revoked with overall_result_false and NVIDIA's error details, not a harmless nonce_mismatch."""
    assert gpulab_attest(hub, node, "--node", "gpu-verdict-0", *fake(node, "evidence")).returncode == 0
    nras.failure = NONCE_NOT_MATCHING
    try:
        result = gpulab_attest(hub, node, "--node", "gpu-verdict-0", *fake(node, "evidence"))
    finally:
        nras.failure = None
    assert result.returncode == 1 and result.stdout == ""
    assert re.fullmatch(
        r"gpulab: attest: node gpu-verdict-0 refused: overall_result_false: NRAS reports the "
        r"attestation as failed \(GPU-0: 4010 NONCE_NOT_MATCHING; GPU-1: 4010 NONCE_NOT_MATCHING\)",
        one_line(result),
    ), result.stderr
    state = node_state(alice, "gpu-verdict-0")
    assert state["revoked"] and not state["valid"] and state["last_reason"] == "overall_result_false"
    assert state["nvidia_errors"] == {"GPU-0": NONCE_NOT_MATCHING, "GPU-1": NONCE_NOT_MATCHING}


def test_wrong_nonce_from_nras_is_refused(hub, alice, nras, node):
    nras.answer_nonce = secrets.token_hex(32)
    try:
        result = gpulab_attest(hub, node, "--node", "gpu-wrong-0", *fake(node, "evidence"))
    finally:
        nras.answer_nonce = None
    assert result.returncode == 1 and result.stdout == ""
    assert re.fullmatch(r"gpulab: attest: node gpu-wrong-0 refused: nonce_mismatch: .+", one_line(result))
    state = node_state(alice, "gpu-wrong-0")
    assert not state["valid"] and state["last_reason"] == "nonce_mismatch"


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("fail", "not attested: the collector failed: exited with status 3"),
        ("garbage", "not attested: the collector failed: printed no usable JSON"),
        (
            "sdk-error",
            (
                "not attested: the collector failed: exited with status 15 (nvattest result 15: "
                "NVML init failed [2Jspoof)"
            ),
        ),
        ("hang", "not attested: the collector did not finish in 3s and was killed"),
    ],
)
def test_collector_failure_is_one_line_and_leaks_nothing(hub, alice, nras, node, mode, expected):
    calls = len(nras.calls)
    result = gpulab_attest(hub, node, "--node", f"gpu-{mode}-0", *fake(node, mode))
    assert result.returncode == 1 and result.stdout == ""
    assert one_line(result) == f"gpulab: attest: node gpu-{mode}-0 {expected}"
    seen = report(node)
    assert not Path(seen["cwd"]).exists()
    for pid in (seen["pid"], seen.get("child")):  # killed with its process group
        if pid:
            try:
                assert psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                pass
    assert len(nras.calls) == calls and node_state(alice, f"gpu-{mode}-0") is None


def test_usage_and_configuration_errors_exit_2(hub, node, work):
    loose = work / "loose-token"
    loose.write_text("t")
    loose.chmod(0o644)
    narrow = work / "narrow-token"
    write_secret_file(narrow, hub.token("alice", scopes=["access:services!service=gpulab-jobs", "custom:gpulab:jobs"]))
    cases = [
        ({"token_file": False, "env": {"JUPYTERHUB_API_TOKEN": ""}}, ["--node", "n1"], "no hub token: pass --token"),
        ({"token_file": False}, ["--node", "n1", "--token-file", str(loose)], "run: chmod 600"),
        (
            {"token_file": False},
            ["--node", "n1", "--token-file", str(narrow)],
            "the platform refused the token at .*/attestation/nonce \\(forbidden: this needs the custom:gpulab:attest",
        ),
        ({"url": "http://192.0.2.1/api/v1"}, ["--node", "n1"], "must be https"),
        ({}, ["--node", "no/slashes"], "--node: 'no/slashes' must match"),
        ({"token_file": "node-credential"}, ["--node", "gpu-api-0"], "--node: the credential in use was enrolled for"),
        (
            {"token_file": False, "env": {"JUPYTERHUB_API_TOKEN": hub.token("alice")}},
            ["--node", GATED_NODE],
            "the platform refused the token at .*/attestation/nonce \\(not_node_identity: only node",
        ),
        (
            {},
            ["--node", "gpu-fail-0", "--collector", str(node / "missing-nvattest")],
            "collector '.*' cannot be started",
        ),
    ]
    for kwargs, args, message in cases:
        result = gpulab_attest(hub, node, *args, **kwargs)
        assert result.returncode == 2 and result.stdout == "", result.stderr
        assert re.match(f"gpulab: error: .*{message}", one_line(result)), result.stderr


def test_evidence_endpoint_directly_and_through_the_server_extension(hub, alice, nras, node):
    carol = Client(hub, "carol")  # an admin: may attest any enrolled node

    def nonce(base: str, node_name: str) -> str:
        r = requests.post(f"{base}/attestation/nonce", json={"node": node_name}, headers=carol.headers, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()["nonce"]

    body = {"node": "gpu-api-0", "evidence_list": EVIDENCE_LIST}
    r = carol.request("POST", "/attestation/evidence", json={**body, "nonce": nonce(carol.base, "gpu-api-0")})
    assert r.status_code == 200, r.text
    SPEC.validate("/attestation/evidence", "POST", 200, r.json())
    assert r.json()["verdict"] is True and set(r.json()["devices"]) == {"GPU-0", "GPU-1"}

    nras.status = 403  # NRAS refuses the evidence
    try:
        r = carol.request("POST", "/attestation/evidence", json={**body, "nonce": nonce(carol.base, "gpu-api-0")})
    finally:
        nras.status = None
    assert r.status_code == 502 and r.json()["error"]["code"] == "nras_rejected", r.text
    assert r.json()["error"]["field"] == "evidence_list"
    SPEC.validate("/attestation/evidence", "POST", 502, r.json())
    assert node_state(alice, "gpu-api-0")["last_reason"] == "nras_rejected"

    extra = [{**EVIDENCE_LIST[0], "arch": "HOPPER"}]
    r = carol.request("POST", "/attestation/evidence", json={**body, "nonce": "0" * 64, "evidence_list": extra})
    assert r.status_code == 422 and r.json()["error"]["field"] == "evidence_list.0.arch", r.text
    SPEC.validate("/attestation/evidence", "POST", 422, r.json())
    narrowed = {"Authorization": f"token {hub.token('alice', scopes=['access:services!service=gpulab-jobs'])}"}
    r = requests.post(f"{alice.base}/attestation/evidence", json=body, headers=narrowed, timeout=30)
    assert r.status_code == 403 and "custom:gpulab:attest" in r.json()["error"]["message"], r.text

    hub.spawn("alice")  # through alice's server, which acts for alice: she may not attest the node
    ext = f"{hub.url}/user/alice/gpulab/api/v1"
    r = requests.post(
        f"{ext}/attestation/evidence", json={**body, "nonce": "0" * 64}, headers=alice.headers, timeout=60
    )
    assert r.status_code == 403 and r.json()["error"]["code"] == "not_node_identity", r.text
    EXT_SPEC.validate("/attestation/evidence", "POST", 403, r.json())
    assert node_state(alice, "gpu-api-0")["last_reason"] == "nras_rejected"


def test_no_key_token_or_evidence_in_any_output_or_log(hub, node):
    """Run last: everything the CLI printed in this module, and the platform's log."""
    assert OUTPUTS
    token = (node / "hub-token").read_text().strip()
    credential = (node / "node-credential").read_text().strip()
    secrets_ = [PLATFORM_KEY, NODE_KEY, token, credential.rsplit(":", 1)[1]] + [
        v for e in EVIDENCE_LIST for v in e.values()
    ]
    for text, where in [("\n".join(OUTPUTS), "CLI output"), (hub.log_path.read_text(), "platform log")]:
        leaks = [s[:12] for s in secrets_ if s in text]
        assert not leaks, f"secret material in the {where}: {leaks}"
    assert stat.S_IMODE((node / "hub-token").stat().st_mode) == 0o600
