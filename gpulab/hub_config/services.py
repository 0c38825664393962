"""Hub-managed services from config: each gets an address and a persistent API token."""

from pathlib import Path

from ..errors import ConfigError
from ..net import free_port


def managed_services(platform, data_dir: Path, token_for) -> list[dict]:
    """``c.JupyterHub.services`` for ``Platform.services``.

    A service with a ``command`` and no ``url`` is given a free port on 127.0.0.1;
    every service without an ``api_token`` gets one from ``token_for(name)``.
    """
    out = []
    for spec in platform.services:
        service = dict(spec)
        name = service.get("name")
        if not name:
            raise ConfigError(f"Platform.services: a service needs a name: {sorted(spec)}")
        if service.get("command") and not service.get("url"):
            service["url"] = f"http://127.0.0.1:{free_port()}"
        service.setdefault("api_token", token_for(name))
        if service.get("url"):
            service.setdefault("oauth_no_confirm", True)
        out.append(service)
    return out
