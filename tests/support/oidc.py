"""Run the test OpenID Connect provider (``oidc_provider.py``) as a subprocess.

Usage::

    with OIDCProvider.start(tmp_path, redirect_uris=["http://127.0.0.1:8000/hub/oauth_callback"]) as idp:
        idp.add_user("alice", "pw", groups=["gpu"])
        ...  # idp.issuer, idp.authorize_url, idp.token_url, idp.client_id, idp.client_secret, ...
"""

from __future__ import annotations

import json
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path

from tests.support.net import next_loopback

PROVIDER_SCRIPT = Path(__file__).with_name("oidc_provider.py")


def free_port(host: str) -> int:
    """Return a TCP port that is free on ``host`` right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class OIDCProvider:
    """A running provider. Attributes:

    ``url`` (``http://HOST:PORT``), ``issuer`` (``URL/o``), ``discovery_url``, ``discovery``
    (the parsed document), ``authorize_url``, ``token_url``, ``userinfo_url``, ``jwks_url``,
    ``client_id``, ``client_secret``, ``redirect_uris``, ``host``, ``port``, ``db``,
    ``log_path``, ``process``.
    """

    def __init__(
        self, workdir: Path, host: str, port: int, client_id: str, client_secret: str, redirect_uris: Sequence[str]
    ):
        self.workdir = Path(workdir)
        self.host, self.port = host, port
        self.client_id, self.client_secret = client_id, client_secret
        self.redirect_uris = list(redirect_uris)
        self.db = self.workdir / "oidc.sqlite3"
        self.log_path = self.workdir / "oidc.log"
        self.url = f"http://{host}:{port}"
        self.issuer = f"{self.url}/o"
        self.discovery_url = f"{self.issuer}/.well-known/openid-configuration"
        self.process: subprocess.Popen | None = None

    @classmethod
    def start(
        cls,
        workdir: Path,
        host: str | None = None,
        *,
        redirect_uris: Sequence[str],
        client_id: str = "gpulab-hub",
        timeout: float = 30,
    ) -> OIDCProvider:
        """Initialise a provider in ``workdir`` on a free port of ``host`` (default: a loopback address of its own)
        and start serving it."""
        host = host or next_loopback()
        if not redirect_uris:
            raise ValueError("at least one redirect URI is needed")
        Path(workdir).mkdir(parents=True, exist_ok=True)
        idp = cls(workdir, host, free_port(host), client_id, secrets.token_urlsafe(32), redirect_uris)
        idp._run(
            "init",
            "--issuer",
            idp.issuer,
            "--client-id",
            client_id,
            "--client-secret",
            idp.client_secret,
            *[a for uri in idp.redirect_uris for a in ("--redirect-uri", uri)],
        )
        with open(idp.log_path, "ab") as log:
            idp.process = subprocess.Popen(
                [
                    sys.executable,
                    str(PROVIDER_SCRIPT),
                    "serve",
                    "--db",
                    str(idp.db),
                    "--host",
                    host,
                    "--port",
                    str(idp.port),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            idp._wait_ready(timeout)
        except BaseException:
            idp.stop()
            raise
        return idp

    def _wait_ready(self, timeout: float) -> None:
        """Poll discovery until it answers, then read the endpoints from it."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"OIDC provider exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.discovery_url, timeout=2) as resp:
                    self.discovery = json.load(resp)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"OIDC provider not answering at {self.discovery_url} after {timeout}s:\n{self.log_tail()}"
                    ) from None
                time.sleep(0.1)
        if self.discovery["issuer"] != self.issuer:
            raise RuntimeError(f"discovery issuer {self.discovery['issuer']!r} != {self.issuer!r}")
        self.authorize_url = self.discovery["authorization_endpoint"]
        self.token_url = self.discovery["token_endpoint"]
        self.userinfo_url = self.discovery["userinfo_endpoint"]
        self.jwks_url = self.discovery["jwks_uri"]

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the server log."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def _run(self, *args: str) -> None:
        """Run a provider subcommand against this provider's database."""
        cmd = [sys.executable, str(PROVIDER_SCRIPT), args[0], "--db", str(self.db), *args[1:]]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if result.returncode:
            raise RuntimeError(
                f"oidc_provider.py {args[0]} failed ({result.returncode}):\n{result.stdout}{result.stderr}"
            )

    def add_user(self, name: str, password: str, groups: Iterable[str] = (), email: str | None = None) -> None:
        """Create (or update) user ``name`` with exactly these groups."""
        self._run(
            "user",
            name,
            "--password",
            password,
            "--groups",
            ",".join(groups),
            *(("--email", email) if email is not None else ()),
        )

    def set_groups(self, name: str, groups: Iterable[str]) -> None:
        """Set the groups of existing user ``name`` exactly; userinfo reflects it at once."""
        self._run("user", name, "--groups", ",".join(groups))

    def stop(self) -> None:
        """SIGTERM the server, wait up to 10 s, then SIGKILL it."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> OIDCProvider:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
