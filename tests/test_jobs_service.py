"""gpulab-jobs behind a real hub: submit, run, follow, cancel, quotas, RBAC, bad input, restarts.

Real parts: `gpulab up` (JupyterHub, configurable-http-proxy, the gpulab-jobs service), the
local executor running jobs under `python -m gpulab.runner`.
"""

import json
import signal
import threading
import time

import psutil
import pytest
import requests

from gpulab.kernels.client import GpulabError, JobsClient
from gpulab.services.jobs.openapi import SPEC_PATH
from tests.support.jobs import Client
from tests.support.openapi import Spec

SPEC = Spec(SPEC_PATH)
PY = "import sys, time; "


@pytest.fixture(scope="module")
def hub(gpulab_up):
    config = """
c.Platform.mlflow_service = False
c.Login.admin_users = {"carol"}
c.Roles.everyone = ["gpulab-user"]
c.Roles.group_roles = {"gpu": ["gpulab-gpu"]}
c.JobQueue.user_quota = {"max_jobs": 1, "max_gpus": 1}
c.JobQueue.tick_interval = 0.2
c.JobQueue.cancel_grace = 2
c.JobQueue.max_queued = 20
c.JobQueue.submit_burst = 40
c.JobQueue.submit_rate = 0.5
c.JobQueue.log_follow_recheck = 1
c.JobQueue.log_follow_max = 10
"""
    return gpulab_up(config, users={"alice": ["gpu"], "bob": [], "carol": [], "dave": [], "erin": []})


@pytest.fixture(scope="module")
def alice(hub):
    return Client(hub, "alice")


@pytest.fixture(scope="module")
def bob(hub):
    return Client(hub, "bob")


def test_job_runs_with_progress_logs_and_events(alice):
    code = (
        PY + "print('hello from the job', flush=True); import gpulab\n"
        "for i in range(1, 4):\n    gpulab.progress(i, 3, loss=1.0 / i); time.sleep(0.3)\n"
    )
    job = alice.submit(entrypoint=["python", "-c", code], labels={"suite": "service"})
    SPEC.validate("/jobs", "POST", 201, job)
    assert job["state"] == "queued" and job["owner"] == "alice"
    done = alice.wait(job["id"])
    assert done["state"] == "succeeded", done
    SPEC.validate("/jobs/{job_id}", "GET", 200, done)
    assert done["progress"]["step"] == 3 and done["progress"]["fraction"] == 1.0
    assert done["progress"]["metrics"]["loss"] == pytest.approx(1 / 3)
    logs = alice.request("GET", f"/jobs/{job['id']}/logs")
    assert "hello from the job" in logs.text
    events = alice.request("GET", f"/jobs/{job['id']}/events").json()["events"]
    assert [e["to_state"] for e in events] == ["queued", "dispatching", "running", "succeeded"]
    listed = alice.request("GET", "/jobs", params={"label": "suite=service"}).json()
    SPEC.validate("/jobs", "GET", 200, listed)
    assert [j["id"] for j in listed["jobs"]] == [job["id"]]


def test_idempotency_key_returns_the_same_job(alice):
    first = alice.submit(entrypoint=["true"], idempotency_key="k-1")
    again = alice.submit(expect=200, entrypoint=["true"], idempotency_key="k-1")
    assert again["id"] == first["id"]


def test_follow_logs_streams_until_the_end(alice):
    code = PY + "[print('line', i, flush=True) or time.sleep(0.2) for i in range(5)]"
    job = alice.submit(entrypoint=["python", "-c", code])
    r = requests.get(
        f"{alice.base}/jobs/{job['id']}/logs", params={"follow": "true"}, headers=alice.headers, stream=True, timeout=60
    )
    assert r.headers["Content-Type"].startswith("text/event-stream")
    text, end = "", None
    event = None
    for line in r.iter_lines(decode_unicode=True):
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            data = json.loads(line[6:])
            if event == "log":
                text += data["text"]
            elif event == "end":
                end = data
                break
    assert end == {"state": "succeeded"}
    assert all(f"line {i}" in text for i in range(5))


def test_cancel_stops_the_process_group(hub, alice):
    pidfile = hub.user_dir("alice") / "pid"
    code = PY + f"import os; open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    job = alice.submit(entrypoint=["python", "-c", code])
    alice.wait(job["id"], states=("running",))
    deadline = time.monotonic() + 20
    while not pidfile.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    pid = int(pidfile.read_text())
    r = alice.request("POST", f"/jobs/{job['id']}/cancel")
    assert r.status_code == 200, r.text
    assert alice.wait(job["id"])["state"] == "cancelled"
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert alice.request("POST", f"/jobs/{job['id']}/cancel").status_code == 409
    assert alice.request("DELETE", f"/jobs/{job['id']}").status_code == 204
    assert alice.request("GET", f"/jobs/{job['id']}").status_code == 404


def test_quota_keeps_a_second_job_queued_while_another_user_runs(alice, bob):
    first = alice.submit(entrypoint=["sleep", "30"])
    alice.wait(first["id"], states=("running",))
    second = alice.submit(entrypoint=["true"])
    theirs = bob.submit(entrypoint=["true"])
    assert bob.wait(theirs["id"])["state"] == "succeeded"
    waiting = alice.request("GET", f"/jobs/{second['id']}").json()
    assert waiting["state"] == "queued" and "quota" in waiting["state_reason"], waiting
    quota = alice.request("GET", "/quota").json()
    assert quota["limits"]["max_jobs"] == 1 and quota["usage"]["jobs"] == 1
    alice.request("POST", f"/jobs/{first['id']}/cancel")
    assert alice.wait(second["id"])["state"] == "succeeded"


def test_gpu_jobs_need_the_gpu_scope_and_wait_for_capacity(alice, bob):
    r = bob.request("POST", "/jobs", json={"name": "g", "entrypoint": ["true"], "resources": {"gpus": 1}})
    assert r.status_code == 403 and r.json()["error"]["field"] == "resources.gpus"
    job = alice.submit(entrypoint=["true"], resources={"gpus": 1})
    time.sleep(1)
    waiting = alice.request("GET", f"/jobs/{job['id']}").json()
    assert waiting["state"] == "queued" and "no GPU capacity in pool 'default'" in waiting["state_reason"]
    pools = alice.request("GET", "/pools").json()
    assert pools["pools"][0]["capacity"]["gpus"] == 0
    alice.request("POST", f"/jobs/{job['id']}/cancel")


def test_rbac(hub, alice, bob):
    job = alice.submit(entrypoint=["true"])
    assert bob.request("GET", f"/jobs/{job['id']}").status_code == 404
    assert bob.request("POST", f"/jobs/{job['id']}/cancel").status_code == 404
    assert job["id"] not in [j["id"] for j in bob.request("GET", "/jobs").json()["jobs"]]
    r = bob.request("GET", "/jobs", params={"owner": "alice"})
    assert r.status_code == 403 and r.json()["error"]["field"] == "owner"
    carol = Client(hub, "carol")
    assert carol.request("GET", f"/jobs/{job['id']}").json()["owner"] == "alice"
    everyone = carol.request("GET", "/jobs", params={"all": "true", "limit": 500}).json()["jobs"]
    assert {"alice", "bob"} <= {j["owner"] for j in everyone}
    assert requests.get(f"{alice.base}/jobs", timeout=30).status_code == 401
    narrowed = Client(hub, "alice", hub.token("alice", scopes=["access:services!service=gpulab-jobs"]))
    r = narrowed.request("GET", "/jobs")
    assert r.status_code == 403 and "custom:gpulab:jobs" in r.json()["error"]["message"]
    other_job_token = {"Authorization": "job-token not-a-token"}
    r = requests.post(f"{alice.base}/jobs/{job['id']}/progress", json={"step": 1}, headers=other_job_token, timeout=30)
    assert r.status_code == 403


@pytest.mark.parametrize(
    "spec, field",
    [
        ({"entrypoint": ["true"]}, "name"),
        ({"name": "x"}, "entrypoint"),
        ({"name": "x", "entrypoint": []}, "entrypoint"),
        ({"name": "x", "entrypoint": ["true"], "source": "print(1)"}, "source"),
        ({"name": "x", "entrypoint": ["true"], "resources": {"gpus": -1}}, "resources.gpus"),
        ({"name": "x", "entrypoint": ["true"], "resources": {"memory": "lots"}}, "resources.memory"),
        ({"name": "x", "entrypoint": ["true"], "env": {"JUPYTERHUB_API_TOKEN": "x"}}, "env"),
        ({"name": "x", "entrypoint": ["true"], "priority": 1000}, "priority"),
        ({"name": "x", "entrypoint": ["true"], "surprise": 1}, "surprise"),
        # hostile inputs (issue 14): each once gave a 500, stalled the queue or was stored as nonsense
        ({"name": "x", "entrypoint": ["true"], "max_runtime": 2**70}, "max_runtime"),
        ({"name": "x", "entrypoint": ["true"], "resources": {"cpus": 1e999}}, "resources.cpus"),
        ({"name": "x", "entrypoint": ["true"], "resources": {"cpus": 0}}, "resources.cpus"),
        ({"name": "x", "entrypoint": ["true"], "resources": {"memory": 2**70}}, "resources.memory"),
        ({"name": "x", "entrypoint": ["true"], "resources": {"memory": "9" * 400}}, "resources.memory"),
        ({"name": "x\u0000y", "entrypoint": ["true"]}, "name"),
        ({"name": "two\nlines", "entrypoint": ["true"]}, "name"),
    ],
)
def test_bad_input_names_the_field_and_stores_nothing(alice, spec, field):
    before = len(alice.request("GET", "/jobs", params={"limit": 500}).json()["jobs"])
    body = json.dumps(spec).replace("Infinity", "1e999")  # as a client that writes numbers JSON cannot hold sends
    r = alice.request("POST", "/jobs", data=body)
    assert r.status_code == 422, r.text
    SPEC.validate("/jobs", "POST", 422, r.json())
    assert r.json()["error"]["field"].startswith(field), r.json()
    assert len(alice.request("GET", "/jobs", params={"limit": 500}).json()["jobs"]) == before


def test_oversized_and_malformed_bodies(alice):
    # through the hub: the 413, not the proxy's 503 (the service reads and drops what it refuses)
    for size in (1024 * 1024 + 10, 20 * 1024 * 1024, 100 * 1024 * 1024):
        r = alice.request("POST", "/jobs", data=b"x" * size)
        assert r.status_code == 413 and "the limit is 1048576" in r.json()["error"]["message"], (size, r.text)
    r = alice.request("POST", "/jobs", data=b"{not json")
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = alice.request("POST", "/jobs", data=b"[" * 100_000 + b"]" * 100_000)
    assert r.status_code == 400 and "nested too deeply" in r.json()["error"]["message"], r.text
    assert alice.request("GET", "/jobs", params={"limit": 0}).status_code == 400
    assert alice.request("GET", "/jobs", params={"cursor": "garbage"}).status_code == 400
    for params, field in [({"state": "AAA"}, "state"), ({"all": "maybe"}, "all")]:
        r = alice.request("GET", "/jobs", params=params)
        assert r.status_code == 400 and r.json()["error"]["field"] == field, (params, r.text)
    assert alice.request("GET", "/jobs/" + "0" * 32).status_code == 404
    assert alice.request("GET", "/nope").status_code == 404


def test_deleting_a_user_cancels_their_jobs_and_removes_their_schedules(hub):
    dave = Client(hub, "dave")
    job = dave.submit(entrypoint=["sleep", "60"])
    dave.wait(job["id"], states=("running",))
    body = {"name": "nightly", "cron": "0 3 * * *", "job": {"name": "n", "entrypoint": ["true"]}}
    schedule = dave.request("POST", "/schedules", json=body).json()
    assert hub.api("DELETE", "/users/dave").status_code == 204  # -> user.deleted event
    carol = Client(hub, "carol")  # an admin: she may see everyone's
    assert carol.wait(job["id"])["state"] == "cancelled"
    deadline = time.monotonic() + 10
    while (r := carol.request("GET", f"/schedules/{schedule['id']}")).status_code == 200:
        assert time.monotonic() < deadline, r.text
        time.sleep(0.2)
    assert r.status_code == 404, r.text


def test_service_killed_mid_run_is_restarted_and_the_job_finishes_once(hub, alice):
    marker = hub.user_dir("alice") / "runs"
    code = PY + f"open({str(marker)!r}, 'a').write('run\\n'); time.sleep(4)"
    job = alice.submit(entrypoint=["python", "-c", code])
    alice.wait(job["id"], states=("running",))

    def service_pids():
        pids = set()
        for p in hub.descendants():
            try:
                if p.status() != psutil.STATUS_ZOMBIE and p.cmdline()[-2:] == ["-m", "gpulab.services.jobs"]:
                    pids.add(p.pid)
            except psutil.Error:
                pass
        return pids

    (old_pid,) = service_pids()
    psutil.Process(old_pid).send_signal(signal.SIGKILL)
    deadline = time.monotonic() + 60  # the hub restarts managed services
    while time.monotonic() < deadline and not (service_pids() - {old_pid}):
        time.sleep(0.5)
    assert service_pids() - {old_pid}, "the hub did not restart gpulab-jobs"
    done = alice.wait(job["id"])
    assert done["state"] == "succeeded", done
    assert marker.read_text() == "run\n"


def test_server_extension_acts_for_the_user(hub, alice):
    from pathlib import Path

    from tests.support.openapi import Spec as _Spec

    ext = _Spec(Path(__file__).parent.parent / "gpulab" / "server_extension" / "openapi.yaml")
    hub.spawn("alice")
    base = f"{hub.url}/user/alice/gpulab/api/v1"
    headers = alice.headers
    r = requests.get(f"{base}/status", headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    ext.validate("/status", "GET", 200, r.json())
    assert r.json()["gpus"] == "none" and r.json()["services"]["jobs"].endswith("/services/gpulab-jobs/api/v1")

    r = requests.post(
        f"{base}/jobs",
        json={"name": "via-ext", "entrypoint": ["python", "-c", "print('ext')"]},
        headers=headers,
        timeout=30,
    )
    assert r.status_code == 201, r.text
    ext.validate("/jobs", "POST", 201, r.json())
    job_id = r.json()["id"]
    assert r.json()["owner"] == "alice"
    assert alice.wait(job_id)["state"] == "succeeded"
    r = requests.get(f"{base}/jobs/{job_id}/logs", headers=headers, timeout=30)
    assert r.status_code == 200 and "ext" in r.text
    assert r.headers["Content-Type"] == "text/plain; charset=utf-8"  # the service's, not jupyter_server's JSON
    r = requests.get(f"{base}/jobs", headers=headers, timeout=30)
    ext.validate("/jobs", "GET", 200, r.json())
    assert job_id in [j["id"] for j in r.json()["jobs"]]
    r = requests.post(f"{base}/jobs", json={"name": "bad", "entrypoint": []}, headers=headers, timeout=30)
    assert r.status_code == 422 and r.json()["error"]["field"] == "entrypoint"
    ext.validate("/jobs", "POST", 422, r.json())
    assert requests.post(f"{base}/jobs/{job_id}/cancel", headers=headers, timeout=30).status_code == 409
    assert requests.get(f"{base}/jobs/{'0' * 32}", headers=headers, timeout=30).status_code == 404
    for _ in range(6):  # more than the breaker's threshold: refused by the extension, not failures of the service
        r = requests.post(f"{base}/jobs", data=b"x" * (20 * 1024 * 1024), headers=headers, timeout=60)
        assert r.status_code == 413 and "takes at most 1048576" in r.json()["error"]["message"], r.text
        ext.validate("/jobs", "POST", 413, r.json())
    assert requests.get(f"{base}/jobs", headers=headers, timeout=30).status_code == 200  # the circuit is closed
    body = {"name": "anonymous", "entrypoint": ["true"]}
    r = requests.post(f"{base}/jobs", json=body, timeout=30)  # no credential at all: told how to authenticate
    assert r.status_code == 401 and "Authorization: token" in r.json()["error"]["message"], r.text
    ext.validate("/jobs", "POST", 401, r.json())
    r = requests.post(f"{base}/jobs", json=body, cookies={"jupyterhub-session-id": "x"}, timeout=30)
    assert r.status_code == 403 and "_xsrf" in r.text, r.text  # a browser's cookies still need the form token


def test_metrics_need_read_metrics(hub, alice):
    url = f"{hub.url}/services/gpulab-jobs/metrics"
    assert requests.get(url, headers=alice.headers, timeout=30).status_code == 403
    r = requests.get(url, headers={"Authorization": f"token {hub.token('carol')}"}, timeout=30)
    assert r.status_code == 200, r.text
    assert 'gpulab_jobs_submitted_total{pool="default"}' in r.text
    assert "gpulab_jobs_request_duration_seconds_count" in r.text


def test_log_reads_are_bounded(alice):
    job = alice.submit(name="short-log", entrypoint=["python", "-c", "print('a line')"])
    alice.wait(job["id"])
    for params, field in [
        ({"offset": 2**44}, "offset"),
        ({"limit": 10**11}, "limit"),
        ({"offset": "9" * 400}, "offset"),
        ({"limit": -1}, "limit"),
    ]:
        r = alice.request("GET", f"/jobs/{job['id']}/logs", params=params)
        assert r.status_code == 400 and r.json()["error"]["field"] == field, (params, r.text)
    whole = alice.request("GET", f"/jobs/{job['id']}/logs").text
    r = alice.request("GET", f"/jobs/{job['id']}/logs", params={"limit": 4 * 1024 * 1024, "offset": 2})
    assert r.status_code == 200 and r.text == whole[2:] and "a line" in whole, (whole, r.text)


def test_submissions_are_capped_per_user_without_refusing_a_retry(hub, alice):
    erin = Client(hub, "erin")
    running = erin.submit(entrypoint=["sleep", "60"])
    erin.wait(running["id"], states=("running",))  # holds erin's quota of one: the rest stay queued
    queued = [erin.submit(entrypoint=["true"], idempotency_key=f"k{i}")["id"] for i in range(20)]
    r = erin.request("POST", "/jobs", json={"name": "one too many", "entrypoint": ["true"]})
    assert r.status_code == 429 and r.json()["error"]["code"] == "max_queued", r.text
    assert "JobQueue.max_queued" in r.json()["error"]["message"]
    SPEC.validate("/jobs", "POST", 429, r.json())
    again = erin.request("POST", "/jobs", json={"name": "test", "entrypoint": ["true"], "idempotency_key": "k3"})
    assert again.status_code == 200 and again.json()["id"] == queued[3], again.text  # a retry gets its job back
    alice.submit(entrypoint=["true"])  # another user is not held up by erin's queue
    statuses = [erin.request("POST", "/jobs", json={"name": "t", "entrypoint": ["true"]}) for _ in range(30)]
    limited = [r for r in statuses if r.json()["error"]["code"] == "rate_limited"]
    assert limited and all(r.status_code == 429 for r in statuses), [r.text for r in statuses]
    assert 1 <= int(limited[0].headers["Retry-After"]) <= 2 and "JobQueue.submit_rate" in limited[0].text
    for job_id in [running["id"], *queued]:
        assert erin.request("POST", f"/jobs/{job_id}/cancel").status_code == 200
    assert len(erin.request("GET", "/jobs", params={"limit": 500}).json()["jobs"]) == 21  # nothing refused was stored


def sse_events(response):
    """(event, data) pairs of a server-sent event stream."""
    event = None
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            yield event, json.loads(line[6:])


def test_a_followed_log_ends_soon_after_its_token_is_revoked(hub):
    r = hub.api("POST", "/users/alice/tokens", json={"note": "revoked below"})
    token, token_id = r.json()["token"], r.json()["id"]
    owner = Client(hub, "alice", token)
    job = owner.submit(entrypoint=["python", "-c", PY + "print('tick', flush=True); time.sleep(60)"])
    r = requests.get(
        f"{owner.base}/jobs/{job['id']}/logs", params={"follow": "true"}, headers=owner.headers, stream=True, timeout=60
    )
    events = sse_events(r)
    for event, data in events:
        assert event == "log", (event, data)
        if "tick" in data["text"]:
            break
    assert hub.api("DELETE", f"/users/alice/tokens/{token_id}").status_code == 204
    revoked = time.monotonic()
    offset = data["offset"]
    event, data = next(events)
    assert (event, data["code"], data["offset"]) == ("closed", "revoked", offset), data
    assert time.monotonic() - revoked < 5  # log_follow_recheck is 1 s here; the hub's token cache is bypassed
    assert Client(hub, "alice").request("POST", f"/jobs/{job['id']}/cancel").status_code == 200


def test_a_followed_log_is_followed_again_past_the_streams_time_limit(hub, alice):
    job = alice.submit(
        entrypoint=["python", "-c", PY + "print('tick', flush=True); time.sleep(12); print('tock', flush=True)"]
    )
    # the service ends each stream at log_follow_max (10 s here): the client follows on from the offset
    text = "".join(JobsClient(alice.base, alice.headers["Authorization"].split()[1]).follow(job["id"]))
    assert text.count("tick") == text.count("tock") == 1 and text.index("tick") < text.index("tock"), text


def test_the_client_says_why_a_followed_log_stopped(hub, alice):
    r = hub.api("POST", "/users/alice/tokens", json={"note": "revoked while following"})
    follower = JobsClient(alice.base, r.json()["token"])
    job = alice.submit(entrypoint=["sleep", "60"])
    revoke = threading.Timer(1.0, hub.api, ("DELETE", f"/users/alice/tokens/{r.json()['id']}"))
    revoke.start()
    with pytest.raises(GpulabError, match="stopped: the token this log was followed with is no longer valid"):
        for _ in follower.follow(job["id"]):
            pass
    revoke.join()
    assert alice.request("POST", f"/jobs/{job['id']}/cancel").status_code == 200


def test_a_dependency_on_another_users_job_is_refused_naming_it(alice, bob):
    bobs = bob.submit(entrypoint=["true"])
    body = {"name": "after-bob", "entrypoint": ["true"], "depends_on": [{"job": bobs["id"]}]}
    r = alice.request("POST", "/jobs", json=body)
    assert r.status_code == 422 and r.json()["error"]["field"] == "depends_on.0.job", r.text
    assert "there is no job" in r.json()["error"]["message"]
    SPEC.validate("/jobs", "POST", 422, r.json())
