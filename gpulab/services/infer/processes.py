"""More gateway processes on one gRPC port (``c.InferenceGateway.processes``).

The first process (the hub-managed service) starts the others with ``GPULAB_INFER_PROCESS=<index>``;
all listen on the same address with ``SO_REUSEPORT``, so the kernel gives each new connection to one
of them. The first also serves the HTTP API and restarts extra processes that exit (its supervisor). Each extra process
serves its own metrics on a unix socket the first one binds, in a directory of its own (0700), and hands
over, so no other local account reads them; the first one's
``/metrics`` merges them, labelled ``process="<index>"``. An extra process whose parent is gone stops.
"""

import asyncio
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import aiohttp
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from tornado.netutil import bind_unix_socket

from ...service.supervisor import Child

PROCESS_ENV = "GPULAB_INFER_PROCESS"
METRICS_FD_ENV = "GPULAB_INFER_METRICS_FD"


def process_index() -> int:
    """0 in the hub-managed process, 1.. in the extra ones."""
    return int(os.environ.get(PROCESS_ENV, "0"))


class Workers:
    """The extra processes, as :class:`Child` processes for the service's :class:`Supervisor`; each serves its
    metrics on a socket of its own in ``run_dir``."""

    def __init__(self, count: int):
        self.run_dir = Path(tempfile.mkdtemp(prefix="gpulab-infer-"))  # their metrics sockets
        self.children = [
            Child(f"gateway process {index}", functools.partial(self._spawn, index)) for index in range(1, count + 1)
        ]

    def _spawn(self, index: int) -> subprocess.Popen:
        sock = bind_unix_socket(str(self._socket(index)))
        try:
            env = {**os.environ, PROCESS_ENV: str(index), METRICS_FD_ENV: str(sock.fileno())}
            return subprocess.Popen([sys.executable, "-m", "gpulab.services.infer"], env=env, pass_fds=[sock.fileno()])
        finally:
            sock.close()

    def _socket(self, index: int) -> Path:
        return self.run_dir / f"process-{index}.sock"

    def remove(self) -> None:
        """Remove the sockets' directory (the processes stopped)."""
        shutil.rmtree(self.run_dir, ignore_errors=True)

    async def metrics(self) -> dict[str, str]:
        """Each live extra process's metrics text, by index (a process that does not answer is left out)."""
        live = [i for i, child in enumerate(self.children, 1) if child.proc and child.proc.poll() is None]
        texts = await asyncio.gather(*(fetch_metrics(self._socket(i)) for i in live))
        return {str(i): text for i, text in zip(live, texts) if text is not None}


async def fetch_metrics(path: Path) -> str | None:
    """The metrics text served on the unix socket ``path``, or None when nothing answers there."""
    try:
        async with (
            aiohttp.ClientSession(connector=aiohttp.UnixConnector(str(path))) as session,
            session.get("http://localhost/metrics", timeout=aiohttp.ClientTimeout(total=2)) as response,
        ):
            response.raise_for_status()
            return await response.text()
    except (aiohttp.ClientError, OSError, TimeoutError):
        return None


async def parent_gone() -> None:
    """Returns once the process that started this one has exited."""
    parent = os.getppid()
    while os.getppid() == parent:
        await asyncio.sleep(1)


class _Families:
    def __init__(self, families):
        self.families = families

    def collect(self):
        return self.families


def merge_metrics(texts: dict[str, str]) -> bytes:
    """Prometheus text of several processes as one exposition, each sample labelled with its ``process``."""
    families: dict[str, Metric] = {}
    for process, text in texts.items():
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            merged.samples += [s._replace(labels={**s.labels, "process": process}) for s in family.samples]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families.values())))
    return generate_latest(registry)
