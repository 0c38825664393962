""":class:`ServiceApp`, the one shape of a gpulab service process (after dask-gateway's one ``Application`` per
process): it reads ``gpulab_config.py`` once, refuses a setting of its classes that is not valid before it serves
anything, logs and traces the same way as every other service, and runs :meth:`ServiceApp.serve` on one asyncio
loop until SIGTERM or SIGINT.

Settings come from the config file and, for what the hub decides when it starts a service (ports, sockets, the
other services' internal URLs), from ``$GPULAB_CONFIG_OVERRIDES``: the same classes and names as the file, as
JSON. The environment otherwise carries only what JupyterHub passes every managed service (:class:`HubEnvironment`)
and secrets a service reads once and removes (the NRAS API key).
"""

import asyncio
import json
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from jupyterhub.services.auth import HubOAuth, HubOAuthCallbackHandler
from tornado import web
from traitlets import Instance, Unicode, default
from traitlets.config import Application, Config

from ..config import CONFIGURABLES, OVERRIDES_ENV, Platform, check_settings, config_path, load_config
from ..errors import ConfigError
from ..tracing import setup_tracing
from .logs import setup_logging


@dataclass(frozen=True)
class HubEnvironment:
    """What JupyterHub tells every service it manages, in the ``JUPYTERHUB_*`` variables."""

    name: str
    api_url: str  # the hub's REST API, where callers' tokens are looked up
    api_token: str  # the service's own token
    service_url: str  # where the service listens ("" for a service without a URL)
    prefix: str  # the path the proxy routes to it

    @classmethod
    def from_environ(cls, name: str, environ=os.environ) -> "HubEnvironment":
        name = environ.get("JUPYTERHUB_SERVICE_NAME") or name
        return cls(
            name=name,
            api_url=environ.get("JUPYTERHUB_API_URL", ""),
            api_token=environ.get("JUPYTERHUB_API_TOKEN", ""),
            service_url=environ.get("JUPYTERHUB_SERVICE_URL", ""),
            prefix=environ.get("JUPYTERHUB_SERVICE_PREFIX") or f"/services/{name}/",
        )

    def require(self, *names: str) -> None:
        """A :class:`ConfigError` unless JupyterHub passed each of ``names`` (attributes: ``service_url``...)."""
        missing = [f"JUPYTERHUB_{n.upper()}" for n in names if not getattr(self, n)]
        if missing:
            raise ConfigError(f"{', '.join(missing)} not set: run this service from the hub (`gpulab up`)")


def service_overrides(settings: dict) -> dict:
    """The environment of a service the hub starts with ``settings`` (``{"Class": {"name": value}}``) on top of
    gpulab_config.py: ``gpulab up``'s command-line overrides, then ``settings``."""
    merged = Config(json.loads(os.environ.get(OVERRIDES_ENV) or "{}"))
    merged.merge(Config(settings))
    return {OVERRIDES_ENV: json.dumps(merged)} if merged else {}


class ServiceApp(Application):
    """A gpulab service process. A subclass names itself (``name``, the JupyterHub service name), lists the
    configurables it builds (``classes``: their settings are checked at start) and writes :meth:`serve`."""

    config_file = Unicode(
        help="The gpulab_config.py to read (default $GPULAB_CONFIG, else <data dir>/gpulab_config.py)."
    ).tag(config=True)
    platform = Instance(Platform)
    hub = Instance(HubEnvironment)

    aliases = {"config": "ServiceApp.config_file"}

    @default("config_file")
    def _default_config_file(self):
        return str(config_path())

    def initialize(self, argv=None) -> None:
        """Command line, then the config file with the hub's overrides (the command line winning), checked."""
        super().initialize(argv)
        setup_logging()
        cfg = load_config(Path(self.config_file))
        cfg.merge(self.config)
        check_settings(cfg, [*CONFIGURABLES, *self.classes])
        self.update_config(cfg)
        self.hub = HubEnvironment.from_environ(self.name)
        self.platform = Platform(parent=self)

    @property
    def data_dir(self) -> Path:
        return Path(self.platform.data_dir).expanduser()

    def web_application(self, handlers: list, cls: type[web.Application] = web.Application, **settings):
        """The tornado application of a REST service: ``handlers``, and the OAuth callback that browsers signing
        in come back to (``<prefix>oauth_callback``), with this process's cookie secret; hub tokens and cookies
        are looked up with the service's token (cached for a minute)."""
        HubOAuth.instance(api_token=self.hub.api_token, cache_max_age=60)
        routes = [(self.hub.prefix + "oauth_callback", HubOAuthCallbackHandler), *handlers]
        return cls(routes, cookie_secret=os.urandom(32), **settings)

    async def serve(self, stopping: asyncio.Event) -> None:
        """Serve until ``stopping`` is set (SIGTERM or SIGINT), then stop what was started."""
        raise NotImplementedError

    def start(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        setup_tracing(self.name)
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        await self.serve(stopping)

    @classmethod
    def launch_instance(cls, argv=None, **kwargs) -> None:
        """Run the service; a configuration problem ends it with one line naming the setting, not a traceback."""
        try:
            super().launch_instance(argv, **kwargs)
        except ConfigError as e:
            sys.exit(f"{cls.name}: error: {e}")
