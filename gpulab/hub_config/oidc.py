"""OpenID Connect discovery for the hub's login."""

import json
import urllib.error
import urllib.request

from ..errors import ConfigError

ENDPOINTS = {
    "authorization_endpoint": "authorize_url",
    "token_endpoint": "token_url",
    "userinfo_endpoint": "userdata_url",
}


def discover(oidc) -> dict:
    """The provider's endpoints: configured overrides, else from its discovery document."""
    configured = {key: getattr(oidc, trait) for key, trait in ENDPOINTS.items()}
    if all(configured.values()):
        return configured
    if not oidc.issuer:
        raise ConfigError("OIDC.issuer is not set (or set OIDC.authorize_url, token_url and userdata_url)")
    url = oidc.issuer.rstrip("/") + "/.well-known/openid-configuration"
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            doc = json.load(resp)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise ConfigError(f"OIDC.issuer: cannot read the discovery document at {url}: {e}") from None
    if doc.get("issuer", "").rstrip("/") != oidc.issuer.rstrip("/"):
        raise ConfigError(f"OIDC.issuer: discovery at {url} names issuer {doc.get('issuer')!r}, not {oidc.issuer!r}")
    for key in ENDPOINTS:
        configured[key] = configured[key] or doc.get(key, "")
        if not configured[key]:
            raise ConfigError(f"OIDC.issuer: discovery document at {url} has no {key}")
    return configured
