"""Notifications when a job ends, end to end: a real hub and gpulab-jobs, a webhook receiver (HTTP, on loopback) that
checks the signature and fails the first delivery, and a real SMTP server (aiosmtpd)."""

import hashlib
import hmac
import json
import threading
import time
from email import message_from_bytes
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from aiosmtpd.controller import Controller

from gpulab.net import free_port
from gpulab.services.jobs.openapi import SPEC_PATH
from tests.support.jobs import Client
from tests.support.net import next_loopback
from tests.support.openapi import Spec

SPEC = Spec(SPEC_PATH)


class Receiver(BaseHTTPRequestHandler):
    """Records each POST (headers, body); answers the first 500, the others 204."""

    received: list[dict] = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append({"headers": dict(self.headers), "body": body})
        self.send_response(500 if len(self.received) == 1 else 204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


class Mailbox:
    def __init__(self):
        self.messages = []

    async def handle_DATA(self, server, session, envelope):
        self.messages.append((envelope.rcpt_tos, message_from_bytes(envelope.content)))
        return "250 OK"


@pytest.fixture(scope="module")
def receiver():
    server = ThreadingHTTPServer((next_loopback(), 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://{server.server_address[0]}:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def mailbox():
    box = Mailbox()
    controller = Controller(box, hostname=next_loopback(), port=free_port())
    controller.start()
    box.address = (controller.hostname, controller.port)
    yield box
    controller.stop()


@pytest.fixture(scope="module")
def hub(gpulab_up, receiver, mailbox):
    config = f"""
c.Platform.mlflow_service = False
c.JobQueue.tick_interval = 0.2
c.Notifier.webhook_allowed = ["{receiver}/hooks/*"]
c.Notifier.smtp_host = "{mailbox.address[0]}"
c.Notifier.smtp_port = {mailbox.address[1]}
c.Notifier.interval = 0.2
c.Notifier.backoff = 0.3
"""
    return gpulab_up(config, users={"alice": [], "bob": [], "carol": []})


def until(predicate, timeout=30.0, what="it"):
    deadline = time.monotonic() + timeout
    while not (found := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return found


def test_bad_preferences_are_refused_naming_the_field(hub, receiver):
    alice = Client(hub, "alice")
    for body, field in [
        ({"webhook_url": "http://169.254.169.254/latest/meta-data"}, "webhook_url"),  # not one the admin allows
        ({"webhook_url": "file:///etc/passwd"}, "webhook_url"),
        ({"states": ["running"]}, "states"),
        ({"email": "not an address"}, "email"),
    ]:
        r = alice.request("PUT", "/notifications", json=body)
        assert r.status_code == 422 and r.json()["error"]["field"].startswith(field), (body, r.text)
        SPEC.validate("/notifications", "PUT", 422, r.json())


def test_an_ended_job_is_told_by_a_signed_webhook_retried_and_by_mail(hub, receiver, mailbox):
    alice = Client(hub, "alice")
    prefs = {"states": ["succeeded", "failed"], "webhook_url": f"{receiver}/hooks/alice", "email": "alice@example.org"}
    r = alice.request("PUT", "/notifications", json=prefs)
    assert r.status_code == 200, r.text
    SPEC.validate("/notifications", "PUT", 200, r.json())
    assert r.json()["states"] == ["failed", "succeeded"] and r.json()["pending"] == 0
    cancelled = alice.submit(entrypoint=["sleep", "60"])  # cancelled: not a state alice asked to be told of
    alice.request("POST", f"/jobs/{cancelled['id']}/cancel")
    job = alice.submit(name="told", entrypoint=["true"])
    assert alice.wait(job["id"])["state"] == "succeeded"

    until(lambda: len(Receiver.received) >= 2, what="the webhook's retry")
    first, second = Receiver.received[:2]
    assert first["body"] == second["body"]  # the same notification, delivered again after the 500
    assert first["headers"]["X-Gpulab-Delivery"] == second["headers"]["X-Gpulab-Delivery"]
    secret = (hub.data_dir / "jobs" / ".webhook-secret").read_text().strip()
    expected = "sha256=" + hmac.new(secret.encode(), second["body"], hashlib.sha256).hexdigest()
    assert second["headers"]["X-Gpulab-Signature-256"] == expected
    told = json.loads(second["body"])
    assert told["event"] == "job.ended" and (told["job"]["id"], told["job"]["state"]) == (job["id"], "succeeded")
    assert all(json.loads(r["body"])["job"]["id"] != cancelled["id"] for r in Receiver.received)

    recipients, mail = until(lambda: mailbox.messages and mailbox.messages[0], what="the mail")
    assert recipients == ["alice@example.org"] and mail["Subject"] == "gpulab: job told succeeded"
    assert job["id"] in mail.get_payload()
    settings = until(lambda: (s := alice.request("GET", "/notifications").json())["pending"] == 0 and s)
    SPEC.validate("/notifications", "GET", 200, settings)
    assert settings["failed"] == 0


def test_jupyterlab_reads_its_feed_from_a_cursor(hub):
    alice, bob = Client(hub, "alice"), Client(hub, "bob")  # bob never set preferences: told in Lab by default
    r = bob.request("GET", "/notifications/feed")
    SPEC.validate("/notifications/feed", "GET", 200, r.json())
    start = r.json()["cursor"]
    assert r.json()["notifications"] == []
    for after in ("-1", "x", str(2**41)):
        r = bob.request("GET", "/notifications/feed", params={"after": after})
        assert r.status_code == 400 and r.json()["error"]["field"] == "after", r.text
        SPEC.validate("/notifications/feed", "GET", 400, r.json())

    failed = bob.submit(name="breaks", entrypoint=["false"])
    assert bob.wait(failed["id"])["state"] == "failed"
    feed = until(
        lambda: (f := bob.request("GET", "/notifications/feed", params={"after": start}).json())["notifications"] and f
    )
    SPEC.validate("/notifications/feed", "GET", 200, feed)
    [entry] = feed["notifications"]
    assert (entry["job"]["id"], entry["job"]["state"], entry["job"]["name"]) == (failed["id"], "failed", "breaks")
    assert feed["cursor"] == entry["id"] > start
    assert bob.request("GET", "/notifications/feed", params={"after": feed["cursor"]}).json() == {
        "notifications": [],
        "cursor": feed["cursor"],
    }
    # Read again from the same cursor (another Lab of bob's): the same entry; alice's feed has none of bob's jobs.
    assert bob.request("GET", "/notifications/feed", params={"after": start}).json()["notifications"] == [entry]
    theirs = alice.request("GET", "/notifications/feed", params={"after": 0}).json()["notifications"]
    assert all(n["job"]["owner"] == "alice" for n in theirs)

    # Turned off: nothing more in the feed.
    r = bob.request("PUT", "/notifications", json={"lab": False})
    assert r.status_code == 200 and r.json()["lab"] is False, r.text
    quiet = bob.submit(entrypoint=["false"])
    assert bob.wait(quiet["id"])["state"] == "failed"
    time.sleep(0.5)
    assert bob.request("GET", "/notifications/feed", params={"after": feed["cursor"]}).json()["notifications"] == []


def test_a_pipeline_is_told_once_when_its_last_step_ends_not_step_by_step(hub):
    carol = Client(hub, "carol")  # told in Lab of succeeded, failed and timed out, by default
    start = carol.request("GET", "/notifications/feed").json()["cursor"]
    steps = [
        {"name": "prep", "job": {"name": "prep", "entrypoint": ["false"]}},
        {"name": "train", "needs": ["prep"], "job": {"name": "train", "entrypoint": ["true"]}},
        {"name": "report", "job": {"name": "report", "entrypoint": ["true"]}},
    ]
    made = carol.request("POST", "/pipelines", json={"name": "nightly", "directory": "/tmp", "steps": steps}).json()
    for step in made["steps"]:
        carol.wait(step["job_id"])
    feed = until(
        lambda: (
            (f := carol.request("GET", "/notifications/feed", params={"after": start}).json())["notifications"] and f
        )
    )
    time.sleep(1)  # what a step alone would have told would be there by now
    feed = carol.request("GET", "/notifications/feed", params={"after": start}).json()
    SPEC.validate("/notifications/feed", "GET", 200, feed)
    [entry] = feed["notifications"]
    told = entry["pipeline"]
    assert entry["job"] is None and (told["id"], told["name"], told["state"]) == (made["id"], "nightly", "failed")
    states = {s["name"]: s["state"] for s in told["steps"]}
    assert states == {"prep": "failed", "train": "cancelled", "report": "succeeded"} and told["finished_at"]


def test_old_notifications_are_pruned_unless_still_to_deliver(tmp_path):
    from datetime import timedelta

    from sqlalchemy.orm import Session

    from gpulab.service.storage import utcnow
    from gpulab.services.jobs.notifications import Notifier
    from gpulab.services.jobs.store import JobStore, NotificationRow

    store = JobStore(url=f"sqlite:///{tmp_path / 'jobs.sqlite'}")
    notifier = Notifier(store, str(tmp_path), retention_days=7, max_attempts=3)
    now = utcnow()
    old, new = now - timedelta(days=8), now - timedelta(days=1)
    rows = {  # name: (created, delivered, attempts)
        "old delivered": (old, old, 1),
        "old given up": (old, None, 3),
        "old still retried": (old, None, 1),
        "new delivered": (new, new, 1),
    }
    with Session(store.engine) as session, session.begin():
        for name, (created, delivered, attempts) in rows.items():
            session.add(
                NotificationRow(
                    owner="alice",
                    job_id="a" * 32,
                    channel="lab",
                    target=name,
                    payload={},
                    attempts=attempts,
                    next_attempt_at=created,
                    delivered_at=delivered,
                    created_at=created,
                )
            )
    assert notifier.prune(now) == 2
    with Session(store.engine) as session:
        kept = sorted(r.target for r in session.query(NotificationRow))
    assert kept == ["new delivered", "old still retried"]
    store.engine.dispose()
