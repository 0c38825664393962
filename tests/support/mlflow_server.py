"""A real ``mlflow server`` for tests: SQLite store and served artifacts under a work dir, stopped by PID."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from gpulab.net import free_port


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 and a free port; ``url`` is its tracking URI."""

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.workdir / "mlflow-server.log"
        self.proc: subprocess.Popen | None = None
        self.startup_seconds: float | None = None

    @classmethod
    def start(cls, workdir: Path, timeout: float = 60) -> "MlflowServer":
        """Start a server and return it once ``/health`` answers."""
        server = cls(workdir)
        server.workdir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
        started = time.monotonic()
        server.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--backend-store-uri",
                f"sqlite:///{server.workdir / 'mlflow.db'}",
                "--artifacts-destination",
                str(server.workdir / "artifacts"),
                "--serve-artifacts",
                "--host",
                "127.0.0.1",
                "--port",
                str(server.port),
                "--workers",
                "1",
            ],
            env=env,
            stdout=server.log_path.open("ab"),
            stderr=subprocess.STDOUT,
        )
        deadline = started + timeout
        while time.monotonic() < deadline:
            if server.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {server.proc.returncode}:\n{server.log_tail()}")
            try:
                if requests.get(server.url + "/health", timeout=2).status_code == 200:
                    server.startup_seconds = time.monotonic() - started
                    return server
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        server.stop()
        raise RuntimeError(f"mlflow server did not answer in {timeout}s:\n{server.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM the server (its uvicorn worker follows), SIGKILL if it lingers."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
