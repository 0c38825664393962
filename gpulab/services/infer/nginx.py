"""The nginx data plane of ``gpulab-infer`` (``c.InferenceGateway.data_plane = "nginx"``).

nginx, with Debian's lua module, listens on the gateway's address. It handles ModelInfer itself:
``nginx_gateway.lua`` asks the Python gateway's authorize endpoint whether the caller's token may
call models (with per-model allow-lists configured, that model: it reads the model name from the request
first), the same checks as on the Python path, cached in nginx for ``token_cache_seconds``; then it adds
the Triton platform key (where configured) and proxies the call to a replica. Replicas are chosen as on the Python path: the
available one (by the Python gateway's health checks and breakers, which nginx reads from its
``/replicas`` every ``health_interval``) with the fewest calls in flight, over kept-alive connections; a
request that was never sent is tried on another replica, and with none available calls fail fast. Every other
RPC (health, metadata, model control, streams) and any request the fast path cannot read goes to the
Python gateway. nginx and the Python gateway talk over unix sockets in nginx's private run directory (see
:class:`NginxDataPlane`). With a REST port (``rest_address``) nginx serves it the same way: KServe v2
``POST /v2/models/<model>/infer`` goes to the replicas' HTTP endpoints (``http_replicas``) after the same
checks, and everything else to the Python gateway's REST handlers. The calls nginx handled are counted in Lua
and merged into the gateway's ``/metrics`` as ``process="nginx"``.
"""

import asyncio
import ctypes
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

from tornado import web
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_unix_socket

from ...errors import ConfigError
from ...inference.triton import GRPC_KEY_PREFIX
from ...net import socket_path
from ...scopes import INFER
from ...service.errors import http_status, lua_tables
from ...service.supervisor import Child, wait_until
from .auth import InvalidToken, token_from_metadata
from .gateway import Gateway, GatewayError
from .processes import fetch_metrics

LUA_DIR = Path(__file__).parent
TEMPLATE = """
load_module {modules}/ndk_http_module.so;
load_module {modules}/ngx_http_lua_module.so;
daemon off;
master_process on;
{user}
worker_processes {workers};
pid {run}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {run}/body;
  proxy_temp_path {run}/proxy;
  fastcgi_temp_path {run}/fastcgi;
  uwsgi_temp_path {run}/uwsgi;
  scgi_temp_path {run}/scgi;
  lua_package_path "{lua}/?.lua;;";
  lua_shared_dict gpulab_decisions 16m;
  lua_shared_dict gpulab_metrics 1m;
  init_by_lua_block {{
    require("nginx_gateway").configure({{ttl = {ttl}, replicas = {{{replica_list}}},
      health_interval = {health_interval}, authorize_socket = "{authorize_socket}", read_model = {read_model},
      key = os.getenv("GPULAB_NGINX_TRITON_KEY") or "", key_header = "{key_header}",
      http_key_header = "{http_key_header}", {status_tables}}})
  }}
  init_worker_by_lua_block {{ require("nginx_gateway").watch_replicas() }}
  upstream gpulab_triton {{
    server 0.0.0.1;  # a placeholder: the Lua balancer picks the replica
    balancer_by_lua_block {{ require("nginx_gateway").balance() }}
    keepalive 64;
    keepalive_requests 1000000;
    keepalive_timeout 1h;
  }}
  upstream gpulab_python {{
    server {python};
    keepalive 16;
    keepalive_requests 1000000;
  }}
  server {{
    listen {address} http2{ssl};
{tls}
    keepalive_requests 1000000;
    keepalive_timeout 1h;
    client_max_body_size {max_bytes};
    client_body_buffer_size 2m;
    grpc_read_timeout 1h;
    grpc_send_timeout 1h;
    set $gpulab_model "";
    set $gpulab_protocol grpc;
    error_page 413 = @too_large;
    location = /inference.GRPCInferenceService/ModelInfer {{
      access_by_lua_block {{ require("nginx_gateway").access() }}
      log_by_lua_block {{ require("nginx_gateway").log() }}
      error_page 502 504 = @unavailable;
      error_page 413 = @too_large;  # error_page is inherited only by locations that set none
      grpc_pass grpc://gpulab_triton;
    }}
    location / {{
      grpc_pass grpc://gpulab_python;
    }}
    location @python {{
      grpc_pass grpc://gpulab_python;
    }}
    location @unavailable {{
      content_by_lua_block {{ require("nginx_gateway").unavailable() }}
      log_by_lua_block {{ require("nginx_gateway").log() }}
    }}
    location @too_large {{
      content_by_lua_block {{ require("nginx_gateway").too_large({max_bytes}) }}
    }}
  }}
{rest}
  server {{
    listen unix:{metrics_socket};
    location = /metrics {{
      content_by_lua_block {{ require("nginx_gateway").metrics() }}
    }}
  }}
}}
"""
REST = """
  upstream gpulab_triton_http {{
    server 0.0.0.1;  # a placeholder: the Lua balancer picks the replica's HTTP endpoint
    balancer_by_lua_block {{ require("nginx_gateway").balance(true) }}
    keepalive 64;
    keepalive_requests 1000000;
    keepalive_timeout 1h;
  }}
  upstream gpulab_python_rest {{
    server {python_rest};
    keepalive 16;
    keepalive_requests 1000000;
  }}
  server {{
    listen {rest_address}{ssl};
{tls}
    keepalive_requests 1000000;
    keepalive_timeout 1h;
    client_max_body_size {max_bytes};
    client_body_buffer_size 2m;
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_buffering off;
    proxy_read_timeout 1h;
    proxy_send_timeout 1h;
    set $gpulab_model "";
    set $gpulab_protocol rest;
    set $gpulab_authorization "";
    error_page 413 = @too_large;
    error_page 405 = @not_allowed;
{infer}
    location / {{
      proxy_pass http://gpulab_python_rest;
    }}
    location @python {{
      proxy_pass http://gpulab_python_rest;
    }}
    location @triton_500 {{  # a Triton 500 on infer: the Python gateway answers (400 where Triton could not parse)
      proxy_set_header Connection "";
      proxy_set_header Authorization $gpulab_authorization;
      proxy_set_header {key_header} "";
      proxy_pass http://gpulab_python_rest;
    }}
    location @unavailable {{
      content_by_lua_block {{ require("nginx_gateway").unavailable() }}
      log_by_lua_block {{ require("nginx_gateway").log() }}
    }}
    location @too_large {{
      content_by_lua_block {{ require("nginx_gateway").too_large({max_bytes}) }}
    }}
    location @not_allowed {{
      content_by_lua_block {{ require("nginx_gateway").not_allowed() }}
    }}
  }}
"""
REST_INFER = """
    location ~ ^/v2/models/(?<gpulab_path_model>[^/]+)(?:/versions/[0-9]+)?/infer$ {{
      access_by_lua_block {{ require("nginx_gateway").access() }}
      log_by_lua_block {{ require("nginx_gateway").log() }}
      error_page 502 504 = @unavailable;
      error_page 413 = @too_large;
      proxy_intercept_errors on;
      error_page 500 = @triton_500;
      proxy_pass http://gpulab_triton_http;
    }}
"""
PR_SET_PDEATHSIG = 1


class LoopbackHandler(web.RequestHandler):
    """Base of what nginx asks the Python gateway on its authorize socket."""

    def initialize(self, gateway: Gateway):
        self.gateway = gateway


class ReplicasHandler(LoopbackHandler):
    """``GET /replicas``: one line per replica, ``<address> up|down <status>`` (tab-separated), from the Python
    gateway's health checks and breakers."""

    def get(self):
        self.set_header("Content-Type", "text/plain")
        self.finish(
            "".join(
                f"{r.address}\t{'up' if r.available else 'down'}\t{r.status()}\n" for r in self.gateway.pool.replicas
            )
        )


class AuthorizeHandler(LoopbackHandler):
    """``GET /authorize[?model=M]`` with the caller's ``Authorization``: 200 if the token may call models (M, when
    allow-lists need it); else 401/403 (or 503 when the hub cannot answer) with ``Grpc-Status`` and the message as
    body. ``Cache-Seconds`` says how long nginx may keep the decision: what is left of the token's entry in the
    gateway's cache (a malformed header: the whole ``token_cache_seconds``), so that the two caches together
    never trust a revoked token longer than one."""

    async def get(self):
        header = self.request.headers.get("Authorization")
        metadata = [("authorization", header)] if header is not None else []
        try:
            who = await self.gateway.authenticate(metadata)
            self.gateway.authorize(who, INFER, self.get_argument("model", None))
        except GatewayError as e:
            self.set_status(http_status(e.code, 503))
            self.set_header("Grpc-Status", str(e.code.value[0]))
            self.set_header("Cache-Seconds", self._cache_seconds(metadata))
            self.finish(e.message)
            return
        self.set_header("Cache-Seconds", self._cache_seconds(metadata))
        self.finish("ok")

    def _cache_seconds(self, metadata) -> str:
        try:
            fresh = self.gateway.auth.trusted_for(token_from_metadata(metadata))
        except InvalidToken:
            fresh = self.gateway.auth.ttl  # a malformed header: decided without the hub
        return f"{fresh:.3f}"


def _resolve(address: str, setting: str) -> tuple[str, int]:
    """IP and port of ``address``: nginx's Lua balancer takes IP addresses (or ``unix:<path>``, port 0) only, so
    names are resolved once, when nginx's config is written."""
    if address.startswith("unix:"):
        return _quotable(address, setting), 0
    host, port = address.rsplit(":", 1)
    try:
        return socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)[0][4][0], int(port)
    except (OSError, ValueError) as e:
        raise ConfigError(f"InferenceGateway.{setting}: cannot resolve {address}: {e}") from None


def _quotable(value: str, setting: str) -> str:
    """``value``, refused where a double-quoted string in nginx's config (and Lua) cannot hold it as it is."""
    if any(c in value for c in '"\\') or not value.isprintable():
        raise ConfigError(f"InferenceGateway.{setting}: {value!r}: a path nginx's config cannot hold")
    return value


def _lua_replica(address: str, http_address: str) -> str:
    """``{name = "host:port", ip = ..., port = ...[, http_ip = ..., http_port = ...]}``"""
    ip, port = _resolve(address, "replicas")
    http = ""
    if http_address:
        http_ip, http_port = _resolve(http_address, "http_replicas")
        http = f', http_ip = "{http_ip}", http_port = {http_port}'
    return f'{{name = "{address}", ip = "{ip}", port = {port}{http}}}'


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def serve_authorize(gateway: Gateway, path: Path) -> None:
    """Serve :class:`AuthorizeHandler` and :class:`ReplicasHandler` on the unix socket ``path``."""
    handlers = [
        (r"/authorize", AuthorizeHandler, {"gateway": gateway}),
        (r"/replicas", ReplicasHandler, {"gateway": gateway}),
    ]
    HTTPServer(web.Application(handlers)).add_sockets([bind_unix_socket(str(path))])


class NginxDataPlane:
    """nginx on the gateway's public address in front of the Python gateway.

    Every hop between them is a unix socket in nginx's run directory (private: 0700 of the service's account),
    which the Python side listens on: ``python_address`` (its gRPC), ``python_rest`` (its REST, with a REST
    port) and ``authorize_socket`` (:func:`serve_authorize`); nginx's counters are on ``metrics_socket``. So
    no other local account reaches the Python gateway behind nginx, its authorize endpoint or the counters."""

    def __init__(self, conf):
        self.conf = conf
        self.run_dir = Path(tempfile.mkdtemp(prefix="gpulab-nginx-"))
        _quotable(str(self.run_dir), "data_plane (nginx's run directory, in $TMPDIR)")
        self.python_address = f"unix:{socket_path(self.run_dir / 'python.sock', 'data_plane')}"
        self.python_rest = f"unix:{self.run_dir / 'python-rest.sock'}" if conf.rest_address else None
        self.authorize_socket = self.run_dir / "authorize.sock"
        self.metrics_socket = self.run_dir / "metrics.sock"

    def config(self) -> str:
        conf = self.conf
        tls = ""
        if conf.tls_cert_file:
            conf.server_credentials()  # checks the files and the key's mode
            tls = (
                f"    ssl_certificate {Path(conf.tls_cert_file).expanduser()};\n"
                f"    ssl_certificate_key {Path(conf.tls_key_file).expanduser()};"
            )
        http_replicas = conf.http_replicas or [""] * len(conf.replicas)
        rest = (
            REST.format(
                python_rest=self.python_rest,
                rest_address=conf.rest_address,
                ssl=" ssl" if tls else "",
                tls=tls,
                max_bytes=conf.max_request_bytes,
                key_header=conf.restricted_header,
                infer=REST_INFER.format() if conf.http_replicas else "",
            )
            if self.python_rest
            else ""
        )
        return TEMPLATE.format(
            modules=conf.nginx_modules_dir,
            workers=conf.processes,
            run=self.run_dir,
            lua=LUA_DIR,
            ttl=conf.token_cache_seconds,
            replica_list=", ".join(map(_lua_replica, conf.replicas, http_replicas)),
            health_interval=conf.health_interval,
            key_header=GRPC_KEY_PREFIX + conf.restricted_header,
            http_key_header=conf.restricted_header,
            rest=rest,
            status_tables=lua_tables(),
            python=self.python_address,
            address=conf.address,
            ssl=" ssl" if tls else "",
            tls=tls,
            max_bytes=conf.max_request_bytes,
            authorize_socket=self.authorize_socket,
            metrics_socket=self.metrics_socket,
            read_model=str(bool(conf.model_allow)).lower(),
            # started by root, nginx would run its workers as nobody, who cannot use the private run directory
            user=f"user {pwd.getpwuid(os.geteuid()).pw_name};" if os.geteuid() == 0 else "",
        )

    def _command(self) -> list[str]:
        binary = shutil.which(self.conf.nginx_path)
        if not binary:
            raise ConfigError(
                f"InferenceGateway.nginx_path: {self.conf.nginx_path} not found (install nginx and "
                "libnginx-mod-http-lua, or set InferenceGateway.data_plane = 'python')"
            )
        return [binary, "-p", str(self.run_dir), "-c", str(self.run_dir / "nginx.conf"), "-e", "stderr"]

    def _env(self) -> dict:
        return {**os.environ, "GPULAB_NGINX_TRITON_KEY": self.conf.restricted_key}

    def prepare(self) -> None:
        """Write the config and check it (``nginx -t``): a :class:`ConfigError` naming the problem."""
        config = self.run_dir / "nginx.conf"
        config.write_text(self.config())
        config.chmod(0o600)
        check = subprocess.run(
            [*self._command(), "-t", "-q"], env=self._env(), capture_output=True, text=True, check=False
        )
        if check.returncode != 0:
            lines = [line for line in check.stderr.splitlines() if "[emerg]" in line] or check.stderr.splitlines()
            reason = (
                re.sub(r"^\d+#\d+: ", "", lines[0].split("[emerg]")[-1].strip())
                if lines
                else (f"exit status {check.returncode}")
            )
            self.remove()
            raise ConfigError(f"InferenceGateway.data_plane: nginx cannot start: {reason}")

    def child(self, timeout: float = 15.0) -> Child:
        """nginx for a :class:`Supervisor` (after :meth:`prepare`): ready once it accepts connections on the
        gateway's address; stopped with SIGQUIT (it finishes the calls in flight), its process group killed
        after, so that workers a killed master leaves behind go too."""

        async def accepts() -> bool:
            host, port = self.conf.address.rsplit(":", 1)
            try:
                _, writer = await asyncio.open_connection(host.strip("[]"), int(port))
            except OSError:
                return False
            writer.close()
            return True

        return Child(
            "nginx",
            self._spawn,
            lambda proc: wait_until(accepts, proc, timeout, "nginx", interval=0.05),
            stop_signal=signal.SIGQUIT,
            group=True,
        )

    def _spawn(self) -> subprocess.Popen:
        self.metrics_socket.unlink(missing_ok=True)  # an nginx that exited leaves its socket behind
        # its own process group (so workers a killed master leaves behind can be stopped), and SIGTERM when this
        # process dies: spawned from the event loop's (main) thread, which lives as long as the process
        return subprocess.Popen(
            self._command(),
            env=self._env(),
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )

    def remove(self) -> None:
        """Remove the run directory (nginx stopped)."""
        shutil.rmtree(self.run_dir, ignore_errors=True)

    async def metrics(self) -> dict[str, str]:
        """``{"nginx": its metrics text}``, or {} when nginx does not answer."""
        text = await fetch_metrics(self.metrics_socket)
        return {"nginx": text} if text is not None else {}
