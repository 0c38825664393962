"""``python -m gpulab.inference.serve``: the embedded Triton server, run by the hub as a managed service.

Triton listens on unix sockets in ``$GPULAB_TRITON_SOCKETS``, a directory of the service account's alone
(made 0700), so only the gateway, and no user's account, can call it; there is no TCP port and no key on its
command line. It serves ``$GPULAB_MODEL_REPOSITORY``. Triton logs to ``$GPULAB_TRITON_LOG`` (default
``triton.log`` beside the repository). The service's :class:`~gpulab.service.supervisor.Supervisor` starts it
again on the same sockets if it exits (logging its exit status and the end of its log); SIGTERM stops it.
"""

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from ..config import load_config
from ..service.logs import setup_logging
from ..service.supervisor import Child, Supervisor, wait_until
from .triton import TritonServer

log = logging.getLogger("gpulab.triton")
READY_TIMEOUT = 180.0  # loading the repository's models


async def serve(server: TritonServer) -> None:
    """Keep ``server`` running until SIGTERM or SIGINT."""

    async def ready() -> bool:
        return await asyncio.to_thread(server.ready)

    child = Child(
        "tritonserver",
        server.launch,
        lambda proc: wait_until(ready, proc, READY_TIMEOUT, "tritonserver", lambda: server.log_tail(20)),
        log_tail=lambda: server.log_tail(20),
        group=True,
    )
    supervisor = Supervisor(log)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    if await supervisor.start(child, retry=True):  # a model that does not load, say: tried again, backing off
        log.info("serving %s on gRPC %s", server.model_repository, server.grpc_address)
    watch = asyncio.create_task(supervisor.run())
    await stop.wait()
    watch.cancel()
    await supervisor.stop(timeout=10)
    server.stop()  # its backend directory


def main() -> int:
    setup_logging()
    env = os.environ
    repository = Path(env["GPULAB_MODEL_REPOSITORY"])
    repository.mkdir(parents=True, exist_ok=True)
    triton_log = Path(env.get("GPULAB_TRITON_LOG") or repository.parent / "triton.log")
    triton_log.parent.mkdir(parents=True, exist_ok=True)
    asyncio.run(
        serve(
            TritonServer(
                config=load_config(),
                model_repository=str(repository),
                socket_dir=env["GPULAB_TRITON_SOCKETS"],
                log_path=str(triton_log),
            )
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
