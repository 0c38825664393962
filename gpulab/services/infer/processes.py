"""More gateway processes on one gRPC port (``c.InferenceGateway.processes``).

The first process (the hub-managed service) starts the others with ``GPULAB_INFER_PROCESS=<index>``;
all listen on the same address with ``SO_REUSEPORT``, so the kernel gives each new connection to one
of them. The first also serves the HTTP API and restarts extra processes that exit. Each extra process
serves its own metrics on a unix socket the first one binds, in a directory of its own (0700), and hands
over, so no other local account reads them; the first one's
``/metrics`` merges them, labelled ``process="<index>"``. An extra process whose parent is gone stops.
"""

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from tornado.netutil import bind_unix_socket

PROCESS_ENV = "GPULAB_INFER_PROCESS"
METRICS_FD_ENV = "GPULAB_INFER_METRICS_FD"


def process_index() -> int:
    """0 in the hub-managed process, 1.. in the extra ones."""
    return int(os.environ.get(PROCESS_ENV, "0"))


class Workers:
    """The extra processes: started, restarted when they exit (backing off while they fail at once), stopped."""

    def __init__(self, count: int):
        self.count = count
        self.procs: dict[int, subprocess.Popen] = {}
        self.run_dir = Path(tempfile.mkdtemp(prefix="gpulab-infer-"))  # their metrics sockets
        self._started: dict[int, float] = {}
        self._delay: dict[int, float] = {}

    def start(self) -> None:
        for index in range(1, self.count + 1):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        sock = bind_unix_socket(str(self._socket(index)))
        try:
            env = {**os.environ, PROCESS_ENV: str(index), METRICS_FD_ENV: str(sock.fileno())}
            self.procs[index] = subprocess.Popen([sys.executable, "-m", "gpulab.services.infer"], env=env,
                                                 pass_fds=[sock.fileno()])
        finally:
            sock.close()
        self._started[index] = time.monotonic()

    def _socket(self, index: int) -> Path:
        return self.run_dir / f"process-{index}.sock"

    async def supervise(self) -> None:
        """Restart exited processes: at once after a good run, after 1, 2, 4 … 30 s while they fail within 10 s."""
        due: dict[int, float] = {}
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            for index, proc in self.procs.items():
                if proc.poll() is None:
                    continue
                if index not in due:
                    quick = now - self._started[index] < 10
                    self._delay[index] = min(30.0, self._delay.get(index, 0.5) * 2) if quick else 0.0
                    due[index] = now + self._delay[index]
                    print(f"gpulab-infer: process {index} (pid {proc.pid}) exited with status {proc.returncode}; "
                          f"restarting it in {self._delay[index]:.0f} s", flush=True)
                if now >= due[index]:
                    del due[index]
                    self._spawn(index)

    async def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL what is left after ``timeout``."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + timeout
        for proc in self.procs.values():
            try:
                await asyncio.to_thread(proc.wait, max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait)
        shutil.rmtree(self.run_dir, ignore_errors=True)

    async def metrics(self) -> dict[str, str]:
        """Each live extra process's metrics text, by index (a process that does not answer is left out)."""
        live = [i for i, p in self.procs.items() if p.poll() is None]
        texts = await asyncio.gather(*(fetch_metrics(self._socket(i)) for i in live))
        return {str(i): text for i, text in zip(live, texts) if text is not None}


async def fetch_metrics(path: Path) -> str | None:
    """The metrics text served on the unix socket ``path``, or None when nothing answers there."""
    try:
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(str(path))) as session, session.get(
                "http://localhost/metrics", timeout=aiohttp.ClientTimeout(total=2)) as response:
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
                merged = families[family.name] = Metric(family.name, family.documentation, family.type,
                                                        family.unit)
            merged.samples += [s._replace(labels={**s.labels, "process": process}) for s in family.samples]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families.values())))
    return generate_latest(registry)
