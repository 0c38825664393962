"""Sign-in through a real OIDC provider, RBAC over the hub and /gpulab/api/v1, and user events.

Real parts: the django-oauth-toolkit provider, `gpulab up` with JupyterHub and
configurable-http-proxy (each on a loopback address of its own), spawned JupyterLab servers, a hub-managed event subscriber.
"""

import json
import sqlite3
import sys
import time
from pathlib import Path

import pytest
import requests

from gpulab.secrets import write_secret_file
from tests.support.gpulab_up import Platform
from tests.support.login import oidc_login
from tests.support.net import next_loopback
from tests.support.oidc import OIDCProvider
from tests.support.openapi import Spec

SPEC = Spec(Path(__file__).parent.parent / "gpulab" / "server_extension" / "openapi.yaml")

RECORDER = Path(__file__).parent / "support" / "event_recorder.py"
USERS = {  # name: groups at the provider
    "alice": ["ml", "ml-gpu"],
    "bob": ["ml-guest"],
    "carol": ["ml", "ml-admins"],
    "dave": ["sales"],
    "erin": ["ml"],
    "frank": ["ml"],
}
PASSWORD = "correct horse battery"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    work = tmp_path_factory.mktemp("oidc")
    hub = Platform(work / "data", host=next_loopback())
    idp = OIDCProvider.start(work / "idp", host=next_loopback(), redirect_uris=[f"{hub.url}/hub/oauth_callback"])
    for name, groups in USERS.items():
        idp.add_user(name, PASSWORD, groups)
    secret_file = work / "oidc-client-secret"
    write_secret_file(secret_file, idp.client_secret)
    events_db = work / "events.sqlite"
    config = f"""
c.Login.method = "oidc"
c.OIDC.issuer = {idp.issuer!r}
c.OIDC.client_id = {idp.client_id!r}
c.OIDC.client_secret_file = {str(secret_file)!r}
c.OIDC.allowed_groups = {{"ml", "ml-guest", "ml-admins"}}
c.OIDC.admin_groups = {{"ml-admins"}}
c.Roles.everyone = []
c.Roles.group_roles = {{"ml": ["gpulab-user"], "ml-gpu": ["gpulab-gpu"]}}
c.Platform.event_subscribers = ["events-recorder"]
"""
    recorder = {
        "name": "events-recorder",
        "command": [sys.executable, str(RECORDER)],
        "environment": {"EVENT_RECORDER_DB": str(events_db)},
    }
    try:
        hub.start(config, services=[recorder])
        yield hub, idp, events_db
    finally:
        hub.stop()
        idp.stop()


def received_events(db: Path, user: str, timeout: float = 15, count: int = 1) -> list[dict]:
    """Events the subscriber applied for ``user``, waiting for at least ``count``."""
    deadline = time.monotonic() + timeout
    rows = []
    while time.monotonic() < deadline:
        if db.exists():
            with sqlite3.connect(db) as conn:
                try:
                    rows = conn.execute("SELECT payload FROM received WHERE user = ? ORDER BY seq", (user,)).fetchall()
                except sqlite3.OperationalError:
                    rows = []
            if len(rows) >= count:
                break
        time.sleep(0.2)
    return [json.loads(r[0]) for r in rows]


def login(hub, name, password=PASSWORD):
    session, response = oidc_login(hub.url, name, password)
    return session, response


def test_user_outside_allowed_groups_gets_clear_403(stack):
    hub, _, _ = stack
    _, r = login(hub, "dave")
    assert r.status_code == 403
    assert "your account is not in a group allowed to use gpulab" in r.text
    assert hub.api("GET", "/users/dave").status_code == 404


def test_wrong_password_is_rejected_by_the_provider(stack):
    hub, idp, _ = stack
    session, r = login(hub, "alice", "wrong password")
    assert r.url.startswith(idp.url) and "Please enter a correct username and password" in r.text
    assert hub.api("GET", "/users/alice").status_code in (200, 404)
    assert not any(c.name.startswith("jupyterhub-session") for c in session.cookies)


def whoami(hub, user, token=None):
    headers = {"Authorization": f"token {token}"} if token else {}
    return requests.get(
        f"{hub.url}/user/{user}/gpulab/api/v1/whoami", headers=headers, allow_redirects=False, timeout=30
    )


def test_rbac_matrix(stack):
    hub, _, _ = stack
    for name in ("alice", "bob", "carol"):
        _, r = login(hub, name)
        assert r.status_code == 200, (name, r.status_code, r.url)
    hub.spawn("alice")
    hub.spawn("bob")
    alice, bob, carol = (hub.token(n) for n in ("alice", "bob", "carol"))

    # the gpulab API in user servers
    assert whoami(hub, "alice").status_code in (401, 302, 403)  # anonymous
    r = whoami(hub, "alice", alice)
    assert r.status_code == 200, r.text
    SPEC.validate("/whoami", "GET", 200, r.json())
    assert r.json()["scopes"] == [
        "custom:gpulab:attest",
        "custom:gpulab:gpu",
        "custom:gpulab:infer",
        "custom:gpulab:jobs",
    ]
    assert r.json()["groups"] == ["ml", "ml-gpu"]
    r = whoami(hub, "bob", bob)  # signed in, own server, but no gpulab role
    assert r.status_code == 403, r.text
    assert r.json()["error"]["message"].startswith("this needs the custom:gpulab:")
    SPEC.validate("/whoami", "GET", 403, r.json())
    narrowed = hub.token("alice", scopes=["access:servers!user=alice"])
    assert whoami(hub, "alice", narrowed).status_code == 403
    assert whoami(hub, "alice", bob).status_code in (401, 403)  # someone else's server: not its user
    r = whoami(hub, "alice", carol)  # a gpulab admin
    assert r.status_code == 200, r.text
    assert r.json()["name"] == "carol" and r.json()["admin"] is True
    assert "custom:gpulab:admin" in r.json()["scopes"] and "custom:gpulab:gpu" in r.json()["scopes"]

    # the hub API
    def users(token):
        headers = {"Authorization": f"token {token}"} if token else {}
        return requests.get(f"{hub.url}/hub/api/users", headers=headers, timeout=30).status_code

    assert users(None) in (401, 403)
    assert users(alice) == 403
    assert users(carol) == 200


def test_group_change_at_provider_updates_hub_and_emits_event(stack):
    hub, idp, events_db = stack
    _, r = login(hub, "erin")
    assert r.status_code == 200
    created = received_events(events_db, "erin")
    assert [e["type"] for e in created] == ["user.created"]
    assert created[0]["groups"] == ["ml"] and created[0]["roles"] == ["gpulab-user"]

    idp.set_groups("erin", ["ml", "ml-gpu"])
    _, r = login(hub, "erin")
    assert r.status_code == 200
    model = hub.api("GET", "/users/erin").json()
    assert sorted(model["groups"]) == ["ml", "ml-gpu"]
    token = hub.token("erin")
    scopes = requests.get(f"{hub.url}/hub/api/user", headers={"Authorization": f"token {token}"}, timeout=30).json()[
        "scopes"
    ]
    assert "custom:gpulab:gpu" in scopes
    events = received_events(events_db, "erin", count=2)
    assert [e["type"] for e in events] == ["user.created", "user.updated"]
    assert events[1]["groups"] == ["ml", "ml-gpu"] and events[1]["roles"] == ["gpulab-gpu", "gpulab-user"]

    _, r = login(hub, "erin")  # no change, no event
    assert r.status_code == 200
    hub.spawn("erin")  # the login started it
    hub.stop_server("erin")
    assert hub.api("DELETE", "/users/erin").status_code == 204
    events = received_events(events_db, "erin", count=3)
    assert [e["type"] for e in events] == ["user.created", "user.updated", "user.deleted"]


@pytest.mark.browser
def test_browser_sign_in_lands_in_lab_and_runs_a_cell(stack, output_dir):
    from tests.support.browser import chromium_page, new_notebook, run_cell

    hub, idp, _ = stack
    with chromium_page() as page:
        try:
            page.goto(hub.url)
            page.wait_for_url(f"{idp.url}/accounts/login/**", timeout=30_000)  # redirected to the provider
            page.fill("input[name=username]", "frank")
            page.fill("input[name=password]", PASSWORD)
            page.get_by_role("button", name="Sign in").click()
            page.wait_for_url(f"{hub.url}/user/frank/lab**", timeout=90_000)
            new_notebook(page, "Python 3 (ipykernel)")
            run_cell(page, 0, "import os; print('user is', os.environ['JUPYTERHUB_USER'])")
            page.locator(".jp-OutputArea-output", has_text="user is frank").wait_for(timeout=120_000)
        except Exception:
            page.screenshot(path=str(output_dir / "oidc-login-failure.png"))
            raise AssertionError(f"browser stopped at {page.url}") from None
        page.screenshot(path=str(output_dir / "oidc-login-lab.png"))
