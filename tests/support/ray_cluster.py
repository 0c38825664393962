"""A real local Ray cluster for tests: a head node and an optional second node with a fake GPU.

Every port is chosen here (outside Ray's worker port range 10002-19999) so that several clusters
can run side by side; processes are stopped by PID, never by name.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil

from gpulab.net import free_port
from tests.support.processes import alive, kill_after

GPU_RESOURCE = "gpu_worker"
_WORKER_PORTS = range(10002, 20000)


def _port() -> int:
    while (port := free_port()) in _WORKER_PORTS:
        pass
    return port


def _node_ports() -> list[str]:
    """Ports every node opens; Ray's fixed defaults (e.g. the agent's 52365) collide between nodes."""
    return [
        arg
        for flag in (
            "--node-manager-port",
            "--object-manager-port",
            "--dashboard-agent-listen-port",
            "--dashboard-agent-grpc-port",
            "--runtime-env-agent-port",
            "--metrics-export-port",
        )
        for arg in (flag, str(_port()))
    ]


class RayCluster:
    """``RayCluster.start(workdir)``; ``address`` is the dashboard URL; ``stop()`` or use ``with``."""

    def __init__(self, workdir: Path, gpu_node: bool = True):
        self.workdir = Path(workdir)
        self.gpu_node = gpu_node
        self.gcs_port = _port()
        self.dashboard_port = _port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        # Ray's unix socket paths live under the temp dir and must stay short (< 108 bytes).
        self.temp_dir = Path(f"/tmp/ray-{os.urandom(3).hex()}")
        self.procs: list[subprocess.Popen] = []  # head first
        self.known: dict[int, psutil.Process] = {}  # every process seen in this cluster's trees
        self.startup_seconds: float | None = None

    @classmethod
    def start(cls, workdir: Path, gpu_node: bool = True, timeout: float = 90, attempts: int = 2) -> "RayCluster":
        """Start the cluster; a start that times out on a loaded machine is tried once more on fresh ports."""
        for attempt in range(1, attempts + 1):
            cluster = cls(Path(workdir) / f"try-{attempt}", gpu_node)
            try:
                cluster._start(timeout)
                return cluster
            except BaseException:
                cluster.stop()
                if attempt == attempts:
                    raise

    def _env(self) -> dict:
        return {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}

    def _spawn(self, name: str, args: list[str]) -> None:
        ray = str(Path(sys.executable).with_name("ray"))
        log = (self.workdir / f"ray-{name}.log").open("ab")
        self.procs.append(
            subprocess.Popen(
                [
                    ray,
                    "start",
                    "--block",
                    "--node-ip-address",
                    "127.0.0.1",
                    "--num-cpus",
                    "2",
                    "--object-store-memory",
                    str(100 * 2**20),
                    *_node_ports(),
                    *args,
                ],
                env=self._env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        )
        log.close()

    def _start(self, timeout: float) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        deadline = started + timeout
        self._spawn(
            "head",
            [
                "--head",
                "--port",
                str(self.gcs_port),
                "--temp-dir",
                str(self.temp_dir),
                "--ray-client-server-port",
                str(_port()),
                "--dashboard-host",
                "127.0.0.1",
                "--dashboard-port",
                str(self.dashboard_port),
                "--num-gpus",
                "0",
            ],
        )
        self._wait(lambda: self.alive_nodes() >= 1, deadline, "head node")
        if self.gpu_node:
            self._spawn(
                "gpu",
                [
                    "--address",
                    f"127.0.0.1:{self.gcs_port}",
                    "--num-gpus",
                    "1",
                    "--resources",
                    json.dumps({GPU_RESOURCE: 1}),
                ],
            )
            self._wait(lambda: self.alive_nodes() >= 2, deadline, "fake-GPU node")
        self._wait(self._jobs_api_ready, deadline, "jobs API")
        self.startup_seconds = time.monotonic() - started
        self._record()

    def _wait(self, ready, deadline: float, what: str) -> None:
        while time.monotonic() < deadline:
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"ray start exited with {proc.returncode} waiting for {what}:\n{self.log_tail()}"
                    )
            self._record()
            try:
                if ready():
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"ray cluster: {what} not ready in time:\n{self.log_tail()}")

    def get(self, path: str):
        with urllib.request.urlopen(self.address + path, timeout=5) as response:
            return json.load(response)

    def nodes(self) -> list[dict]:
        """The state API's node list: node_id, node_ip, state, resources_total, ..."""
        return self.get("/api/v0/nodes?limit=1000")["data"]["result"]["result"]

    def alive_nodes(self) -> int:
        return sum(node["state"] == "ALIVE" for node in self.nodes())

    def _jobs_api_ready(self) -> bool:
        self.get("/api/jobs/")
        return True

    def kill_raylet(self, node: int) -> None:
        """SIGKILL the raylet of node ``node`` (0: head), as if its machine died."""
        self._record()
        for p in psutil.Process(self.procs[node].pid).children(recursive=True):
            if p.name() == "raylet":
                p.kill()

    def _record(self) -> None:
        """Remember every process of the cluster's trees, so that stop() can reap orphans too."""
        for proc in self.procs:
            try:
                parent = psutil.Process(proc.pid)
                for p in [parent, *parent.children(recursive=True)]:
                    self.known.setdefault(p.pid, p)
            except psutil.NoSuchProcess:
                pass

    def leftovers(self) -> list[psutil.Process]:
        """Processes of this cluster still alive (same PID and start time as when recorded)."""
        return [p for p in self.known.values() if alive(p)]

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM each ``--block`` process (worker node first), SIGKILL what is left."""
        self._record()
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        kill_after(self.leftovers(), 5)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(
            f"[{path.name}] {line}"
            for path in sorted(self.workdir.glob("ray-*.log"))
            for line in path.read_text(errors="replace").splitlines()[-lines:]
        )

    def __enter__(self) -> "RayCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
