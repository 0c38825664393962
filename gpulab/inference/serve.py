"""``python -m gpulab.inference.serve``: the embedded Triton server, run by the hub as a managed service.

The hub config picks its ports and key and hands them over in ``GPULAB_TRITON_GRPC_PORT``,
``GPULAB_TRITON_HTTP_PORT``, ``GPULAB_TRITON_METRICS_PORT``, ``GPULAB_TRITON_KEY`` and
``GPULAB_MODEL_REPOSITORY``; SIGTERM stops Triton, and if Triton dies this process exits so the
hub restarts both.
"""

import os
import signal
import sys
import threading
from pathlib import Path

from ..config import load_config
from .triton import TritonServer


def main() -> int:
    env = os.environ
    repository = Path(env["GPULAB_MODEL_REPOSITORY"])
    repository.mkdir(parents=True, exist_ok=True)
    server = TritonServer(
        config=load_config(),
        model_repository=str(repository),
        grpc_port=int(env["GPULAB_TRITON_GRPC_PORT"]),
        http_port=int(env["GPULAB_TRITON_HTTP_PORT"]),
        metrics_port=int(env["GPULAB_TRITON_METRICS_PORT"]),
        restricted_key=env["GPULAB_TRITON_KEY"],
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server.start(timeout=180)
    print(f"triton: serving {repository} on gRPC {server.grpc_address}", flush=True)
    try:
        while not stop.wait(1.0):
            if server.proc.poll() is not None:
                print(f"triton: tritonserver exited with {server.proc.returncode}", file=sys.stderr, flush=True)
                return 1
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
