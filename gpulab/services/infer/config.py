"""``c.InferenceGateway``: the settings of ``gpulab-infer``, a module of their own so that the hub and
``gpulab config`` read (and check) them without the gateway's processes.

The hub fills in, for the service it starts, the ones the admin left unset: addresses on free ports, the embedded
Triton's sockets and repository, the platform MLflow's URL (:func:`gpulab.hub_config.services.inference_services`).
"""

import shutil
import ssl
from pathlib import Path

import grpc
from traitlets import Bool, Dict, Enum, Float, Integer, List, Unicode
from traitlets.config import Configurable

from ...errors import ConfigError
from ...inference.triton import BACKENDS
from ...secrets import read_secret_file


class InferenceGateway(Configurable):
    """``c.InferenceGateway.*``: where the gateway listens and which Triton replicas it serves."""

    address = Unicode("127.0.0.1:8101", help="gRPC listen address host:port (gpulab up: a free port).").tag(config=True)
    replicas = List(
        Unicode(),
        help="Triton gRPC endpoints, host:port or unix:<path> (gpulab up: the embedded Triton's, unless set).",
    ).tag(config=True)
    rest_address = Unicode(
        help="KServe v2 REST listen address host:port (empty: no REST port; gpulab up: a free port where "
        "http_replicas are known). Needs http_replicas."
    ).tag(config=True)
    http_replicas = List(
        Unicode(),
        help="The replicas' Triton HTTP endpoints, host:port or unix:<path>, in the order of replicas "
        "(gpulab up: the embedded Triton's, unless replicas are set).",
    ).tag(config=True)
    restricted_header = Unicode(
        "gpulab-triton-key",
        help="Triton's restricted-protocol header (without Triton's "
        "'triton-grpc-protocol-' prefix), as TritonServer.restricted_header.",
    ).tag(config=True)
    restricted_key = Unicode(
        help="Its secret value, sent to every replica: needed by Tritons on TCP ports, which any local account "
        "can reach (gpulab up: one of its own secrets, where replicas are set)."
    ).tag(config=True)
    model_allow = Dict(
        value_trait=List(Unicode()),
        help="Model -> users and 'group:<name>' entries allowed to call "
        "it; models not listed are open to every holder of custom:gpulab:infer.",
    ).tag(config=True)
    max_request_bytes = Integer(64 * 1024 * 1024, help="Larger requests fail with RESOURCE_EXHAUSTED.").tag(config=True)
    token_cache_seconds = Float(
        10.0, help="How long a token lookup is trusted: a revoked token stops working on both data planes within this."
    ).tag(config=True)
    health_interval = Float(2.0, help="Seconds between ServerLive checks of each replica.").tag(config=True)
    failure_threshold = Integer(3, help="Consecutive failures that open a replica's circuit.").tag(config=True)
    recovery_timeout = Float(5.0, help="Seconds an open circuit waits before a probe.").tag(config=True)
    model_repository = Unicode(
        help="Model repository deploys write to, shared with every replica (gpulab up: the embedded "
        "Triton's; unset: deploying is refused)."
    ).tag(config=True)
    mlflow_url = Unicode(help="MLflow tracking URL models are fetched from (gpulab up: the platform's MLflow).").tag(
        config=True
    )
    platform_mlflow = Bool(
        False,
        help="Whether mlflow_url is the platform's MLflow service, which takes hub tokens and knows gpulab's "
        "users: models are then fetched for the caller, with this service's hub token (set by gpulab up).",
    ).tag(config=True)
    mlflow_token = Unicode(
        help="MLFLOW_TRACKING_TOKEN sent to mlflow_url (default: this service's hub token, "
        "where mlflow_url is the platform's MLflow, which takes hub tokens)."
    ).tag(config=True)
    default_backend = Enum(
        list(BACKENDS),
        "python-onnx",
        help="Backend of deploys that name none: python-onnx "
        "(CPU, Python backend + onnxruntime), onnxruntime or tensorrt (GPU).",
    ).tag(config=True)
    allow_pickle = Bool(
        False,
        help="Deploy pickled models (scikit-learn pickle/cloudpickle, PyTorch): loading "
        "one runs code from it, in the converter process.",
    ).tag(config=True)
    deploy_timeout = Float(600.0, help="Seconds a conversion, and a load on the replicas, may take.").tag(config=True)
    tls_cert_file = Unicode(
        help="PEM certificate chain of the gRPC port; with tls_key_file the gateway serves "
        "TLS only (hub tokens then never cross the network in clear)."
    ).tag(config=True)
    tls_key_file = Unicode(help="PEM private key of tls_cert_file (a file only its owner may read).").tag(config=True)
    tls_ca_file = Unicode(
        help="PEM bundle clients trust for the gateway (GPULAB_INFER_TLS_CA in user servers); "
        "default tls_cert_file, for a self-signed certificate."
    ).tag(config=True)
    data_plane = Enum(
        ["auto", "python", "nginx"],
        "auto",
        help="What serves the gRPC port. python: the gateway "
        "itself (grpcio; about 0.5 ms and 0.4-0.7 ms of CPU per call). nginx: nginx with the lua "
        "module (Debian: nginx, libnginx-mod-http-lua) proxies ModelInfer to Triton itself, after the "
        "gateway's own token and model checks (cached for token_cache_seconds), and passes every "
        "other RPC to the Python gateway; breakers become nginx's failure marking (failure_threshold "
        "failures, then recovery_timeout s) and health checks apply to the Python side only. auto: "
        "nginx where nginx_path and the lua module in nginx_modules_dir are found, else python.",
    ).tag(config=True)
    processes = Integer(
        1,
        min=1,
        help="Processes serving the gRPC port. nginx data plane: nginx workers. python: "
        "gateway processes sharing the port with SO_REUSEPORT (each connection goes to one of them; "
        "each has its own health checks, breakers and token cache), which lets any process of the "
        "gateway's OS user bind the port too: use more than 1 only where user code does not run as "
        "that user (container spawners, other hosts). /metrics labels samples by process.",
    ).tag(config=True)
    nginx_path = Unicode("nginx", help="The nginx binary of the nginx data plane.").tag(config=True)
    nginx_modules_dir = Unicode(
        "/usr/lib/nginx/modules", help="Where nginx's dynamic modules are (ndk_http_module.so, ngx_http_lua_module.so)."
    ).tag(config=True)

    def plane(self) -> str:
        """The data plane to run: data_plane, with auto resolved."""
        if self.data_plane != "auto":
            return self.data_plane
        found = shutil.which(self.nginx_path) and (Path(self.nginx_modules_dir) / "ngx_http_lua_module.so").exists()
        return "nginx" if found else "python"

    def check_http_replicas(self) -> None:
        if self.http_replicas and len(self.http_replicas) != len(self.replicas):
            raise ConfigError(
                f"InferenceGateway.http_replicas: {len(self.http_replicas)} HTTP endpoints for "
                f"{len(self.replicas)} replicas (give one per replica, in the same order)"
            )

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
