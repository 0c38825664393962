"""Inference gateway overhead: stock ``tritonclient.grpc`` straight to Triton vs through ``gpulab-infer``.

One Triton (the bundled 2.51 binary, Python-backend ONNX models), one real platform (hub + gateway as a
hub-managed service), one client process. For a [1,4] FP32 tensor and a 1 MiB one: sequential latency
(p50, p99) and throughput at concurrency 1, 8 and 32 (threads, one client each), then ratios.

    python bench/inference_bench.py [--seconds 5] [--requests 2000]
"""

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as triton

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
    for _ in range(min(200, count)):  # warm up
        client.infer(model, inputs, headers=headers)
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        client.infer(model, inputs, headers=headers)
        latencies.append(time.perf_counter() - started)
    latencies.sort()
    return {"p50": latencies[len(latencies) // 2] * 1e3, "p99": latencies[int(len(latencies) * 0.99)] * 1e3,
            "rps": count / sum(latencies)}


def concurrent(address: str, headers: dict, model: str, threads: int, seconds: float) -> float:
    done, stop = [0] * threads, threading.Event()

    def work(i: int) -> None:
        client, inputs = triton.InferenceServerClient(address), request(model)
        client.infer(model, inputs, headers=headers)
        while not stop.is_set():
            client.infer(model, inputs, headers=headers)
            done[i] += 1

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    time.sleep(1)  # warm up
    start_count, started = sum(done), time.perf_counter()
    time.sleep(seconds)
    rps = (sum(done) - start_count) / (time.perf_counter() - started)
    stop.set()
    for w in workers:
        w.join()
    return rps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per throughput measurement")
    parser.add_argument("--requests", type=int, default=2000, help="sequential requests (small tensor)")
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
                               "GPULAB_CONFIG": str(hub.config_file)}}
    config = (f"c.Platform.mlflow_service = False\nc.Platform.jobs_service = False\n"
              f"c.InferenceGateway.replicas = [{server.grpc_address!r}]\n")
    try:
        hub.start(config, services=[service])
        hub.create_user("bench")
        targets = {"direct": (server.grpc_address, server.grpc_headers),
                   "gateway": (gateway, {"authorization": f"token {hub.token('bench')}"})}
        deadline = time.monotonic() + 30
        while True:
            try:
                triton.InferenceServerClient(gateway).infer("small", request("small"), headers=targets["gateway"][1])
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        print(f"{'model':6} {'target':8} {'p50 ms':>8} {'p99 ms':>8} {'c=1 /s':>8} {'c=8 /s':>8} {'c=32 /s':>8}")
        rows = {}
        for model, count in (("small", args.requests), ("big", max(args.requests // 10, 100))):
            for target in ("direct", "gateway"):
                address, headers = targets[target]
                row = sequential(address, headers, model, count)
                for threads in (8, 32):
                    row[f"c{threads}"] = concurrent(address, headers, model, threads, args.seconds)
                rows[model, target] = row
                print(f"{model:6} {target:8} {row['p50']:8.3f} {row['p99']:8.3f} {row['rps']:8.0f} "
                      f"{row['c8']:8.0f} {row['c32']:8.0f}", flush=True)
            d, g = rows[model, "direct"], rows[model, "gateway"]
            print(f"{model:6} {'ratio':8} +{g['p50'] - d['p50']:.3f} ms p50; throughput gateway/direct: "
                  f"c=1 {g['rps'] / d['rps']:.2f}, c=8 {g['c8'] / d['c8']:.2f}, c=32 {g['c32'] / d['c32']:.2f}")
        print(f"({args.seconds:g} s per throughput run; client, gateway and Triton share {os.cpu_count()} cores)")
    finally:
        hub.stop()
        server.stop()


if __name__ == "__main__":
    main()
