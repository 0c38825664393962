"""Sign in to the hub over plain HTTP, as a browser would."""

import re
import time

import requests


def _xsrf(session: requests.Session, url: str) -> str:
    r = session.get(url, timeout=30)
    r.raise_for_status()
    token = session.cookies.get("_xsrf")
    if not token:
        m = re.search(r'name="_xsrf" value="([^"]+)"', r.text)
        token = m.group(1) if m else ""
    return token


def password_login(hub_url: str, username: str, password: str) -> requests.Session:
    """A session signed in to the hub with its login form."""
    s = requests.Session()
    xsrf = _xsrf(s, hub_url + "/hub/login")
    r = s.post(
        hub_url + "/hub/login",
        data={"username": username, "password": password, "_xsrf": xsrf},
        allow_redirects=False,
        timeout=30,
    )
    if r.status_code != 302:
        raise PermissionError(f"login as {username} failed: {r.status_code}")
    return s


def oidc_login(hub_url: str, username: str, password: str) -> tuple[requests.Session, requests.Response]:
    """Go through the hub's OIDC login at the test provider; return the session and the final response."""
    s = requests.Session()
    r = s.get(hub_url + "/hub/oauth_login?next=", timeout=30)  # -> provider's login page
    if "csrfmiddlewaretoken" not in r.text:
        return s, r
    csrf = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', r.text).group(1)
    r = s.post(
        r.url,
        data={"username": username, "password": password, "csrfmiddlewaretoken": csrf},
        headers={"Referer": r.url},
        timeout=60,
    )
    return s, r


def api_session_token(session: requests.Session, hub_url: str, user: str) -> str:
    """Create an API token with a browser session, as the hub's token page does."""
    xsrf = session.cookies.get("_xsrf", path="/hub/")
    r = session.post(
        f"{hub_url}/hub/api/users/{user}/tokens", json={"note": "test"}, headers={"X-XSRFToken": xsrf}, timeout=30
    )
    r.raise_for_status()
    return r.json()["token"]


def wait_for_lab(session: requests.Session, hub_url: str, user: str, timeout: float = 90) -> requests.Response:
    """Spawn through the browser route and follow redirects until JupyterLab answers."""
    deadline = time.monotonic() + timeout
    r = session.get(f"{hub_url}/hub/spawn", timeout=60)
    while time.monotonic() < deadline:
        r = session.get(f"{hub_url}/user/{user}/lab", timeout=60)
        if r.status_code == 200 and "JupyterLab" in r.text:
            return r
        time.sleep(0.5)
    raise TimeoutError(f"JupyterLab for {user} not reachable: last {r.status_code} {r.url}")
