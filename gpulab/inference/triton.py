"""A Triton Inference Server process managed by gpulab, and ONNX entries for its model repository.

The server is the Triton 2.51 binary bundled in ``nvidia-pytriton`` (its own venv, made by
``scripts/setup-triton``; Python backend only). It loads models only when told
(``--model-control-mode=explicit``). The platform's own Triton listens on unix sockets in a directory only
the service account may enter (``socket_dir``), so no other account reaches it and no key is needed; a Triton
on TCP ports (127.0.0.1, the tests' and benchmarks') answers the restricted protocols only to callers that send
its secret header::

    server = TritonServer(config=cfg, model_repository="/data/models", socket_dir="/data/triton").start()
    server.grpc_address, server.http_address, server.grpc_headers   # for the gateway
    server.stop()
"""

import http.client
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from traitlets import Integer, List, Unicode, default
from traitlets.config import Configurable

from ..errors import ConfigError
from ..net import free_port, private_sockets

log = logging.getLogger("gpulab.triton")
# proc(5) hidepid values that keep other accounts from reading a process's command line
HIDDEN_PIDS = {"1", "2", "4", "noaccess", "invisible", "ptraceable"}


def processes_hidden(mountinfo: str) -> bool:
    """Whether ``/proc`` (as ``/proc/self/mountinfo`` says) keeps other accounts from reading a process's
    command line: mounted with ``hidepid`` noaccess, invisible or ptraceable."""
    for line in mountinfo.splitlines():
        fields, _, rest = line.partition(" - ")
        mount_point = fields.split()[4] if len(fields.split()) > 4 else ""
        fstype, _, options = rest.partition(" ")
        if mount_point == "/proc" and fstype == "proc":
            options = dict(o.partition("=")[::2] for o in options.split(" ")[-1].split(","))
            return options.get("hidepid") in HIDDEN_PIDS
    return False


GRPC_KEY_PREFIX = "triton-grpc-protocol-"
PROTOCOLS = [
    "health",
    "metadata",
    "inference",
    "shared-memory",
    "model-config",
    "model-repository",
    "statistics",
    "trace",
    "logging",
]
# in socket_dir; Triton adds ":<port>" to the gRPC socket's name, so it is given port 0
SOCKETS = {"grpc": "grpc.sock:0", "http": "http.sock", "metrics": "metrics.sock"}
_PROBE = """import json, pathlib, sys, sysconfig, pytriton
print(json.dumps({"pytriton": str(pathlib.Path(pytriton.__file__).parent), "libdir": sysconfig.get_config_var("LIBDIR"),
                  "version": "%d.%d" % sys.version_info[:2]}))"""


class TritonServer(Configurable):
    """One ``tritonserver`` process (``c.TritonServer.*``); ports chosen at the first start are kept on restart."""

    python = Unicode(
        help="Python of the Triton venv (scripts/setup-triton); default $GPULAB_TRITON_PYTHON, "
        "else .venv-triton/bin/python in the gpulab checkout."
    ).tag(config=True)
    model_repository = Unicode(help="Model repository directory.").tag(config=True)
    socket_dir = Unicode(
        help="Listen on unix sockets in this directory (made 0700 of this account) instead of TCP "
        "ports: no other account can connect, so the restricted protocols need no key."
    ).tag(config=True)
    host = Unicode("127.0.0.1", help="Address all three endpoints bind to (without socket_dir).").tag(config=True)
    grpc_port = Integer(0, help="gRPC port (0: a free one).").tag(config=True)
    http_port = Integer(0, help="HTTP port (0: a free one).").tag(config=True)
    metrics_port = Integer(0, help="Prometheus metrics port (0: a free one).").tag(config=True)
    restricted_header = Unicode(
        "gpulab-triton-key", help="Header (gRPC metadata key) that unlocks restricted protocols; lowercase."
    ).tag(config=True)
    restricted_key = Unicode(help="Its secret value; random per process if unset.").tag(config=True)
    restricted_protocols = List(
        Unicode(),
        PROTOCOLS,
        help="Protocols only the key holder may use (default: all, so users reach Triton only through the gateway).",
    ).tag(config=True)
    load_models = List(Unicode(), ["*"], help="Models loaded at start ('*': every model in the repository).").tag(
        config=True
    )
    log_path = Unicode(help="Server log file (default: tritonserver.log in its work dir).").tag(config=True)

    @default("python")
    def _default_python(self):
        return os.environ.get("GPULAB_TRITON_PYTHON") or str(
            Path(__file__).resolve().parents[2] / ".venv-triton" / "bin" / "python"
        )

    @default("restricted_key")
    def _default_key(self):
        return secrets.token_urlsafe(32)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.proc: subprocess.Popen | None = None
        self.workdir: Path | None = None
        self._command: tuple[list[str], dict] | None = None

    def __repr__(self):
        return f"<TritonServer {self.host}:{self.grpc_port} pid={self.proc and self.proc.pid}>"

    def _socket(self, kind: str) -> Path:
        return Path(self.socket_dir) / SOCKETS[kind]

    @property
    def grpc_address(self) -> str:
        """``host:port``, or ``unix:<path>`` with ``socket_dir``, as gRPC channels take it."""
        return f"unix:{self._socket('grpc')}" if self.socket_dir else f"{self.host}:{self.grpc_port}"

    @property
    def http_address(self) -> str:
        """``host:port``, or ``unix:<path>`` with ``socket_dir`` (InferenceGateway.http_replicas takes both)."""
        return f"unix:{self._socket('http')}" if self.socket_dir else f"{self.host}:{self.http_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    @property
    def restricted(self) -> bool:
        """Whether callers need the key: on TCP ports, which every local account can reach."""
        return bool(self.restricted_protocols) and not self.socket_dir

    @property
    def http_headers(self) -> dict[str, str]:
        """HTTP headers that unlock the restricted APIs."""
        return {self.restricted_header: self.restricted_key} if self.restricted else {}

    @property
    def grpc_headers(self) -> dict[str, str]:
        """gRPC metadata that unlocks the restricted protocols (Triton prefixes the key)."""
        return {GRPC_KEY_PREFIX + self.restricted_header: self.restricted_key} if self.restricted else {}

    def _prepare(self) -> tuple[list[str], dict]:
        """Backend dir with the stub for the venv's Python, argv and env."""
        if not Path(self.python).exists():
            raise ConfigError(f"TritonServer.python: {self.python} does not exist (run scripts/setup-triton)")
        if not self.model_repository:
            raise ConfigError("TritonServer.model_repository is not set")
        probe = json.loads(
            subprocess.run([self.python, "-c", _PROBE], check=True, capture_output=True, text=True).stdout
        )
        dist = Path(probe["pytriton"]) / "tritonserver"
        self.workdir = Path(tempfile.mkdtemp(prefix="gpulab-triton-"))
        backend = self.workdir / "backends" / "python"
        backend.mkdir(parents=True)
        for item in (dist / "backends" / "python").iterdir():
            if item.is_file():
                (backend / item.name).symlink_to(item)
        stub = dist / "python_backend_stubs" / probe["version"] / "triton_python_backend_stub"
        if not stub.exists():
            raise ConfigError(f"TritonServer.python: no Triton Python stub for Python {probe['version']}")
        (backend / "triton_python_backend_stub").symlink_to(stub)
        argv = [
            str(dist / "bin" / "tritonserver"),
            f"--model-repository={self.model_repository}",
            "--model-control-mode=explicit",
            *(f"--load-model={m}" for m in self.load_models),
            f"--backend-directory={self.workdir / 'backends'}",
            f"--cache-directory={dist / 'caches'}",
            *self._endpoints(),
            "--allow-gpu-metrics=false",
            "--exit-timeout-secs=5",
        ]
        if self.restricted:
            restricted = f"{','.join(self.restricted_protocols)}:{self.restricted_header}={self.restricted_key}"
            argv += [f"--grpc-restricted-protocol={restricted}", f"--http-restricted-api={restricted}"]
            if not processes_hidden(Path("/proc/self/mountinfo").read_text()):
                log.warning(
                    "TritonServer on TCP ports: its restricted-protocol key is on tritonserver's command "
                    "line, which other accounts on this host can read in /proc; where users' code runs "
                    "here, mount /proc with hidepid=invisible or run Triton in a container of its own "
                    "(docs/inference.md)"
                )
        env = dict(os.environ)
        libs = [probe["libdir"], str(dist.parent.parent / "nvidia_pytriton.libs")]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(libs + [p for p in [env.get("LD_LIBRARY_PATH")] if p])
        env["PATH"] = os.pathsep.join([str(Path(self.python).parent), env.get("PATH", "")])
        env.pop("PYTHONPATH", None)
        return argv, env

    def _endpoints(self) -> list[str]:
        """Triton's address and port options: unix sockets in socket_dir (Triton takes ``unix:`` addresses for
        all three), or TCP ports on host (free ones where not set)."""
        if self.socket_dir:
            private_sockets(Path(self.socket_dir), SOCKETS.values(), "TritonServer.socket_dir")
            addresses = {kind: (f"unix:{self._socket(kind)}".removesuffix(":0"), 0) for kind in SOCKETS}
        else:
            for name in ("grpc_port", "http_port", "metrics_port"):
                if not getattr(self, name):
                    setattr(self, name, free_port(self.host))
            addresses = {kind: (self.host, getattr(self, f"{kind}_port")) for kind in SOCKETS}
        return [
            option
            for kind, (address, port) in addresses.items()
            for option in (f"--{kind}-address={address}", f"--{kind}-port={port}")
        ]

    def launch(self) -> subprocess.Popen:
        """Start tritonserver, not waiting for it (its backend directory and command are made on the first
        launch, and kept until :meth:`stop`); it logs to :attr:`log_file`."""
        if self._command is None:
            self._command = self._prepare()
        elif self.socket_dir:  # started again: a killed server leaves its sockets behind, which Triton cannot bind
            private_sockets(Path(self.socket_dir), SOCKETS.values(), "TritonServer.socket_dir")
        argv, env = self._command
        with self.log_file.open("ab") as out:
            self.proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        return self.proc

    def start(self, timeout: float = 60) -> "TritonServer":
        """Start the server and wait until it is ready (models in ``load_models`` loaded)."""
        self.launch()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tritonserver exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self.ready():
                return self
            time.sleep(0.2)
        tail = self.log_tail()
        self.stop()
        raise RuntimeError(f"tritonserver not ready in {timeout} s:\n{tail}")

    @property
    def log_file(self) -> Path:
        return Path(self.log_path or self.workdir / "tritonserver.log")

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the server's log."""
        log = self.log_file
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else ""

    def get(self, path: str, endpoint: str = "http", timeout: float = 5) -> tuple[int, bytes]:
        """``GET path`` on the HTTP (or ``metrics``) endpoint, over its socket or port: (status, body)."""
        connection = (
            _UnixConnection(str(self._socket(endpoint)), timeout)
            if self.socket_dir
            else http.client.HTTPConnection(self.host, getattr(self, f"{endpoint}_port"), timeout=timeout)
        )
        try:
            connection.request("GET", path, headers=self.http_headers)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def metrics(self) -> str:
        """Its Prometheus metrics."""
        return self.get("/metrics", "metrics")[1].decode()

    def ready(self) -> bool:
        """Whether the server answers ready on HTTP."""
        try:
            return self.get("/v2/health/ready", timeout=1)[0] == 200
        except (http.client.HTTPException, OSError):
            return False

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` s; the server's process group goes with it (Python stubs)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = self._command = None


class _UnixConnection(http.client.HTTPConnection):
    """HTTP to a unix socket."""

    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socket_path)


ONNX_TO_TRITON = {
    1: "FP32",
    2: "UINT8",
    3: "INT8",
    4: "UINT16",
    5: "INT16",
    6: "INT32",
    7: "INT64",
    8: "STRING",
    9: "BOOL",
    10: "FP16",
    11: "FP64",
    12: "UINT32",
    13: "UINT64",
    16: "BF16",
}


# Tensor names gpulab writes into a model's config: what ONNX exporters produce ("x", "input.1", "onnx::Gemm_0",
# "/linear/Gemm_output_0"), nothing that needs quoting
TENSOR_NAME = re.compile(r"^[A-Za-z0-9_.:/\[\]-]{1,256}$")


def onnx_signature(model) -> tuple[list[dict], list[dict]]:
    """Inputs and outputs of an ``onnx.ModelProto`` as ``{"name", "data_type", "dims"}`` (-1 for a dynamic dim).

    ValueError, naming the tensor, for a name that is not a plain tensor name (:data:`TENSOR_NAME`), a type Triton
    has not, or data kept outside the file (``external_data``: Triton would read it from wherever it points)."""
    for tensor in _tensors(model.graph):
        if tensor.data_location == 1:  # TensorProto.EXTERNAL
            raise ValueError(
                f"tensor '{tensor.name}' keeps its data in an external file; save the model with its "
                "data inside (onnx.save(..., save_as_external_data=False))"
            )
    initializers = {i.name for i in model.graph.initializer}

    def spec(value) -> dict:
        if not TENSOR_NAME.match(value.name):
            raise ValueError(
                f"tensor name {value.name[:80]!r} is not allowed: use 1-256 letters, digits and _ . : / [ ] -"
            )
        tensor = value.type.tensor_type
        if tensor.elem_type not in ONNX_TO_TRITON:
            raise ValueError(f"tensor '{value.name}': ONNX element type {tensor.elem_type} has no Triton type")
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
        return {"name": value.name, "data_type": "TYPE_" + ONNX_TO_TRITON[tensor.elem_type], "dims": dims}

    return ([spec(v) for v in model.graph.input if v.name not in initializers], [spec(v) for v in model.graph.output])


def _tensors(graph):
    """Every tensor of an ONNX graph: initializers, sparse ones, and those in node attributes and subgraphs."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            for subgraph in [attribute.g] * attribute.HasField("g") + list(attribute.graphs):
                yield from _tensors(subgraph)


# backend -> (its part of config.pbtxt, as a ModelConfig dict; files in each version dir)
BACKENDS = {
    # CPU: a Python-backend model.py running the ONNX file with onnxruntime (the bundled Triton has no other backend)
    "python-onnx": (
        {"backend": "python", "instance_group": [{"kind": "KIND_CPU", "count": 1}]},
        ("model.onnx", "model.py"),
    ),
    # GPU: Triton's stock onnxruntime backend
    "onnxruntime": ({"backend": "onnxruntime", "instance_group": [{"kind": "KIND_GPU", "count": 1}]}, ("model.onnx",)),
    # GPU: the onnxruntime backend with its TensorRT execution provider, which builds (and caches) the engine for
    # the node's GPU and TensorRT on first load; a model.plan would have to be built on the serving GPU beforehand
    "tensorrt": (
        {
            "backend": "onnxruntime",
            "instance_group": [{"kind": "KIND_GPU", "count": 1}],
            "optimization": {"execution_accelerators": {"gpu_execution_accelerator": [{"name": "tensorrt"}]}},
        },
        ("model.onnx",),
    ),
}


def model_config(name: str, inputs: list[dict], outputs: list[dict], backend: str = "python-onnx") -> str:
    """``config.pbtxt`` for an ONNX model: no batching (dims exactly as given), only the newest version served
    (Triton's ``latest 1``: a new version replaces the old one once it is ready, in-flight requests finish).

    Written from Triton's ``ModelConfig`` protobuf (``text_format`` quotes every string), never by pasting
    names into text: a name cannot add settings of its own."""
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    config = {
        "name": name,
        **BACKENDS[backend][0],
        "max_batch_size": 0,
        "version_policy": {"latest": {"num_versions": 1}},
        "input": inputs,
        "output": outputs,
    }
    return text_format.MessageToString(json_format.ParseDict(config, model_config_pb2.ModelConfig()))


def write_onnx_model(
    repository: Path | str, name: str, onnx_path: Path | str, version: int = 1, backend: str = "python-onnx"
) -> Path:
    """Write ``<repository>/<name>/{config.pbtxt, <version>/model.onnx}`` (and ``model.py``, the Python-backend
    model running the ONNX file with onnxruntime, for ``python-onnx``), inputs and outputs taken from the ONNX
    graph. The version directory appears complete (written aside, then renamed), so a server scanning the
    repository never sees half of it. Returns the model directory."""
    import onnx

    inputs, outputs = onnx_signature(onnx.load(str(onnx_path), load_external_data=False))
    model_dir = Path(repository) / name
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=model_dir))
    for file in BACKENDS[backend][1]:
        source = onnx_path if file == "model.onnx" else Path(__file__).with_name("onnx_model.py")
        shutil.copyfile(source, staging / file)
    staging.chmod(0o755)
    shutil.rmtree(model_dir / str(version), ignore_errors=True)
    staging.rename(model_dir / str(version))
    config = model_dir / ".config.pbtxt.tmp"
    config.write_text(model_config(name, inputs, outputs, backend))
    config.replace(model_dir / "config.pbtxt")
    return model_dir
