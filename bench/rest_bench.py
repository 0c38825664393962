"""KServe v2 REST on the inference gateway vs direct gRPC, measured with Triton's perf_analyzer on both sides.

``bench/inference_bench.py`` drives REST with Python's ``requests``, whose own cost (about 0.85 ms of CPU per
call) is several times a gRPC client's, so on a small machine it measures the client. perf_analyzer (C++, the
load generator Triton's users measure with) speaks both protocols at about the same cost. One Triton (the
bundled 2.51 binary, Python-backend ONNX models), one real platform (hub, proxy, ``gpulab-infer`` on its default
data plane); for a [1,4] FP32 tensor and a 1 MiB one, at each concurrency:

- ``grpc-direct``: ``perf_analyzer -i grpc`` straight to Triton with the platform key (the baseline);
- ``grpc-gateway``: the same through the gateway's gRPC port with a hub token;
- ``http-direct``: ``-i http`` straight to Triton's HTTP port (REST's own ceiling);
- ``http-gateway``: ``-i http`` on the gateway's REST port with a hub token.

perf_analyzer sends tensors in binary on HTTP (the binary tensor extension) and reports p50 latency and
throughput; each figure is the median over rounds run in rotating target order.

    python bench/rest_bench.py [--rounds 2] [--concurrency 1,8,32] [--interval-ms 2000]
"""

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from inference_bench import bench_user, start  # noqa: E402

from tests.support.triton import perf_analyzer  # noqa: E402

TARGETS = ("grpc-direct", "grpc-gateway", "http-direct", "http-gateway")
RATIOS = (
    ("grpc-gateway", "grpc-direct"),
    ("http-gateway", "grpc-direct"),
    ("http-gateway", "http-direct"),
    ("http-direct", "grpc-direct"),
)


def run(
    binary: str, target: str, urls: dict, headers: dict, model: str, concurrency: int, interval_ms: int, work: Path
) -> dict:
    """One perf_analyzer measurement: throughput (/s) and p50 latency (ms)."""
    report = work / f"{target}-{model}-{concurrency}.csv"
    protocol = target.split("-")[0]
    command = [
        binary,
        "-m",
        model,
        "-i",
        protocol,
        "-u",
        urls[target],
        "--concurrency-range",
        f"{concurrency}:{concurrency}",
        "-p",
        str(interval_ms),
        "--max-trials",
        "3",
        "-s",
        "999",
        "-f",
        str(report),
    ]
    command += [arg for name, value in headers[target].items() for arg in ("-H", f"{name}:{value}")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
        raise RuntimeError(
            f"perf_analyzer failed for {target} {model} c={concurrency}:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
        )
    with report.open() as file:
        row = next(csv.DictReader(file))
    return {"rps": float(row["Inferences/Second"]), "p50": float(row["p50 latency"]) / 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="rounds in rotating target order; medians reported")
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated concurrencies")
    parser.add_argument("--interval-ms", type=int, default=2000, help="perf_analyzer's measurement interval")
    args = parser.parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    binary = perf_analyzer()
    work = Path(tempfile.mkdtemp(prefix="gpulab-rest-bench-"))
    server, hub = start(work)
    try:
        token, info = bench_user(hub)
        urls = {
            "grpc-direct": server.grpc_address,
            "grpc-gateway": info["grpc_address"],
            "http-direct": server.http_url.removeprefix("http://"),
            "http-gateway": info["rest_address"],
        }
        user = {"authorization": f"token {token}"}
        headers = {
            "grpc-direct": server.grpc_headers,
            "grpc-gateway": user,
            "http-direct": server.http_headers,
            "http-gateway": user,
        }
        print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} cores)")
        print(f"{'model':6} {'target':13} " + " ".join(f"{f'c={c} /s':>9} {'p50 ms':>7}" for c in concurrencies))
        for model in ("small", "big"):
            for target in TARGETS:  # warm up: the gateway's token cache, connections, the model
                run(binary, target, urls, headers, model, 1, 500, work)
            rounds = {t: {c: [] for c in concurrencies} for t in TARGETS}
            for i in range(args.rounds):
                for target in TARGETS[i % len(TARGETS) :] + TARGETS[: i % len(TARGETS)]:
                    for c in concurrencies:
                        rounds[target][c].append(run(binary, target, urls, headers, model, c, args.interval_ms, work))
            rows = {
                t: {c: {k: statistics.median(r[k] for r in runs) for k in ("rps", "p50")} for c, runs in by_c.items()}
                for t, by_c in rounds.items()
            }
            for target, row in rows.items():
                print(
                    f"{model:6} {target:13} "
                    + " ".join(f"{row[c]['rps']:9.0f} {row[c]['p50']:7.3f}" for c in concurrencies)
                )
            for target, base in RATIOS:
                t, b = rows[target], rows[base]
                print(
                    f"{model:6} {target} vs {base}: "
                    + "; ".join(
                        f"c={c} {t[c]['rps'] / b[c]['rps']:.2f}x, p50 {t[c]['p50'] - b[c]['p50']:+.3f} ms"
                        for c in concurrencies
                    ),
                    flush=True,
                )
        print(
            f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; medians of {args.rounds} "
            f"rounds; perf_analyzer, hub, proxy, gateway and Triton share {os.cpu_count()} cores"
        )
    finally:
        hub.stop()
        server.stop()


if __name__ == "__main__":
    main()
