"""MLflow tracking as a hub-managed service, behind hub auth: ``python -m gpulab.services.mlflow``.

Runs (:mod:`.app`) ``mlflow server`` on the unix socket ``c.MLflowService.socket``, in a directory made 0700 so
that only this service's account can connect (store ``backend_store_uri``, served artifacts in
``artifacts_destination``, UI and API under ``$JUPYTERHUB_SERVICE_PREFIX``), and a streaming reverse proxy to it on
``$JUPYTERHUB_SERVICE_URL``: the only way in. The proxy lets through only requests with a credential:

- hub-authenticated ones holding ``access:services!service=<name>``: a browser's OAuth cookie (login via
  the hub, callback at ``<prefix>oauth_callback``) or ``Authorization: token|bearer <hub token>`` (the
  MLflow client sends ``$MLFLOW_TRACKING_TOKEN`` that way);
- a running job's own token, ``Authorization: bearer job:<job id>:<job token>`` (gpulab-jobs gives jobs
  that as ``MLFLOW_TRACKING_TOKEN``), checked with gpulab-jobs at ``c.MLflowService.jobs_api_url``; it stops working
  when the attempt ends (within :data:`JOB_TOKEN_TTL` seconds);
- a delegate service (``c.MLflowService.delegates``, default gpulab-infer) acting for a user,
  ``Authorization: bearer as:<user>:<admin 0|1>:<the service's hub token>`` (:mod:`.identity`).

No credential is passed on to MLflow: it gets the caller's name instead (:mod:`.auth`), and decides with its
own permissions (its basic-auth app, as ``--app-name gpulab``): an experiment or registered model is its
creator's to change and delete, and readable by the creator's hub groups, by everyone else or by nobody
(``c.Platform.mlflow_sharing``); admins may do anything.

Every client, users', jobs' and services', uses the tracking URI ``<service URL><prefix without trailing
slash>`` (through the hub's proxy or straight to the service URL).
"""

import asyncio
import hashlib
import json
import os
import socket
import sys
import time
from pathlib import Path
from urllib.parse import quote

from jupyterhub.services.auth import HubOAuth, HubOAuthCallbackHandler, HubOAuthenticated
from tornado import httputil, web
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.netutil import Resolver
from tornado.simple_httpclient import SimpleAsyncHTTPClient

from ...errors import ConfigError
from ...service.errors import APIError
from ...service.handlers import JSONAPIMixin
from .identity import (
    ADMIN_HEADER,
    ADMIN_USERNAME,
    DELEGATION_PREFIX,
    GROUPS_HEADER,
    HEADER_PREFIX,
    USER_HEADER,
    mlflow_user,
)

MAX_BODY = 64 * 2**30  # artifact uploads and downloads are streamed; this only caps their size
SMALL_BODY = 64 * 1024  # a refused request's body up to this size is read before the refusal is answered
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
}
# Hub credentials stay here; Origin too: CSRF is checked here, MLflow would reject the hub's public origin.
NOT_FORWARDED = HOP_BY_HOP | {"host", "authorization", "cookie", "origin", "expect"}
UPSTREAM_HOST = "mlflow.sock"  # the Host MLflow sees (and allows) on its socket
JOB_TOKEN_TTL = 30  # seconds a job token, once checked with gpulab-jobs, is taken without asking again
# the proxy's own refusals in MLflow's error vocabulary (mlflow.protos.databricks_pb2.ErrorCode)
MLFLOW_ERROR_CODES = {
    400: "BAD_REQUEST",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "ENDPOINT_NOT_FOUND",
    413: "REQUEST_LIMIT_EXCEEDED",
    502: "TEMPORARILY_UNAVAILABLE",
    503: "TEMPORARILY_UNAVAILABLE",
}
SHARING = {"group": "NO_PERMISSIONS", "everyone": "READ", "private": "NO_PERMISSIONS"}  # -> default_permission


class SocketResolver(Resolver):
    """Every host name resolves to one unix socket: the upstream client reaches MLflow only there."""

    def initialize(self, path: str):
        self.path = path

    async def resolve(self, host, port, family=socket.AF_UNSPEC):
        return [(socket.AF_UNIX, self.path)]

    def close(self):
        pass


class JobTokens:
    """Running jobs' MLflow credentials (``job:<id>:<job token>``), checked with gpulab-jobs, which alone
    knows them (as hashes), and remembered for :data:`JOB_TOKEN_TTL` seconds."""

    PREFIX = "job:"

    def __init__(self, jobs_url: str):
        self.jobs_url = jobs_url.rstrip("/")
        self.known: dict[bytes, tuple[float, dict]] = {}

    async def identify(self, credential: str) -> dict | None:
        """``{"name": owner, "job_id": id, "kind": "job"}`` for a valid credential; None otherwise."""
        job_id, _, token = credential[len(self.PREFIX) :].partition(":")
        if not self.jobs_url or not job_id.isalnum() or not token:
            return None
        key = hashlib.sha256(credential.encode()).digest()
        now = time.monotonic()
        if (hit := self.known.get(key)) and now - hit[0] < JOB_TOKEN_TTL:
            return hit[1]
        try:
            response = await AsyncHTTPClient().fetch(
                f"{self.jobs_url}/jobs/{quote(job_id)}/identity",
                headers={"Authorization": f"job-token {token}"},
                raise_error=False,
                request_timeout=10,
            )
        except OSError as e:  # gpulab-jobs unreachable (HTTP errors are answers, handled below)
            raise APIError(503, f"cannot check the job token with gpulab-jobs: {e}") from None
        if response.code == 599:  # timed out
            raise APIError(503, f"cannot check the job token with gpulab-jobs: {response.error}")
        if response.code != 200:
            self.known.pop(key, None)
            return None
        identity = json.loads(response.body)
        user = {"name": identity["owner"], "job_id": identity["job_id"], "kind": "job", "groups": identity["groups"]}
        self.known = {k: v for k, v in self.known.items() if now - v[0] < JOB_TOKEN_TTL}
        self.known[key] = (now, user)
        return user


@web.stream_request_body
class ProxyHandler(JSONAPIMixin, HubOAuthenticated, web.RequestHandler):
    """Authenticate with the hub, then stream the request to ``upstream`` and its response back. The proxy's own
    errors are MLflow's ``{"error_code", "message"}``, which MLflow's clients show."""

    log_name = "gpulab-mlflow"

    SUPPORTED_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")

    def initialize(self, upstream: str, client: AsyncHTTPClient, job_tokens: JobTokens, delegates: frozenset):
        self.upstream = upstream
        self.client = client
        self.job_tokens = job_tokens
        self.delegates = delegates
        self.caller: dict | None = None  # identified by a job token or a delegation, not by the hub alone
        headers = self.request.headers
        self.has_body = int(headers.get("Content-Length") or 0) > 0 or "Transfer-Encoding" in headers
        self.body: asyncio.Queue | None = None
        self.response_started = False
        self.refusal: APIError | None = None

    def error_body(self, status, code, message, field, details) -> dict:
        return {"error_code": MLFLOW_ERROR_CODES.get(status, "INTERNAL_ERROR"), "message": message}

    def check_xsrf_cookie(self):
        """Cookie-authenticated requests: same-origin fetches (Fetch Metadata, e.g. the MLflow UI's) need no token."""
        if self.request.headers.get("Sec-Fetch-Site") != "same-origin":
            super().check_xsrf_cookie()

    def compute_etag(self):
        return None  # the body was streamed, not buffered

    def get_current_user(self):
        return self.caller or super().get_current_user()

    async def delegation(self, credential: str) -> dict | None:
        """The user a delegate service acts for (``as:<user>:<admin>:<its hub token>``); None if not one."""
        user, _, rest = credential[len(DELEGATION_PREFIX) :].partition(":")
        admin, _, token = rest.partition(":")
        if not user or admin not in ("0", "1") or not token:
            return None
        service = await self.hub_auth.user_for_token(token, sync=False)
        if not service or service.get("kind") != "service" or service.get("name") not in self.delegates:
            return None
        if not self.hub_auth.check_scopes(self.hub_auth.access_scopes, service):
            return None
        return {"name": user, "admin": admin == "1", "kind": "delegated", "via": service["name"]}

    async def prepare(self):
        try:
            await self.admit()
        except APIError as e:
            if self.has_body and self.body is None and self.refusal is None:
                # refused before reading a large body: tornado closes the connection, so say so (else a
                # keep-alive client such as the hub's proxy may send the next request into the closing socket)
                e.headers["Connection"] = "close"
            raise

    async def admit(self):
        """Identify the caller; start forwarding, or keep the refusal for once a small body is in."""
        scheme, _, credential = self.request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and credential.startswith(JobTokens.PREFIX):
            identified = self.caller = await self.job_tokens.identify(credential.strip())
        elif scheme.lower() == "bearer" and credential.startswith(DELEGATION_PREFIX):
            identified = self.caller = await self.delegation(credential.strip())
        else:
            identified = await self.hub_auth.get_user(self, sync=False)  # cached for current_user
        if not self.current_user:
            if identified:
                refusal = APIError(403, f"missing scope {','.join(sorted(self.hub_scopes or ()))}")
            elif self.request.method in ("GET", "HEAD") and "text/html" in self.request.headers.get("Accept", ""):
                self.redirect(self.get_login_url())  # a browser: log in via the hub
                return
            else:
                refusal = APIError(
                    401,
                    "authentication required: send 'Authorization: token <hub token>' (MLflow's "
                    "clients send $MLFLOW_TRACKING_TOKEN so)",
                )
            headers = self.request.headers
            if not self.has_body or (
                "Transfer-Encoding" not in headers and int(headers["Content-Length"]) <= SMALL_BODY
            ):
                # answered once the body (if any) is in: a response finished while tornado still reads the
                # request closes the connection, and the hub's proxy, sending on it (the body, or its next
                # request on a kept-alive connection), reports a 503 instead of the refusal
                self.refusal = refusal
                return
            raise refusal
        if self.has_body:
            self.body = asyncio.Queue(maxsize=4)
        self.response = asyncio.ensure_future(self.forward())
        self.response.add_done_callback(self.drop_body)

    async def data_received(self, chunk: bytes):
        if self.body and not self.response.done():
            await self.body.put(chunk)

    def drop_body(self, _response):
        """The upstream exchange ended (early, on errors): unblock ``data_received``; the rest goes unread."""
        while self.body and not self.body.empty():
            self.body.get_nowait()

    async def forward(self):
        headers = httputil.HTTPHeaders()
        for name, value in self.request.headers.get_all():
            if name.lower() not in NOT_FORWARDED and not name.lower().startswith(HEADER_PREFIX):
                headers.add(name, value)
        user, admin, groups = mlflow_user(self.current_user)  # for MLflow's permissions
        headers[USER_HEADER], headers[ADMIN_HEADER] = user, "1" if admin else "0"
        if groups is not None:
            headers[GROUPS_HEADER] = json.dumps(sorted(groups))
        headers["Host"] = UPSTREAM_HOST
        headers["X-Forwarded-For"] = self.request.remote_ip
        headers["X-Forwarded-Proto"] = self.request.protocol

        async def produce(write):
            while (chunk := await self.body.get()) is not None:
                await write(chunk)

        request = HTTPRequest(
            self.upstream + self.request.uri,
            method=self.request.method,
            headers=headers,
            body_producer=produce if self.body else None,
            allow_nonstandard_methods=True,
            follow_redirects=False,
            decompress_response=False,
            connect_timeout=10,
            request_timeout=24 * 3600,
            header_callback=self.on_upstream_header,
            streaming_callback=self.on_upstream_chunk,
        )
        return await self.client.fetch(request, raise_error=False)

    def on_upstream_header(self, line: str):
        if line.startswith("HTTP/"):
            start = httputil.parse_response_start_line(line.strip())
            self.set_status(start.code, start.reason)
            for name in ("Content-Type", "Server", "Date"):
                self.clear_header(name)
        elif line.strip():
            name, value = line.split(":", 1)
            if name.strip().lower() not in HOP_BY_HOP:
                self.add_header(name.strip(), value.strip())
        else:
            self.response_started = True

    def on_upstream_chunk(self, chunk: bytes):
        self.write(chunk)
        self.flush().add_done_callback(lambda done: done.exception())  # a client gone is not an error here

    async def relay(self):
        if self.refusal:
            raise self.refusal
        if self.body:
            await self.body.put(None)
        try:
            error = (await self.response).error
        except OSError as exc:  # no connection (HTTP errors are responses, relayed as they are)
            error = exc
        if not self.response_started:
            raise APIError(502, f"MLflow server unavailable: {error}")
        self.finish()

    get = head = post = put = patch = delete = options = relay


def mlflow_command(backend_uri: str, artifacts: str, sock: Path, prefix: str) -> list[str]:
    """``mlflow server`` on the unix socket ``sock`` (uvicorn's ``--uds`` wins over host and port), serving UI
    and API under ``prefix``, with its permissions (:mod:`.auth`)."""
    return [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--app-name",
        "gpulab",
        "--backend-store-uri",
        backend_uri,
        "--artifacts-destination",
        artifacts,
        "--serve-artifacts",
        "--uvicorn-opts",
        f"--uds {sock}",
        "--workers",
        "1",
        "--static-prefix",
        prefix.rstrip("/"),
        "--allowed-hosts",
        UPSTREAM_HOST,
    ]


def auth_config(path: Path, database_uri: str, sharing: str) -> Path:
    """Write MLflow's auth config (``MLFLOW_AUTH_CONFIG_PATH``): permissions in ``database_uri``, identities
    from the proxy, others' access to what a user creates from ``sharing``."""
    if sharing not in SHARING:
        raise ConfigError(f"Platform.mlflow_sharing must be one of {', '.join(SHARING)}, not {sharing!r}")
    path.write_text(f"""[mlflow]
default_permission = {SHARING[sharing]}
database_uri = {database_uri}
admin_username = {ADMIN_USERNAME}
authorization_function = gpulab.services.mlflow.auth:authenticate_from_proxy
""")
    return path


def make_app(sock: Path, prefix: str, jobs_url: str = "", delegates: frozenset = frozenset()) -> web.Application:
    """The proxy application for ``prefix``, authenticating with the hub from the service environment
    (and jobs' tokens with gpulab-jobs at ``jobs_url``)."""
    auth = HubOAuth.instance()
    if not auth.access_scopes:  # never fall back to "any hub user"
        auth.access_scopes = {f"access:services!service={os.environ.get('JUPYTERHUB_SERVICE_NAME', 'mlflow')}"}
    # stable across restarts (a browser's cookies stay valid) and secret: derived from the service's hub token
    secret = hashlib.sha256(b"gpulab-mlflow-cookies\0" + auth.api_token.encode()).digest()
    # its own client: hub API calls (HubOAuth's, on the shared AsyncHTTPClient) must not go to the socket
    client = SimpleAsyncHTTPClient(
        force_instance=True, resolver=SocketResolver(path=str(sock)), max_clients=64, max_body_size=MAX_BODY
    )
    proxy = {
        "upstream": f"http://{UPSTREAM_HOST}",
        "client": client,
        "job_tokens": JobTokens(jobs_url),
        "delegates": delegates,
    }
    return web.Application(
        [(prefix + "oauth_callback", HubOAuthCallbackHandler), (r".*", ProxyHandler, proxy)],
        cookie_secret=secret,
    )
