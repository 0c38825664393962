"""``python -m gpulab.inference.serve``: the embedded Triton server, run by the hub as a managed service.

Triton listens on unix sockets in ``c.TritonServer.socket_dir``, a directory of the service account's alone
(made 0700), so only the gateway, and no user's account, can call it; there is no TCP port and no key on its
command line. It serves ``c.TritonServer.model_repository`` (default ``<data dir>/models``) and logs to
``log_path`` (default ``triton.log`` beside the repository); the hub sets all three for the service. The
service's :class:`~gpulab.service.supervisor.Supervisor` starts it again on the same sockets if it exits (logging
its exit status and the end of its log); SIGTERM stops it.
"""

import asyncio
import logging
from pathlib import Path

from ..errors import ConfigError
from ..service.app import ServiceApp
from ..service.supervisor import Child, Supervisor, wait_until
from .triton import TritonServer

log = logging.getLogger("gpulab.triton")
READY_TIMEOUT = 180.0  # loading the repository's models


async def serve(server: TritonServer, stopping: asyncio.Event) -> None:
    """Keep ``server`` running until ``stopping`` is set."""

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
    if await supervisor.start(child, retry=True):  # a model that does not load, say: tried again, backing off
        log.info("serving %s on gRPC %s", server.model_repository, server.grpc_address)
    watch = asyncio.create_task(supervisor.run())
    await stopping.wait()
    watch.cancel()
    await supervisor.stop(timeout=10)
    server.stop()  # its backend directory


class TritonApp(ServiceApp):
    """The embedded Triton: ``c.TritonServer``, with the repository, sockets and log the hub gives it."""

    name = "triton"
    description = "The embedded Triton Inference Server."
    classes = [TritonServer]

    def initialize(self, argv=None) -> None:
        super().initialize(argv)
        self.server = server = TritonServer(parent=self)
        if not server.socket_dir:
            raise ConfigError("TritonServer.socket_dir is not set: the embedded Triton serves unix sockets only")
        repository = Path(server.model_repository or self.data_dir / "models")
        repository.mkdir(parents=True, exist_ok=True)
        server.model_repository = str(repository)
        log_path = Path(server.log_path or repository.parent / "triton.log")
        log_path.parent.mkdir(parents=True, exist_ok=True)
        server.log_path = str(log_path)

    async def serve(self, stopping: asyncio.Event) -> None:
        await serve(self.server, stopping)


if __name__ == "__main__":
    TritonApp.launch_instance()
