"""``python -m gpulab.services.infer``: the hub-managed inference gateway ``gpulab-infer``.

Environment as for any hub-managed service (``JUPYTERHUB_API_URL``, where callers' tokens are looked
up with the tokens themselves; ``JUPYTERHUB_SERVICE_URL``, where ``/metrics`` and the deploy API
``<prefix>api/v1/models`` are served), ``GPULAB_INFER_ADDRESS`` (gRPC listen address),
``GPULAB_INFER_REST_ADDRESS`` (KServe v2 REST listen address), ``GPULAB_TRITON_REPLICAS`` and
``GPULAB_TRITON_HTTP_REPLICAS`` (their gRPC and HTTP endpoints), ``GPULAB_TRITON_KEY`` (the restricted-protocol key
of Tritons on TCP ports; the embedded Triton, on unix sockets, needs none),
``GPULAB_MODEL_REPOSITORY`` (the embedded Triton's model repository) and ``GPULAB_MLFLOW_URL`` (MLflow's
internal URL), each overridden by ``c.InferenceGateway`` in ``gpulab_config.py``.
"""

import asyncio
import os
import shutil
import signal
import socket
import ssl
from pathlib import Path
from urllib.parse import urlsplit

import grpc
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from tornado import web
from tornado.httpserver import HTTPServer
from traitlets import Bool, Dict, Enum, Float, Integer, List, Unicode, default
from traitlets.config import Configurable

from ...config import load_config
from ...errors import ConfigError
from ...inference.triton import BACKENDS, GRPC_KEY_PREFIX
from ...secrets import read_secret_file
from ...tracing import setup_tracing
from . import api, rest
from .auth import HubTokenAuth
from .gateway import Gateway, GatewayError
from .models import Deployments
from .nginx import NginxDataPlane, serve_authorize
from .processes import METRICS_FD_ENV, Workers, merge_metrics, parent_gone, process_index
from .records import ModelRecords
from .replicas import ReplicaPool


class InferenceGateway(Configurable):
    """``c.InferenceGateway.*``: where the gateway listens and which Triton replicas it serves."""

    address = Unicode(help="gRPC listen address host:port (default $GPULAB_INFER_ADDRESS).").tag(config=True)
    replicas = List(Unicode(), help="Triton gRPC endpoints, host:port or unix:<path> (default: "
                    "$GPULAB_TRITON_REPLICAS, comma-separated).").tag(config=True)
    rest_address = Unicode(help="KServe v2 REST listen address host:port (default $GPULAB_INFER_REST_ADDRESS; "
                           "empty: no REST port). Needs http_replicas.").tag(config=True)
    http_replicas = List(Unicode(), help="The replicas' Triton HTTP endpoints, host:port or unix:<path>, in the "
                         "order of replicas "
                         "(default: $GPULAB_TRITON_HTTP_REPLICAS, comma-separated).").tag(config=True)
    restricted_header = Unicode("gpulab-triton-key", help="Triton's restricted-protocol header (without Triton's "
                                "'triton-grpc-protocol-' prefix), as TritonServer.restricted_header.").tag(config=True)
    restricted_key = Unicode(help="Its secret value (default $GPULAB_TRITON_KEY), sent to every replica: needed by "
                             "Tritons on TCP ports, which any local account can reach.").tag(config=True)
    model_allow = Dict(value_trait=List(Unicode()), help="Model -> users and 'group:<name>' entries allowed to call "
                       "it; models not listed are open to every holder of custom:gpulab:infer.").tag(config=True)
    max_request_bytes = Integer(64 * 1024 * 1024, help="Larger requests fail with RESOURCE_EXHAUSTED.").tag(
        config=True)
    token_cache_seconds = Float(10.0, help="How long a token lookup is trusted: a revoked token stops working on "
                                "both data planes within this.").tag(config=True)
    health_interval = Float(2.0, help="Seconds between ServerLive checks of each replica.").tag(config=True)
    failure_threshold = Integer(3, help="Consecutive failures that open a replica's circuit.").tag(config=True)
    recovery_timeout = Float(5.0, help="Seconds an open circuit waits before a probe.").tag(config=True)
    model_repository = Unicode(help="Model repository deploys write to, shared with every replica (default "
                               "$GPULAB_MODEL_REPOSITORY: the embedded Triton's; unset: deploying is refused).").tag(
        config=True)
    mlflow_url = Unicode(help="MLflow tracking URL models are fetched from (default $GPULAB_MLFLOW_URL).").tag(
        config=True)
    mlflow_token = Unicode(help="MLFLOW_TRACKING_TOKEN sent to mlflow_url (default: this service's hub token, "
                           "where mlflow_url is the platform's MLflow, which takes hub tokens).").tag(config=True)
    default_backend = Enum(list(BACKENDS), "python-onnx", help="Backend of deploys that name none: python-onnx "
                           "(CPU, Python backend + onnxruntime), onnxruntime or tensorrt (GPU).").tag(config=True)
    allow_pickle = Bool(False, help="Deploy pickled models (scikit-learn pickle/cloudpickle, PyTorch): loading "
                        "one runs code from it, in the converter process.").tag(config=True)
    deploy_timeout = Float(600.0, help="Seconds a conversion, and a load on the replicas, may take.").tag(
        config=True)
    tls_cert_file = Unicode(help="PEM certificate chain of the gRPC port; with tls_key_file the gateway serves "
                            "TLS only (hub tokens then never cross the network in clear).").tag(config=True)
    tls_key_file = Unicode(help="PEM private key of tls_cert_file (a file only its owner may read).").tag(config=True)
    tls_ca_file = Unicode(help="PEM bundle clients trust for the gateway (GPULAB_INFER_TLS_CA in user servers); "
                          "default tls_cert_file, for a self-signed certificate.").tag(config=True)
    data_plane = Enum(["auto", "python", "nginx"], "auto", help="What serves the gRPC port. python: the gateway "
                      "itself (grpcio; about 0.5 ms and 0.4-0.7 ms of CPU per call). nginx: nginx with the lua "
                      "module (Debian: nginx, libnginx-mod-http-lua) proxies ModelInfer to Triton itself, after the "
                      "gateway's own token and model checks (cached for token_cache_seconds), and passes every "
                      "other RPC to the Python gateway; breakers become nginx's failure marking (failure_threshold "
                      "failures, then recovery_timeout s) and health checks apply to the Python side only. auto: "
                      "nginx where nginx_path and the lua module in nginx_modules_dir are found, else python.").tag(
        config=True)
    processes = Integer(1, min=1, help="Processes serving the gRPC port. nginx data plane: nginx workers. python: "
                        "gateway processes sharing the port with SO_REUSEPORT (each connection goes to one of them; "
                        "each has its own health checks, breakers and token cache), which lets any process of the "
                        "gateway's OS user bind the port too: use more than 1 only where user code does not run as "
                        "that user (container spawners, other hosts). /metrics labels samples by process.").tag(
        config=True)
    nginx_path = Unicode("nginx", help="The nginx binary of the nginx data plane.").tag(config=True)
    nginx_modules_dir = Unicode("/usr/lib/nginx/modules", help="Where nginx's dynamic modules are "
                                "(ndk_http_module.so, ngx_http_lua_module.so).").tag(config=True)

    def plane(self) -> str:
        """The data plane to run: data_plane, with auto resolved."""
        if self.data_plane != "auto":
            return self.data_plane
        found = shutil.which(self.nginx_path) and (Path(self.nginx_modules_dir) / "ngx_http_lua_module.so").exists()
        return "nginx" if found else "python"

    def check_http_replicas(self) -> None:
        if self.http_replicas and len(self.http_replicas) != len(self.replicas):
            raise ConfigError(f"InferenceGateway.http_replicas: {len(self.http_replicas)} HTTP endpoints for "
                              f"{len(self.replicas)} replicas (give one per replica, in the same order)")

    def ssl_context(self) -> ssl.SSLContext | None:
        """TLS for the REST port (the gRPC port's certificate and key), or None to serve plaintext."""
        if not self.server_credentials():  # checks both files, and that only its owner may read the key
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(Path(self.tls_cert_file).expanduser(), Path(self.tls_key_file).expanduser())
        return context

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """TLS credentials for the gRPC port, or None to serve plaintext (no certificate configured)."""
        if not (self.tls_cert_file or self.tls_key_file):
            return None
        if not (self.tls_cert_file and self.tls_key_file):
            missing = "tls_key_file" if self.tls_cert_file else "tls_cert_file"
            raise ConfigError(f"InferenceGateway.{missing}: TLS needs both tls_cert_file and tls_key_file")
        try:
            chain = Path(self.tls_cert_file).expanduser().read_bytes()
        except OSError as e:
            raise ConfigError(f"InferenceGateway.tls_cert_file: cannot read {self.tls_cert_file}: {e}") from None
        key = read_secret_file(self.tls_key_file, "InferenceGateway.tls_key_file").reveal()
        return grpc.ssl_server_credentials([((key + "\n").encode(), chain)])

    @default("address")
    def _default_address(self):
        return os.environ.get("GPULAB_INFER_ADDRESS", "127.0.0.1:8101")

    @default("rest_address")
    def _default_rest_address(self):
        return os.environ.get("GPULAB_INFER_REST_ADDRESS", "")

    @default("replicas")
    def _default_replicas(self):
        return [r for r in os.environ.get("GPULAB_TRITON_REPLICAS", "").split(",") if r]

    @default("http_replicas")
    def _default_http_replicas(self):
        return [r for r in os.environ.get("GPULAB_TRITON_HTTP_REPLICAS", "").split(",") if r]

    @default("restricted_key")
    def _default_key(self):
        return os.environ.get("GPULAB_TRITON_KEY", "")

    @default("model_repository")
    def _default_repository(self):
        return os.environ.get("GPULAB_MODEL_REPOSITORY", "")

    @default("mlflow_url")
    def _default_mlflow(self):
        return os.environ.get("GPULAB_MLFLOW_URL", "")

    @default("mlflow_token")
    def _default_mlflow_token(self):
        return os.environ.get("JUPYTERHUB_API_TOKEN", "") if self.platform_mlflow else ""

    @property
    def platform_mlflow(self) -> bool:
        """Whether models come from the platform's MLflow, which takes hub tokens and knows gpulab's users."""
        return bool(self.mlflow_url) and self.mlflow_url == os.environ.get("GPULAB_MLFLOW_URL")


class MetricsHandler(web.RequestHandler):
    """This process's metrics, merged with those of the other sources (extra processes, nginx) by process.

    On the service's address they need a hub token with ``read:metrics``, as gpulab-jobs' do; an extra
    process's copy on its private socket (``gateway`` None), read only by the first process, takes none.
    """

    def initialize(self, gateway: Gateway | None = None):
        self.gateway = gateway

    async def get(self):
        if self.gateway is not None and (refusal := await self._refusal()):
            self.set_status(refusal[0])
            self.finish(refusal[1] + "\n")
            return
        own = generate_latest(self.settings["registry"])
        sources = self.settings.get("sources", ())
        if sources:
            texts = {"0": own.decode()}
            for source in sources:
                texts.update(await source())
            own = merge_metrics(texts)
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(own)

    async def _refusal(self) -> tuple[int, str] | None:
        """(status, message) unless the caller's token has ``read:metrics``."""
        header = self.request.headers.get("Authorization")
        if not header:
            return 401, "send 'Authorization: token <hub token>' with the scope read:metrics"
        try:
            who = await self.gateway.authenticate([("authorization", header)])
        except GatewayError as e:
            return api.HTTP_STATUS.get(e.code, (503,))[0], e.message
        if "read:metrics" not in who.scopes:
            return 403, f"{who.name} lacks the scope read:metrics"
        return None


def build(cfg, api_url: str) -> tuple[InferenceGateway, Gateway]:
    """The configured gateway (not yet serving)."""
    conf = InferenceGateway(config=cfg)
    if not conf.replicas:
        raise ConfigError("InferenceGateway.replicas: no Triton replica configured")
    conf.check_http_replicas()
    metadata = ((GRPC_KEY_PREFIX + conf.restricted_header, conf.restricted_key),) if conf.restricted_key else ()
    pool = ReplicaPool(conf.replicas, metadata, conf.failure_threshold, conf.recovery_timeout, conf.health_interval,
                       conf.http_replicas, {conf.restricted_header: conf.restricted_key} if conf.restricted_key else {})
    auth = HubTokenAuth(api_url, ttl=conf.token_cache_seconds)
    trace_all = bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
    records = ModelRecords(Path(conf.model_repository) if conf.model_repository else None)
    return conf, Gateway(pool, auth, conf.model_allow, trace_all=trace_all, records=records)


async def main() -> None:
    setup_tracing("gpulab-infer")
    conf, gateway = build(load_config(), os.environ["JUPYTERHUB_API_URL"])
    index = process_index()
    # with nginx in front, the Python gateway serves plaintext on unix sockets only nginx reaches, and nginx holds
    # the address (and TLS)
    plane = NginxDataPlane(conf) if conf.plane() == "nginx" else None
    nginx = plane is not None
    address = plane.python_address if nginx else conf.address
    credentials = None if nginx else conf.server_credentials()
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", conf.max_request_bytes),
                                      ("grpc.max_send_message_length", -1),
                                      ("grpc.so_reuseport", int(conf.processes > 1 and not nginx))])
    server.add_generic_rpc_handlers((gateway.handler(),))
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if not port:
        raise ConfigError(f"InferenceGateway.address: cannot listen on {address}")
    await server.start()
    if conf.rest_address:  # with nginx in front, the Python gateway serves the REST that nginx passes on
        try:
            rest.serve(gateway, plane.python_rest if nginx else conf.rest_address, conf.max_request_bytes,
                       None if nginx else conf.ssl_context(), reuse_port=conf.processes > 1 and not nginx)
        except OSError as e:
            raise ConfigError(f"InferenceGateway.rest_address: cannot listen on {conf.rest_address}: {e}") from None
    gateway.pool.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tasks, parts = [], []  # parts: the extra processes or nginx, each with supervise(), stop() and metrics()
    if index:  # an extra process: gRPC, and metrics for the first process to merge
        app = web.Application([(r"/metrics", MetricsHandler)], registry=gateway.metrics.registry)
        HTTPServer(app).add_sockets([socket.socket(fileno=int(os.environ[METRICS_FD_ENV]))])
        tasks.append(asyncio.create_task(parent_gone()))
        tasks[-1].add_done_callback(lambda _: stop.set())
    else:
        if nginx:
            serve_authorize(gateway, plane.authorize_socket)
            plane.start()  # in the main thread: nginx is told to stop when that thread, so this process, ends
            parts.append(plane)
        elif conf.processes > 1:
            parts.append(Workers(conf.processes - 1))
            parts[-1].start()
        tasks += [asyncio.create_task(part.supervise()) for part in parts]
        serve_http(conf, gateway, [part.metrics for part in parts])
    tls = " (TLS)" if conf.tls_cert_file else ""
    if nginx:
        which = f" (nginx data plane, {conf.processes} worker{'s' * (conf.processes > 1)}; Python on {address})"
    else:
        which = f" (process {index} of {conf.processes})" if conf.processes > 1 else ""
    rest_note = f" and KServe v2 REST{tls} on {conf.rest_address}" if conf.rest_address else ""
    print(f"gpulab-infer: serving gRPC{tls} on {conf.address}{rest_note} for {', '.join(conf.replicas)}{which}",
          flush=True)

    await stop.wait()
    for task in tasks:
        task.cancel()
    await asyncio.gather(server.stop(grace=2), *(part.stop() for part in parts))
    await gateway.pool.close()


def serve_http(conf: InferenceGateway, gateway: Gateway, sources: list) -> None:
    """The first process's HTTP side at $JUPYTERHUB_SERVICE_URL: /metrics (merged with ``sources``) and the
    deploy API."""
    service_url = os.environ.get("JUPYTERHUB_SERVICE_URL")
    if not service_url:
        return
    prefix = os.environ.get("JUPYTERHUB_SERVICE_PREFIX", "/services/gpulab-infer/")
    deployments = Deployments(conf.model_repository, gateway.pool, conf.mlflow_url, conf.allow_pickle,
                              conf.deploy_timeout, mlflow_token=conf.mlflow_token,
                              act_for_caller=conf.platform_mlflow)
    routes = api.handlers(prefix, gateway=gateway, deployments=deployments, default_backend=conf.default_backend)
    metrics = {"gateway": gateway}
    app = web.Application([(r"/metrics", MetricsHandler, metrics), (prefix + "metrics", MetricsHandler, metrics),
                           *routes],
                          registry=gateway.metrics.registry, sources=sources)
    url = urlsplit(service_url)
    app.listen(url.port, url.hostname or "127.0.0.1")
