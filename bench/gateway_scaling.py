"""Gateway scaling: the stock ``tritonclient.grpc`` straight to Triton (the baseline) vs through ``gpulab-infer``
on each data plane (``c.InferenceGateway.data_plane``: python, nginx) with 1, 2, 4 … processes
(``c.InferenceGateway.processes``: Python gateway processes, or nginx workers), all measured in one run; with
``--protocols grpc,http`` also KServe v2 REST (binary tensors over kept-alive ``http.client`` connections)
straight to Triton's HTTP port and on the gateway's REST port, against the same gRPC baseline.

One Triton (the bundled 2.51 binary; a [1,4] FP32 linear model in the Python backend, ``--instances`` copies), a
real JupyterHub that holds the token and answers the gateway's token lookups, and the gateway as
``python -m gpulab.services.infer``. The hub's proxy is a route table inside the hub (``RouteTable`` below):
nothing here goes through a proxy, and this way the benchmark needs no Node.js on the machine. Load comes from
client processes (one connection per thread, so SO_REUSEPORT can spread them over the gateway's processes):
concurrency 1 gives p50/p99; each concurrency gives throughput; at c=8 the gateway's CPU time per request is
sampled over all its processes.

    python bench/gateway_scaling.py [--planes python,nginx] [--processes 1,2,4] [--protocols grpc,http]
        [--concurrency 1,8,32]
        [--seconds 3] [--rounds 2] [--instances 4] [--client-processes 8] [--json PATH]
        [--nginx-path nginx] [--nginx-modules-dir /usr/lib/nginx/modules]

Needs the Triton venv (``scripts/setup-triton``) or ``GPULAB_TRITON_PYTHON`` naming a Python with nvidia-pytriton
and onnxruntime, and jupyterhub in this Python.
"""

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from gpulab.inference.triton import TritonServer, write_onnx_model  # noqa: E402
from gpulab.net import free_port  # noqa: E402
from gpulab.scopes import CUSTOM_SCOPES, INFER  # noqa: E402
from tests.support.processes import terminate  # noqa: E402
from tests.support.triton import linear_onnx  # noqa: E402

HOST = "127.0.0.1"
HUB_CONFIG = """
from jupyterhub.proxy import Proxy

class RouteTable(Proxy):
    '''JupyterHub's proxy API with nothing behind it: this benchmark calls the hub API on the hub's own port.'''
    should_start = False
    routes = {{}}

    async def add_route(self, routespec, target, data):
        self.routes[routespec] = {{"routespec": routespec, "target": target, "data": data}}

    async def delete_route(self, routespec):
        self.routes.pop(routespec, None)

    async def get_all_routes(self):
        return dict(self.routes)

c.JupyterHub.proxy_class = RouteTable
c.JupyterHub.authenticator_class = "null"
c.JupyterHub.bind_url = "http://{host}:{port}"
c.JupyterHub.hub_bind_url = "http://{host}:{hub_port}"
c.JupyterHub.db_url = "sqlite:///{work}/hub.sqlite"
c.JupyterHub.cookie_secret_file = "{work}/cookie_secret"
c.JupyterHub.custom_scopes = {scopes!r}
c.JupyterHub.services = [{{"name": "bench", "api_token": {token!r}}}]
c.JupyterHub.load_roles = [{{"name": "bench", "scopes": [{infer!r}], "services": ["bench"]}}]
"""


def wait_http(url: str, what: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start (see its log)") from None
            time.sleep(0.2)


class Stack:
    """Triton and the hub for the whole run; gateways started and stopped per process count."""

    def __init__(self, work: Path, instances: int, nginx: dict):
        self.work = work
        self.nginx = nginx
        linear_onnx(work / "linear.onnx")
        model = write_onnx_model(work / "repo", "small", work / "linear.onnx")
        config = model / "config.pbtxt"
        config.write_text(config.read_text().replace("count: 1", f"count: {instances}"))
        self.triton = TritonServer(
            model_repository=str(work / "repo"),
            load_models=["small"],
            restricted_key=secrets.token_urlsafe(24),
            log_path=str(work / "triton.log"),
        )
        self.token = secrets.token_hex(16)
        self.hub = self.gateway = None

    def start(self) -> None:
        self.triton.start(timeout=120)
        port, hub_port = free_port(HOST), free_port(HOST)
        config = self.work / "jupyterhub_config.py"
        config.write_text(
            HUB_CONFIG.format(
                host=HOST,
                port=port,
                hub_port=hub_port,
                work=self.work,
                scopes=CUSTOM_SCOPES,
                token=self.token,
                infer=INFER,
            )
        )
        with (self.work / "hub.log").open("ab") as log:
            self.hub = subprocess.Popen(
                [sys.executable, "-m", "jupyterhub", "-f", str(config)],
                cwd=self.work,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.hub_api = f"http://{HOST}:{hub_port}/hub/api"
        wait_http(self.hub_api + "/", "JupyterHub", self.hub)

    def start_gateway(self, plane: str, processes: int) -> dict[str, str]:
        """Its address by protocol."""
        address, rest = f"{HOST}:{free_port(HOST)}", f"{HOST}:{free_port(HOST)}"
        env = {
            **os.environ,
            "JUPYTERHUB_API_URL": self.hub_api,
            "GPULAB_CONFIG": str(self.work / "gpulab_config.py"),
            "GPULAB_CONFIG_OVERRIDES": json.dumps(
                {
                    "InferenceGateway": {
                        "address": address,
                        "rest_address": rest,
                        "replicas": [self.triton.grpc_address],
                        "http_replicas": [self.triton.http_url.removeprefix("http://")],
                        "restricted_key": self.triton.restricted_key,
                        "processes": processes,
                        "data_plane": plane,
                        **self.nginx,
                    }
                }
            ),
        }
        (self.work / "gpulab_config.py").touch()
        with (self.work / f"gateway-{plane}-{processes}.log").open("ab") as log:
            self.gateway = subprocess.Popen(
                [sys.executable, "-m", "gpulab.services.infer"], env=env, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 60
        extra = processes - 1 if plane == "python" else 0
        while len(psutil.Process(self.gateway.pid).children()) < extra or not ready(address, self.token):
            if self.gateway.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the {plane} gateway with {processes} processes did not start; see {log.name}")
            time.sleep(0.2)
        time.sleep(1)  # extra processes start their gRPC servers after they are spawned
        return {"grpc": address, "http": rest}

    def gateway_cpu(self) -> float:
        if not self.gateway:
            return 0.0
        procs = [psutil.Process(self.gateway.pid), *psutil.Process(self.gateway.pid).children(recursive=True)]
        return sum(sum(p.cpu_times()[:2]) for p in procs)

    def stop_gateway(self) -> None:
        if self.gateway:
            terminate([psutil.Process(self.gateway.pid)], 15)
            self.gateway = None

    def close(self) -> None:
        self.stop_gateway()
        if self.hub:
            terminate([psutil.Process(self.hub.pid)], 15)
        self.triton.stop()


def ready(address: str, token: str) -> bool:
    import tritonclient.grpc as triton
    from tritonclient.utils import InferenceServerException

    try:
        return triton.InferenceServerClient(address).is_model_ready("small", headers=auth(token))
    except InferenceServerException:
        return False


def auth(token: str) -> dict:
    return {"authorization": f"token {token}"}


def rest_caller(address: str, headers: dict, x: np.ndarray):
    """One KServe v2 binary inference per call over one kept-alive connection (the body as tritonclient.http
    writes it)."""
    import http.client

    header = json.dumps(
        {
            "inputs": [
                {"name": "x", "shape": list(x.shape), "datatype": "FP32", "parameters": {"binary_data_size": x.nbytes}}
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    body = header + x.tobytes()
    headers = {
        **headers,
        "Inference-Header-Content-Length": str(len(header)),
        "Content-Type": "application/octet-stream",
    }
    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port))

    def call() -> None:
        connection.request("POST", "/v2/models/small/infer", body, headers)
        response = connection.getresponse()
        answer = response.read()
        if response.status != 200:
            raise RuntimeError(f"REST inference failed: {response.status} {answer[:200]!r}")

    return call


def load(
    protocol: str, address: str, headers: dict, threads: int, measure_from: float, measure_to: float
) -> tuple[int, list]:
    """Client process: ``threads`` threads, one connection each, calling until ``measure_to``; the number of calls
    that ended inside [measure_from, measure_to] and their latencies."""
    import threading

    import tritonclient.grpc as triton

    x = np.random.default_rng(0).standard_normal((1, 4)).astype(np.float32)
    results = []

    def work() -> None:
        if protocol == "http":
            call, client = rest_caller(address, headers, x), None
        else:
            client = triton.InferenceServerClient(address, channel_args=[("grpc.use_local_subchannel_pool", 1)])
            tensor = triton.InferInput("x", [1, 4], "FP32")
            tensor.set_data_from_numpy(x)

            def call() -> None:
                client.infer("small", [tensor], headers=headers)

        latencies = []
        while (now := time.monotonic()) < measure_to:
            call()
            end = time.monotonic()
            if end >= measure_from and end <= measure_to:
                latencies.append(end - now)
        results.append(latencies)
        if client:
            client.close()

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sum(len(r) for r in results), [t for r in results for t in r]


def measure(
    pool: ProcessPoolExecutor,
    stack: Stack,
    protocol: str,
    address: str,
    headers: dict,
    concurrency: int,
    client_processes: int,
    seconds: float,
    sample_cpu: bool,
) -> dict:
    procs = min(concurrency, client_processes)
    start = time.monotonic() + 1.0  # client processes are warm (pool); 1 s to connect and warm up
    futures = [
        pool.submit(
            load, protocol, address, headers, concurrency // procs + (i < concurrency % procs), start, start + seconds
        )
        for i in range(procs)
    ]
    time.sleep(max(0.0, start - time.monotonic()))
    cpu = stack.gateway_cpu() if sample_cpu else 0.0
    time.sleep(seconds)
    cpu = stack.gateway_cpu() - cpu if sample_cpu else 0.0
    results = [f.result() for f in futures]
    count = sum(r[0] for r in results)
    latencies = sorted(t for r in results for t in r[1])
    row = {
        "rps": count / seconds,
        "p50": latencies[len(latencies) // 2] * 1e3,
        "p99": latencies[int(len(latencies) * 0.99)] * 1e3,
    }
    if sample_cpu:
        row["cpu_us"] = cpu / count * 1e6
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--planes", default="python,nginx", help="data planes, comma-separated")
    parser.add_argument("--processes", default="1,2,4", help="gateway process (nginx: worker) counts, comma-separated")
    parser.add_argument("--protocols", default="grpc", help="grpc, http (KServe v2 REST), comma-separated")
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated; the first gives p50/p99")
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=2, help="rounds in rotating target order; medians reported")
    parser.add_argument("--instances", type=int, default=4, help="Python-backend instances of the model in Triton")
    parser.add_argument("--client-processes", type=int, default=8, help="load generator processes at most")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--nginx-path", default="nginx", help="as c.InferenceGateway.nginx_path")
    parser.add_argument(
        "--nginx-modules-dir", default="/usr/lib/nginx/modules", help="as c.InferenceGateway.nginx_modules_dir"
    )
    args = parser.parse_args()
    counts = [int(n) for n in args.processes.split(",")]
    levels = [int(n) for n in args.concurrency.split(",")]
    protocols = args.protocols.split(",")
    if "grpc" not in protocols:
        parser.error("--protocols: include grpc, the baseline")
    targets = ["direct", *(f"{plane} x{n}" for plane in args.planes.split(",") for n in counts)]
    rows_of = [f"{t} {protocol}" if protocol != "grpc" else t for t in targets for protocol in protocols]
    nginx = {"nginx_path": args.nginx_path, "nginx_modules_dir": args.nginx_modules_dir}
    stack = Stack(Path(tempfile.mkdtemp(prefix="gpulab-gwbench-")), args.instances, nginx)
    rounds = {t: [] for t in rows_of}
    try:
        stack.start()
        with ProcessPoolExecutor(args.client_processes, mp_context=get_context("spawn")) as pool:
            list(pool.map(abs, range(args.client_processes)))  # start the client processes
            print(
                f"{os.cpu_count()} cores, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
                f"Triton with {args.instances} model instances",
                flush=True,
            )
            for i in range(args.rounds):
                for target in targets[i % len(targets) :] + targets[: i % len(targets)]:
                    if target == "direct":
                        addresses = {
                            "grpc": stack.triton.grpc_address,
                            "http": stack.triton.http_url.removeprefix("http://"),
                        }
                        headers = {"grpc": stack.triton.grpc_headers, "http": stack.triton.http_headers}
                    else:
                        plane, count = target.split(" x")
                        addresses = stack.start_gateway(plane, int(count))
                        headers = {"grpc": auth(stack.token), "http": auth(stack.token)}
                    for protocol in protocols:
                        row = {}
                        for c in levels:
                            r = measure(
                                pool,
                                stack,
                                protocol,
                                addresses[protocol],
                                headers[protocol],
                                c,
                                args.client_processes,
                                args.seconds,
                                sample_cpu=c == 8 and target != "direct",
                            )
                            row[f"c{c}"] = r["rps"]
                            if c == levels[0]:
                                row["p50"], row["p99"] = r["p50"], r["p99"]
                            if "cpu_us" in r:
                                row["cpu_us"] = r["cpu_us"]
                        rounds[f"{target} {protocol}" if protocol != "grpc" else target].append(row)
                    stack.stop_gateway()
        rows = {t: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for t, rs in rounds.items()}
        header = "".join(f"{f'c={c} /s':>9}" for c in levels)
        print(f"{'target':17} {'p50 ms':>7} {'p99 ms':>7}{header}  gateway CPU us/req at c=8")
        for target, row in rows.items():
            cells = "".join(f"{row[f'c{c}']:9.0f}" for c in levels)
            print(f"{target:17} {row['p50']:7.3f} {row['p99']:7.3f}{cells}  {row.get('cpu_us', 0):6.0f}")
        base = rows["direct"]
        for target in (r for r in rows_of if r != "direct"):
            row = rows[target]
            ratios = ", ".join(f"c={c} {row[f'c{c}'] / base[f'c{c}']:.2f}x" for c in levels)
            print(f"{target} vs direct: p50 {row['p50'] - base['p50']:+.3f} ms; throughput {ratios}")
        print(
            f"medians of {args.rounds} rounds, {args.seconds:g} s each; load average after: "
            f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}"
        )
        if args.json:
            Path(args.json).write_text(json.dumps({"cores": os.cpu_count(), "rows": rows}, indent=1))
    finally:
        stack.close()


if __name__ == "__main__":
    main()
