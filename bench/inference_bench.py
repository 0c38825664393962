"""Inference overhead: stock ``tritonclient.grpc`` straight to Triton (the baseline) vs through ``gpulab-infer``,
``gpulab.infer`` vs the stock client it wraps, and REST through the gateway and through the server extension.

One Triton (the bundled 2.51 binary, Python-backend ONNX models), one real platform (hub, proxy, the gateway
``gpulab-infer``, a user's server with the gpulab extension), one client process. For a [1,4] FP32 tensor and a
1 MiB one, each target gets sequential latency (p50, p99) and throughput at concurrency 1, 8 and 32 (threads, one
client each); at c=8 the CPU time per request of the client, the gateway and Triton is sampled. Targets:

- ``direct``: the stock client to Triton, inputs built once (the baseline);
- ``gateway``: the same client through the gateway with a hub token;
- ``stock``: the stock client through the gateway doing what ``gpulab.infer`` wraps: inputs from numpy on each
  call, outputs as numpy;
- ``gpulab.infer``: ``InferenceClient.infer(model, array)``;
- ``rest``: ``POST /user/<name>/gpulab/api/v1/models/{model}/infer`` (JSON) through the hub's proxy, one
  ``requests.Session`` per thread;
- ``rest-binary``: the same with a KServe v2 binary body as ``tritonclient.http`` writes it (outputs in binary);
- ``whoami``: ``GET /user/<name>/gpulab/api/v1/whoami`` the same way: what any request to the user's server costs
  through the proxy, the floor under both REST targets;
- ``gateway-rest``: KServe v2 ``POST /v2/models/{model}/infer`` on the gateway's REST port with the ``rest-binary``
  body and a hub token, one ``requests.Session`` per thread;
- ``triton-rest``: the same body straight to Triton's HTTP port (with the platform key): REST's own ceiling.

CPU is sampled for the client, the hub's proxy, the user's server, the gateway and Triton. The added latency of
``gateway`` over ``direct`` and of ``gpulab.infer`` over ``stock`` is also measured call by call: the median
difference over pairs of calls made one right after the other, which a busy shared machine's drift cannot skew.

    python bench/inference_bench.py [--seconds 3] [--requests 1000] [--rounds 3] [--targets direct,gateway,...]
"""

import argparse
import json
import os
import secrets
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import requests
import tritonclient.grpc as triton
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gpulab.inference.kserve import HEADER_LENGTH
from gpulab.inference.triton import TritonServer, write_onnx_model
from gpulab.kernels.inference import InferenceClient
from tests.support.gpulab_up import Platform
from tests.support.triton import linear_onnx, triton_python

BIG = 262_144  # FP32 elements: 1 MiB
TARGETS = ("direct", "gateway", "stock", "gpulab.infer", "gateway-rest", "triton-rest", "rest", "rest-binary", "whoami")
REST = ("rest", "rest-binary", "whoami")  # through the proxy and the user's server
PAIRED = (("gateway", "direct"), ("gpulab.infer", "stock"))  # added latency, measured call by call
RATIOS = (
    ("gateway", "direct"),
    ("gpulab.infer", "stock"),
    ("gateway-rest", "direct"),
    ("gateway-rest", "triton-rest"),
    ("triton-rest", "direct"),
    ("rest", "direct"),
    ("rest-binary", "direct"),
    ("whoami", "direct"),
    ("rest", "whoami"),
    ("rest-binary", "whoami"),
)


def sum_onnx(path: Path) -> None:
    """``y = sum(x)`` over a [1, BIG] FP32 input."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=1)],
        "sum",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, BIG])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])],
        [numpy_helper.from_array(np.array([1], np.int64), "axes")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))


def array(model: str) -> np.ndarray:
    shape = [1, 4] if model == "small" else [1, BIG]
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def request(model: str) -> list:
    x = array(model)
    tensor = triton.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return [tensor]


class Targets:
    """``caller(target, model)`` returns a function doing one inference with its own client."""

    def __init__(self, triton_server: TritonServer, gateway: dict, hub: Platform, user: str, token: str):
        self.triton, self.hub, self.user, self.token = triton_server, hub, user, token
        self.gateway, self.gateway_rest = gateway["grpc_address"], f"http://{gateway['rest_address']}"

    def caller(self, target: str, model: str):
        x = array(model)
        if target in ("direct", "gateway"):
            address, headers = (
                (self.triton.grpc_address, self.triton.grpc_headers)
                if target == "direct"
                else (self.gateway, {"authorization": f"token {self.token}"})
            )
            client, inputs = triton.InferenceServerClient(address), request(model)
            return lambda: client.infer(model, inputs, headers=headers)
        if target == "stock":
            client, headers = triton.InferenceServerClient(self.gateway), {"authorization": f"token {self.token}"}

            def stock():
                tensor = triton.InferInput("x", list(x.shape), "FP32")
                tensor.set_data_from_numpy(x)
                result = client.infer(model, [tensor], headers=headers)
                return {o.name: result.as_numpy(o.name) for o in result.get_response().outputs}

            return stock
        if target == "gpulab.infer":
            client = InferenceClient(f"{self.hub.url}/services/gpulab-infer/api/v1", self.gateway, self.token)
            return lambda: client.infer(model, x)
        session, headers = requests.Session(), {"Authorization": f"token {self.token}"}
        api = f"{self.hub.url}/user/{self.user}/gpulab/api/v1"
        if target == "whoami":

            def whoami():
                session.get(f"{api}/whoami", headers=headers, timeout=60).raise_for_status()

            return whoami
        if target in ("gateway-rest", "triton-rest"):
            api, headers = (
                (self.gateway_rest, headers)
                if target == "gateway-rest"
                else (self.triton.http_url, self.triton.http_headers)
            )
            api += "/v2"
        if target != "rest":
            tensor = triton_http.InferInput("x", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            body, size = triton_http.InferenceServerClient.generate_request_body([tensor])
            headers = {**headers, HEADER_LENGTH: str(size)}
        else:
            body, headers["Content-Type"] = json.dumps({"inputs": {"x": x.tolist()}}), "application/json"

        def rest():
            session.post(f"{api}/models/{model}/infer", data=body, headers=headers, timeout=60).raise_for_status()

        return rest


class CPUProbe:
    """CPU seconds of the client (this process), the hub's proxy, the user's server, the gateway (with nginx, when
    that is its data plane) and Triton (with its Python-backend stubs)."""

    PARTS = ("client", "proxy", "server", "gateway", "triton")

    def __init__(self, hub: Platform, triton_server: TritonServer):
        def find(word: str) -> list[psutil.Process]:
            return [p for p in hub.descendants() if word in " ".join(p.cmdline())][:1]

        self.procs = {
            "client": [psutil.Process()],
            "proxy": find("configurable-http-proxy"),
            "server": find("jupyterhub.singleuser"),
            "gateway": find("gpulab.services.infer"),
            "triton": [psutil.Process(triton_server.proc.pid)],
        }

    def sample(self) -> dict[str, float]:
        def tree(top: psutil.Process) -> list[psutil.Process]:
            return [top] if top.pid == os.getpid() else [top, *top.children(recursive=True)]  # the client: alone

        return {
            part: sum(sum(p.cpu_times()[:2]) for top in procs for p in tree(top)) for part, procs in self.procs.items()
        }


def sequential(call, count: int) -> dict:
    for _ in range(min(100, count)):  # warm up
        call()
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - started)
    latencies.sort()
    return {
        "p50": latencies[len(latencies) // 2] * 1e3,
        "p99": latencies[int(len(latencies) * 0.99)] * 1e3,
        "c1": count / sum(latencies),
    }


def paired(call, base, count: int) -> float:
    """Median over ``count`` pairs of (``call``'s latency - ``base``'s), in ms, the two made one right after the
    other (order alternating): drift and noise that hit both cancel out."""
    differences = []
    for i in range(count):
        first, second = (call, base) if i % 2 == 0 else (base, call)
        t0 = time.perf_counter()
        first()
        t1 = time.perf_counter()
        second()
        t2 = time.perf_counter()
        differences.append((t1 - t0) - (t2 - t1) if i % 2 == 0 else (t2 - t1) - (t1 - t0))
    return statistics.median(differences) * 1e3


def concurrent(calls: list, seconds: float, probe: CPUProbe | None = None) -> dict:
    """Throughput of ``calls`` in parallel threads; with a ``probe``, CPU microseconds per request."""
    done, stop = [0] * len(calls), threading.Event()

    def work(i: int) -> None:
        while not stop.is_set():
            calls[i]()
            done[i] += 1

    workers = [threading.Thread(target=work, args=(i,)) for i in range(len(calls))]
    for w in workers:
        w.start()
    time.sleep(0.5)  # warm up
    start_count, started, cpu = sum(done), time.perf_counter(), probe and probe.sample()
    time.sleep(seconds)
    count, elapsed, cpu_end = sum(done) - start_count, time.perf_counter() - started, probe and probe.sample()
    stop.set()
    for w in workers:
        w.join()
    row = {"rps": count / elapsed}
    if probe:
        row.update({f"cpu_{k}": (cpu_end[k] - cpu[k]) / count * 1e6 for k in cpu})
    return row


def measure(targets: Targets, target: str, model: str, count: int, seconds: float, probe: CPUProbe) -> dict:
    """One round for one target."""
    row = sequential(targets.caller(target, model), count)
    for threads in (8, 32):
        result = concurrent(
            [targets.caller(target, model) for _ in range(threads)], seconds, probe if threads == 8 else None
        )
        row[f"c{threads}"] = result.pop("rps")
        row.update(result)
    return row


def start(work: Path) -> tuple[TritonServer, Platform]:
    linear_onnx(work / "small.onnx")
    sum_onnx(work / "big.onnx")
    for name in ("small", "big"):
        write_onnx_model(work / "repo", name, work / f"{name}.onnx")
    key = secrets.token_urlsafe(24)
    server = TritonServer(
        python=triton_python(),
        model_repository=str(work / "repo"),
        restricted_key=key,
        log_path=str(work / "triton.log"),
    ).start()
    hub = Platform(work / "data", host="127.0.0.23")
    hub.start(f"""
c.Platform.mlflow_service = False
c.Platform.jobs_service = False
c.Platform.inference_service = True
c.InferenceGateway.replicas = [{server.grpc_address!r}]
c.InferenceGateway.http_replicas = [{server.http_url.removeprefix("http://")!r}]
c.InferenceGateway.restricted_key = {key!r}
c.Roles.extra_roles = c.Roles.extra_roles + [
    {{"name": "bench-services", "scopes": ["read:services"], "services": ["test-admin"]}}]
""")
    return server, hub


def bench_user(hub: Platform) -> tuple[str, dict]:
    """The user ``bench``'s token, and the gateway's addresses (the hub's ``info`` of ``gpulab-infer``)."""
    hub.create_user("bench")
    return hub.token("bench"), hub.api("GET", "/services/gpulab-infer").json()["info"]


def wait_for(call, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            call()
            return
        except (InferenceServerException, requests.RequestException):  # still starting
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not answer in {timeout:g} s") from None
            time.sleep(0.3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per throughput measurement")
    parser.add_argument(
        "--requests",
        type=int,
        default=1000,
        help="sequential requests per round (small tensor; a tenth for 1 MiB, a quarter of those for rest)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds in rotating target order; medians reported")
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated, from " + ", ".join(TARGETS))
    args = parser.parse_args()
    chosen = [t for t in TARGETS if t in args.targets.split(",")]
    work = Path(tempfile.mkdtemp(prefix="gpulab-bench-"))
    server, hub = start(work)
    try:
        token, gateway = bench_user(hub)
        targets = Targets(server, gateway, hub, "bench", token)
        if set(REST) & set(chosen):
            hub.spawn("bench")
        for target in chosen:
            wait_for(targets.caller(target, "small"), target)
        probe = CPUProbe(hub, server)
        plane = (
            "nginx"
            if any("nginx" in p.name() for p in probe.procs["gateway"][0].children(recursive=True))
            else "python"
        )
        print(
            f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} cores); "
            f"gateway data plane: {plane}"
        )
        print(
            f"{'model':6} {'target':12} {'p50 ms':>8} {'p99 ms':>8} {'c=1 /s':>8} {'c=8 /s':>8} {'c=32 /s':>8}"
            f"   CPU us/req at c=8: {' '.join(CPUProbe.PARTS)}"
        )
        for model, count in (("small", args.requests), ("big", max(args.requests // 10, 50))):
            rounds = {t: [] for t in chosen}
            for i in range(args.rounds):
                for target in chosen[i % len(chosen) :] + chosen[: i % len(chosen)]:
                    n = max(count // 4, 20) if target in REST else count
                    rounds[target].append(measure(targets, target, model, n, args.seconds, probe))
            rows = {t: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for t, rs in rounds.items()}
            for target, row in rows.items():
                print(
                    f"{model:6} {target:12} {row['p50']:8.3f} {row['p99']:8.3f} {row['c1']:8.0f} {row['c8']:8.0f} "
                    f"{row['c32']:8.0f}   " + " ".join(f"{row['cpu_' + part]:6.0f}" for part in CPUProbe.PARTS)
                )
            for target, base in PAIRED:
                if target in rows and base in rows:
                    added = paired(targets.caller(target, model), targets.caller(base, model), count)
                    print(
                        f"{model:6} {target} vs {base}, calls in alternation: {added:+.3f} ms median added "
                        f"({count} pairs)",
                        flush=True,
                    )
            for target, base in RATIOS:
                if target in rows and base in rows:
                    t, b = rows[target], rows[base]
                    print(
                        f"{model:6} {target} vs {base}: p50 {t['p50'] - b['p50']:+.3f} ms; throughput "
                        f"c=1 {t['c1'] / b['c1']:.2f}x, c=8 {t['c8'] / b['c8']:.2f}x, c=32 {t['c32'] / b['c32']:.2f}x",
                        flush=True,
                    )
        print(
            f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; medians of {args.rounds} "
            f"rounds; {args.seconds:g} s per throughput run; client, proxy, hub, user server, gateway and Triton "
            f"share {os.cpu_count()} cores"
        )
    finally:
        hub.stop()
        server.stop()


if __name__ == "__main__":
    main()
