"""``python -m gpulab.inference.serve``: the embedded Triton server, run by the hub as a managed service.

Triton listens on unix sockets in ``$GPULAB_TRITON_SOCKETS``, a directory of the service account's alone
(made 0700), so only the gateway, and no user's account, can call it; there is no TCP port and no key on its
command line. It serves ``$GPULAB_MODEL_REPOSITORY``. Triton logs to ``$GPULAB_TRITON_LOG`` (default ``triton.log`` beside the
repository). If Triton exits, the end of its log is printed and it is started again on the same ports
(after 1 s, doubling up to 30 s while it keeps failing within a minute); SIGTERM stops it. The sockets
keep their paths across restarts.
"""

import os
import signal
import sys
import threading
import time
from pathlib import Path

from ..config import load_config
from .triton import TritonServer


def main() -> int:
    env = os.environ
    repository = Path(env["GPULAB_MODEL_REPOSITORY"])
    repository.mkdir(parents=True, exist_ok=True)
    log = Path(env.get("GPULAB_TRITON_LOG") or repository.parent / "triton.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    server = TritonServer(
        config=load_config(),
        model_repository=str(repository),
        socket_dir=env["GPULAB_TRITON_SOCKETS"],
        log_path=str(log),
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    delay = 0.5  # doubled before the first wait
    try:
        while not stop.is_set():
            started = time.monotonic()
            try:
                server.start(timeout=180)
            except RuntimeError as e:
                print(f"triton: {e}", file=sys.stderr, flush=True)
            else:
                print(f"triton: serving {repository} on gRPC {server.grpc_address}", flush=True)
                while not stop.wait(1.0) and server.proc.poll() is None:
                    pass
                if stop.is_set():
                    break
                print(f"triton: tritonserver exited with {server.proc.returncode}; its log ends:\n"
                      f"{server.log_tail(20)}", file=sys.stderr, flush=True)
            server.stop()
            delay = 1.0 if time.monotonic() - started > 60 else min(delay * 2, 30.0)
            print(f"triton: starting it again in {delay:.0f} s", file=sys.stderr, flush=True)
            stop.wait(delay)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
