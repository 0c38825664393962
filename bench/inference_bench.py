"""Inference gateway overhead: stock ``tritonclient.grpc`` straight to Triton vs through ``gpulab-infer``.

One Triton (the bundled 2.51 binary, Python-backend ONNX models), one real platform (hub + gateway as a
hub-managed service), one client process. For a [1,4] FP32 tensor and a 1 MiB one: sequential latency
(p50, p99) and throughput at concurrency 1, 8 and 32 (threads, one client each), the gateway's CPU time
per request, then ratios.

    python bench/inference_bench.py [--seconds 3] [--requests 1000] [--rounds 3]
"""

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gpulab.inference.triton import TritonServer, write_onnx_model
from gpulab.net import free_port
from tests.support.gpulab_up import Platform
from tests.support.triton import linear_onnx, triton_python

BIG = 262_144  # FP32 elements: 1 MiB


def sum_onnx(path: Path) -> None:
    """``y = sum(x)`` over a [1, BIG] FP32 input."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=1)], "sum",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, BIG])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])],
        [numpy_helper.from_array(np.array([1], np.int64), "axes")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))


def request(model: str) -> list:
    shape = [1, 4] if model == "small" else [1, BIG]
    tensor = triton.InferInput("x", shape, "FP32")
    tensor.set_data_from_numpy(np.random.default_rng(0).standard_normal(shape).astype(np.float32))
    return [tensor]


def sequential(address: str, headers: dict, model: str, count: int) -> dict:
    client, inputs = triton.InferenceServerClient(address), request(model)
    for _ in range(min(100, count)):  # warm up
        client.infer(model, inputs, headers=headers)
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        client.infer(model, inputs, headers=headers)
        latencies.append(time.perf_counter() - started)
    latencies.sort()
    return {"p50": latencies[len(latencies) // 2] * 1e3, "p99": latencies[int(len(latencies) * 0.99)] * 1e3,
            "c1": count / sum(latencies)}


def concurrent(address: str, headers: dict, model: str, threads: int, seconds: float) -> float:
    done, stop = [0] * threads, threading.Event()

    def work(i: int) -> None:
        client, inputs = triton.InferenceServerClient(address), request(model)
        while not stop.is_set():
            client.infer(model, inputs, headers=headers)
            done[i] += 1

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    time.sleep(0.5)  # warm up
    start_count, started = sum(done), time.perf_counter()
    time.sleep(seconds)
    rps = (sum(done) - start_count) / (time.perf_counter() - started)
    stop.set()
    for w in workers:
        w.join()
    return rps


class GatewayProbe:
    """CPU time and forwarded requests of the gateway process."""

    def __init__(self, hub: Platform):
        self.proc = next(p for p in hub.descendants() if "gpulab.services.infer" in " ".join(p.cmdline()))
        self.metrics_url = f"{hub.url}/services/gpulab-infer/metrics"

    def sample(self) -> tuple[float, float]:
        text = urllib.request.urlopen(self.metrics_url, timeout=5).read().decode()
        forwarded = sum(float(line.split()[-1]) for line in text.splitlines()
                        if line.startswith("gpulab_infer_replica_requests_total{"))
        return sum(self.proc.cpu_times()[:2]), forwarded


def measure(address: str, headers: dict, model: str, count: int, seconds: float, probe) -> dict:
    """One round for one target; with a ``probe``, the gateway's CPU time per request."""
    before = probe.sample() if probe else None
    row = sequential(address, headers, model, count)
    for threads in (8, 32):
        row[f"c{threads}"] = concurrent(address, headers, model, threads, seconds)
    if probe:
        after = probe.sample()
        row["cpu_us"] = (after[0] - before[0]) / (after[1] - before[1]) * 1e6
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per throughput measurement")
    parser.add_argument("--requests", type=int, default=1000, help="sequential requests per round (small tensor)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating direct/gateway rounds; medians reported")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gpulab-bench-"))
    linear_onnx(work / "small.onnx")
    sum_onnx(work / "big.onnx")
    for name in ("small", "big"):
        write_onnx_model(work / "repo", name, work / f"{name}.onnx")
    server = TritonServer(python=triton_python(), model_repository=str(work / "repo"),
                          log_path=str(work / "triton.log")).start()
    hub = Platform(work / "data", host="127.0.0.21")
    gateway = f"127.0.0.1:{free_port()}"
    service = {"name": "gpulab-infer", "command": [sys.executable, "-m", "gpulab.services.infer"],
               "environment": {"GPULAB_INFER_ADDRESS": gateway, "GPULAB_TRITON_KEY": server.restricted_key,
                               "GPULAB_TRITON_REPLICAS": server.grpc_address, "GPULAB_CONFIG": str(hub.config_file)}}
    try:
        hub.start("c.Platform.mlflow_service = False\nc.Platform.jobs_service = False\n", services=[service])
        hub.create_user("bench")
        targets = {"direct": (server.grpc_address, server.grpc_headers),
                   "gateway": (gateway, {"authorization": f"token {hub.token('bench')}"})}
        deadline = time.monotonic() + 30
        while True:
            try:
                triton.InferenceServerClient(gateway).infer("small", request("small"), headers=targets["gateway"][1])
                break
            except InferenceServerException:  # the service is still starting
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        probe = GatewayProbe(hub)
        print(f"{'model':6} {'target':8} {'p50 ms':>8} {'p99 ms':>8} {'c=1 /s':>8} {'c=8 /s':>8} {'c=32 /s':>8}"
              f" {'gw cpu/req':>10}")
        for model, count in (("small", args.requests), ("big", max(args.requests // 10, 50))):
            rounds = {"direct": [], "gateway": []}
            for i in range(args.rounds):
                for target in (("direct", "gateway") if i % 2 == 0 else ("gateway", "direct")):
                    address, headers = targets[target]
                    rounds[target].append(measure(address, headers, model, count, args.seconds,
                                                  probe if target == "gateway" else None))
            rows = {t: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for t, rs in rounds.items()}
            for target, row in rows.items():
                cpu = f"{row['cpu_us']:8.0f} us" if "cpu_us" in row else ""
                print(f"{model:6} {target:8} {row['p50']:8.3f} {row['p99']:8.3f} {row['c1']:8.0f} {row['c8']:8.0f} "
                      f"{row['c32']:8.0f} {cpu:>10}")
            d, g = rows["direct"], rows["gateway"]
            print(f"{model:6} gateway vs direct: p50 {g['p50'] - d['p50']:+.3f} ms; throughput "
                  f"c=1 {g['c1'] / d['c1']:.2f}x, c=8 {g['c8'] / d['c8']:.2f}x, c=32 {g['c32'] / d['c32']:.2f}x",
                  flush=True)
        print(f"(medians of {args.rounds} alternating rounds; {args.seconds:g} s per throughput run; client, gateway "
              f"and Triton share {os.cpu_count()} cores)")
    finally:
        hub.stop()
        server.stop()


if __name__ == "__main__":
    main()
