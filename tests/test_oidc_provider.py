"""The test OpenID Connect provider is a real one: discovery, code flow, PKCE, signed id_tokens."""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
from urllib.parse import parse_qs, urljoin, urlsplit

import jwt
import pytest
import requests

from tests.support.oidc import OIDCProvider

REDIRECT_URI = "http://127.0.0.1:9/hub/oauth_callback"
SCOPE = "openid profile email groups"


@pytest.fixture(scope="module")
def idp(tmp_path_factory):
    with OIDCProvider.start(tmp_path_factory.mktemp("oidc"), redirect_uris=[REDIRECT_URI]) as provider:
        provider.add_user("alice", "alice-pw", groups=["gpu", "staff"], email="alice@example.org")
        yield provider


def sign_in(idp: OIDCProvider, username: str, password: str, **params) -> requests.Response:
    """Start an authorization request, post the login form; return the provider's last response."""
    session = requests.Session()
    query = {
        "response_type": "code",
        "client_id": idp.client_id,
        "redirect_uri": REDIRECT_URI,
        "scope": SCOPE,
        "state": "st4te",
        **params,
    }
    resp = session.get(idp.authorize_url, params=query, allow_redirects=False)
    assert resp.status_code == 302
    login_url = urljoin(resp.url, resp.headers["Location"])
    assert urlsplit(login_url).path == "/accounts/login/"
    page = session.get(login_url)
    assert "Sign in" in page.text
    csrf = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)
    next_url = parse_qs(urlsplit(login_url).query)["next"][0]
    resp = session.post(
        login_url,
        allow_redirects=False,
        data={"csrfmiddlewaretoken": csrf, "username": username, "password": password, "next": next_url},
    )
    while resp.status_code == 302 and urljoin(resp.url, resp.headers["Location"]).startswith(idp.url):
        resp = session.get(urljoin(resp.url, resp.headers["Location"]), allow_redirects=False)
    return resp


def get_code(idp: OIDCProvider, username: str, password: str, **params) -> str:
    """Sign in and return the authorization code delivered to the redirect URI."""
    resp = sign_in(idp, username, password, **params)
    assert resp.status_code == 302, resp.text
    location = resp.headers["Location"]
    assert location.startswith(REDIRECT_URI + "?")
    query = parse_qs(urlsplit(location).query)
    assert query["state"] == ["st4te"]
    return query["code"][0]


def exchange(idp: OIDCProvider, code: str, basic: bool = False, **extra) -> requests.Response:
    """Redeem ``code`` at the token endpoint with client_secret_basic or client_secret_post."""
    data = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT_URI, **extra}
    if basic:
        return requests.post(idp.token_url, data=data, auth=(idp.client_id, idp.client_secret))
    return requests.post(idp.token_url, data={**data, "client_id": idp.client_id, "client_secret": idp.client_secret})


def verify_id_token(idp: OIDCProvider, id_token: str) -> dict:
    """Check the id_token's RS256 signature against the JWKS, its issuer and audience."""
    key = jwt.PyJWKClient(idp.jwks_url).get_signing_key_from_jwt(id_token)
    return jwt.decode(id_token, key.key, algorithms=["RS256"], audience=idp.client_id, issuer=idp.issuer)


def userinfo(idp: OIDCProvider, access_token: str) -> dict:
    resp = requests.get(idp.userinfo_url, headers={"Authorization": f"Bearer {access_token}"})
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_discovery(idp):
    doc = requests.get(idp.discovery_url).json()
    assert doc["issuer"] == idp.issuer == f"http://{idp.host}:{idp.port}/o"
    assert doc["authorization_endpoint"] == f"{idp.issuer}/authorize/"
    assert doc["token_endpoint"] == f"{idp.issuer}/token/"
    assert doc["userinfo_endpoint"] == f"{idp.issuer}/userinfo/"
    assert "RS256" in doc["id_token_signing_alg_values_supported"]
    assert {"openid", "profile", "email", "groups"} <= set(doc["scopes_supported"])
    assert {"sub", "preferred_username", "name", "email", "groups"} <= set(doc["claims_supported"])
    assert {"client_secret_post", "client_secret_basic"} <= set(doc["token_endpoint_auth_methods_supported"])
    assert "S256" in doc["code_challenge_methods_supported"]
    keys = requests.get(doc["jwks_uri"]).json()["keys"]
    assert keys and keys[0]["kty"] == "RSA"


@pytest.mark.parametrize("basic", [False, True], ids=["client_secret_post", "client_secret_basic"])
def test_code_flow(idp, basic):
    nonce = secrets.token_urlsafe(8)
    resp = exchange(idp, get_code(idp, "alice", "alice-pw", nonce=nonce), basic=basic)
    assert resp.status_code == 200, resp.text
    tokens = resp.json()
    assert tokens["token_type"] == "Bearer"
    claims = verify_id_token(idp, tokens["id_token"])
    assert claims["iss"] == idp.issuer
    assert claims["aud"] == idp.client_id
    assert claims["nonce"] == nonce
    assert claims["preferred_username"] == "alice"
    assert claims["email"] == "alice@example.org"
    assert claims["groups"] == ["gpu", "staff"]
    info = userinfo(idp, tokens["access_token"])
    assert info["sub"] == claims["sub"]
    assert info["preferred_username"] == "alice"
    assert info["groups"] == ["gpu", "staff"]


def test_code_is_single_use_and_secret_checked(idp):
    code = get_code(idp, "alice", "alice-pw")
    resp = requests.post(
        idp.token_url,
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT_URI,
            "client_id": idp.client_id,
            "client_secret": "wrong",
        },
    )
    assert resp.status_code == 401
    assert exchange(idp, code).status_code == 200
    assert exchange(idp, code).json()["error"] == "invalid_grant"


def test_pkce_s256(idp):
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    pkce = {"code_challenge": challenge, "code_challenge_method": "S256"}
    bad = exchange(idp, get_code(idp, "alice", "alice-pw", **pkce), code_verifier=secrets.token_urlsafe(48))
    assert bad.status_code == 400 and bad.json()["error"] == "invalid_grant"
    good = exchange(idp, get_code(idp, "alice", "alice-pw", **pkce), code_verifier=verifier)
    assert good.status_code == 200, good.text
    assert verify_id_token(idp, good.json()["id_token"])["preferred_username"] == "alice"


def test_wrong_password_gives_no_code(idp):
    resp = sign_in(idp, "alice", "not-the-password")
    assert resp.status_code == 200
    assert "Please enter a correct username and password" in resp.text
    assert "Location" not in resp.headers


def test_set_groups_changes_userinfo(idp):
    idp.add_user("bob", "bob-pw", groups=["a", "b"])
    tokens = exchange(idp, get_code(idp, "bob", "bob-pw")).json()
    assert verify_id_token(idp, tokens["id_token"])["groups"] == ["a", "b"]
    assert userinfo(idp, tokens["access_token"])["groups"] == ["a", "b"]
    idp.set_groups("bob", ["c"])
    assert userinfo(idp, tokens["access_token"])["groups"] == ["c"]
    idp.set_groups("bob", [])
    assert userinfo(idp, tokens["access_token"])["groups"] == []
