"""``python -m gpulab.services.infer``: the hub-managed inference gateway ``gpulab-infer``.

Environment as for any hub-managed service (``JUPYTERHUB_API_URL``, where callers' tokens are looked
up with the tokens themselves; ``JUPYTERHUB_SERVICE_URL``, where ``/metrics`` and the deploy API
``<prefix>api/v1/models`` are served); settings from ``c.InferenceGateway`` (:mod:`.config`), where the hub
fills in what the admin left unset: the gRPC and REST addresses, the embedded Triton's sockets and model
repository (or the key of the admin's Tritons on TCP ports) and the platform MLflow's internal URL.
"""

import asyncio
import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

import grpc
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from tornado import web
from tornado.httpserver import HTTPServer

from ...errors import ConfigError
from ...inference.triton import GRPC_KEY_PREFIX
from ...service.app import HubEnvironment, ServiceApp
from ...service.errors import http_status
from ...service.supervisor import ChildFailed, Supervisor
from . import api, rest
from .auth import HubTokenAuth
from .config import InferenceGateway
from .deployments import Deployments
from .gateway import Gateway, GatewayError
from .nginx import NginxDataPlane, serve_authorize
from .processes import METRICS_FD_ENV, Workers, merge_metrics, parent_gone, process_index
from .records import ModelRecords
from .replicas import ReplicaPool

log = logging.getLogger("gpulab.infer")


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
            return http_status(e.code, 503), e.message
        if "read:metrics" not in who.scopes:
            return 403, f"{who.name} lacks the scope read:metrics"
        return None


def build(conf: InferenceGateway, api_url: str) -> Gateway:
    """The configured gateway (not yet serving)."""
    if not conf.replicas:
        raise ConfigError("InferenceGateway.replicas: no Triton replica configured")
    conf.check_http_replicas()
    metadata = ((GRPC_KEY_PREFIX + conf.restricted_header, conf.restricted_key),) if conf.restricted_key else ()
    pool = ReplicaPool(
        conf.replicas,
        metadata,
        conf.failure_threshold,
        conf.recovery_timeout,
        conf.health_interval,
        conf.http_replicas,
        {conf.restricted_header: conf.restricted_key} if conf.restricted_key else {},
    )
    auth = HubTokenAuth(api_url, ttl=conf.token_cache_seconds)
    trace_all = bool(
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )
    records = ModelRecords(Path(conf.model_repository) if conf.model_repository else None)
    return Gateway(pool, auth, conf.model_allow, trace_all=trace_all, records=records)


class InferApp(ServiceApp):
    """``python -m gpulab.services.infer``: one process of the gateway (the first, which the hub starts, or an
    extra one the first starts)."""

    name = "gpulab-infer"
    description = "The inference gateway in front of Triton."
    classes = [InferenceGateway]

    def initialize(self, argv=None) -> None:
        super().initialize(argv)
        self.hub.require("api_url")
        self.conf = InferenceGateway(parent=self)
        if self.conf.platform_mlflow and not self.conf.mlflow_token:  # it takes hub tokens: this service's own
            self.conf.mlflow_token = self.hub.api_token

    async def serve(self, stopping: asyncio.Event) -> None:
        await serve(self.conf, build(self.conf, self.hub.api_url), self.hub, stopping)


async def serve(conf: InferenceGateway, gateway: Gateway, hub: HubEnvironment, stop: asyncio.Event) -> None:
    """Serve gRPC (and REST) until ``stop`` is set; the first process also the HTTP API (at ``hub``'s service
    URL), nginx or the extra processes."""
    index = process_index()
    # with nginx in front, the Python gateway serves plaintext on unix sockets only nginx reaches, and nginx holds
    # the address (and TLS)
    plane = NginxDataPlane(conf) if conf.plane() == "nginx" else None
    nginx = plane is not None
    address = plane.python_address if nginx else conf.address
    credentials = None if nginx else conf.server_credentials()
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", conf.max_request_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", int(conf.processes > 1 and not nginx)),
        ]
    )
    server.add_generic_rpc_handlers((gateway.handler(),))
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if not port:
        raise ConfigError(f"InferenceGateway.address: cannot listen on {address}")
    await server.start()
    if conf.rest_address:  # with nginx in front, the Python gateway serves the REST that nginx passes on
        try:
            rest.serve(
                gateway,
                plane.python_rest if nginx else conf.rest_address,
                conf.max_request_bytes,
                None if nginx else conf.ssl_context(),
                reuse_port=conf.processes > 1 and not nginx,
            )
        except OSError as e:
            raise ConfigError(f"InferenceGateway.rest_address: cannot listen on {conf.rest_address}: {e}") from None
    gateway.pool.start()
    tasks, sources, cleanups = [], [], []  # sources: metrics merged into /metrics
    supervisor = Supervisor(log)
    if index:  # an extra process: gRPC, and metrics for the first process to merge
        app = web.Application([(r"/metrics", MetricsHandler)], registry=gateway.metrics.registry)
        HTTPServer(app).add_sockets([socket.socket(fileno=int(os.environ[METRICS_FD_ENV]))])
        tasks.append(asyncio.create_task(parent_gone()))
        tasks[-1].add_done_callback(lambda _: stop.set())
    else:
        if nginx:
            serve_authorize(gateway, plane.authorize_socket)
            plane.prepare()
            cleanups.append(plane.remove)
            try:
                await supervisor.start(plane.child())
            except ChildFailed as e:
                raise ConfigError(f"InferenceGateway.data_plane: {e} on {conf.address}") from None
            sources.append(plane.metrics)
        elif conf.processes > 1:
            workers = Workers(conf.processes - 1)
            cleanups.append(workers.remove)
            for child in workers.children:
                await supervisor.start(child)
            sources.append(workers.metrics)
        tasks.append(asyncio.create_task(supervisor.run()))
        serve_http(conf, gateway, sources, hub)
    tls = " (TLS)" if conf.tls_cert_file else ""
    if nginx:
        which = f" (nginx data plane, {conf.processes} worker{'s' * (conf.processes > 1)}; Python on {address})"
    else:
        which = f" (process {index} of {conf.processes})" if conf.processes > 1 else ""
    rest_note = f" and KServe v2 REST{tls} on {conf.rest_address}" if conf.rest_address else ""
    log.info("serving gRPC%s on %s%s for %s%s", tls, conf.address, rest_note, ", ".join(conf.replicas), which)

    await stop.wait()
    for task in tasks:
        task.cancel()
    await asyncio.gather(server.stop(grace=2), supervisor.stop(timeout=5))
    for cleanup in cleanups:
        cleanup()
    await gateway.pool.close()


def serve_http(conf: InferenceGateway, gateway: Gateway, sources: list, hub: HubEnvironment) -> None:
    """The first process's HTTP side at the hub's service URL (none: not served): /metrics (merged with
    ``sources``) and the deploy API."""
    if not hub.service_url:
        return
    prefix = hub.prefix
    deployments = Deployments(
        conf.model_repository,
        gateway.pool,
        conf.mlflow_url,
        conf.allow_pickle,
        conf.deploy_timeout,
        mlflow_token=conf.mlflow_token,
        act_for_caller=conf.platform_mlflow,
    )
    routes = api.handlers(prefix, gateway=gateway, deployments=deployments, default_backend=conf.default_backend)
    metrics = {"gateway": gateway}
    app = web.Application(
        [(r"/metrics", MetricsHandler, metrics), (prefix + "metrics", MetricsHandler, metrics), *routes],
        registry=gateway.metrics.registry,
        sources=sources,
    )
    url = urlsplit(hub.service_url)
    app.listen(url.port, url.hostname or "127.0.0.1")
