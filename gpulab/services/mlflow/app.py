"""``python -m gpulab.services.mlflow``: :class:`MLflowApp`, ``mlflow server`` on its private socket and the
proxy in front of it (:mod:`gpulab.services.mlflow`), configured by ``c.MLflowService``."""

import asyncio
import logging
import os
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

from tornado.httpserver import HTTPServer

from ...net import private_sockets
from ...secrets import persistent_secret
from ...service.app import ServiceApp
from ...service.supervisor import Child, Supervisor
from . import MAX_BODY, auth_config, make_app, mlflow_command
from .config import MLflowService

log = logging.getLogger("gpulab.mlflow")


class MLflowApp(ServiceApp):
    name = "mlflow"
    description = "MLflow tracking behind hub authentication."
    classes = [MLflowService]

    def initialize(self, argv=None) -> None:
        """Settings, then the files MLflow needs (its socket's private directory, its auth config and secrets):
        made once at start-up, before the loop serves."""
        super().initialize(argv)
        self.hub.require("service_url", "api_token")
        self.settings = s = MLflowService(parent=self)
        mlflow_dir = self.data_dir / "mlflow"
        backend_uri = s.backend_store_uri or f"sqlite:///{mlflow_dir / 'mlflow.sqlite'}"
        artifacts = s.artifacts_destination or str(mlflow_dir / "artifacts")
        state = Path(artifacts).parent
        sock = Path(s.socket or state / "run" / "mlflow.sock")
        [self.socket] = private_sockets(sock.parent, [sock.name], "MLflowService.socket")
        sharing = self.platform.mlflow_sharing.lower()
        auth_db = s.auth_database_uri or f"sqlite:///{state / 'auth.sqlite'}"
        config = auth_config(self.socket.parent / "auth.ini", auth_db, sharing)
        self.command = mlflow_command(backend_uri, artifacts, self.socket, self.hub.prefix)
        self.mlflow_env = mlflow_environment(config, state, sharing)

    async def serve(self, stopping: asyncio.Event) -> None:
        s = self.settings
        mlflow = Child("mlflow server", lambda: subprocess.Popen(self.command, env=self.mlflow_env))
        supervisor = Supervisor(log)
        await supervisor.start(mlflow)
        # while MLflow starts or restarts the proxy answers 502
        app = make_app(self.socket, self.hub.prefix, s.jobs_api_url, frozenset(filter(None, s.delegates)))
        server = HTTPServer(app, max_body_size=MAX_BODY, xheaders=True)
        listen = urlsplit(self.hub.service_url)
        server.listen(listen.port, listen.hostname)
        watch = asyncio.create_task(supervisor.run())
        await stopping.wait()
        watch.cancel()
        server.stop()
        await supervisor.stop(timeout=20)


def mlflow_environment(auth_config_path: Path, state: Path, sharing: str) -> dict:
    """``mlflow server``'s environment: this service's, without the hub's and gpulab's variables (its hub token
    among them), with MLflow's auth settings and secrets (made on the first start)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTERHUB_", "GPULAB_"))}
    env.update(
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
        MLFLOW_DISABLE_TELEMETRY="true",
        MLFLOW_AUTH_CONFIG_PATH=str(auth_config_path),
        GPULAB_MLFLOW_SHARING=sharing,  # for gpulab's authorization function, in mlflow server
        # MLflow's own admin, made on the first start; nobody signs in as it (the proxy never names it)
        MLFLOW_AUTH_ADMIN_PASSWORD=persistent_secret(state / "auth-admin-password"),
        MLFLOW_FLASK_SERVER_SECRET_KEY=persistent_secret(state / "flask-secret-key"),
    )
    return env
