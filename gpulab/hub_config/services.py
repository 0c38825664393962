"""Hub-managed services from config: each gets an address and a persistent API token."""

import os
import sys
from pathlib import Path

from ..accounts import Account, hand_over
from ..attestation.nras import ENV_VAR as NRAS_KEY_VAR
from ..errors import ConfigError
from ..inference.triton import TritonServer
from ..net import free_port, socket_path
from ..scopes import INFER_SERVICE, JOBS_SERVICE, MLFLOW_SERVICE, TRITON_SERVICE


def managed_services(platform, data_dir: Path, token_for) -> list[dict]:
    """``c.JupyterHub.services`` for ``Platform.services``.

    A service with a ``command`` and no ``url`` is given a free port on 127.0.0.1;
    every service without an ``api_token`` gets one from ``token_for(name)``.
    """
    out = []
    for spec in platform.services:
        service = dict(spec)
        name = service.get("name")
        if not name:
            raise ConfigError(f"Platform.services: a service needs a name: {sorted(spec)}")
        if service.get("command") and not service.get("url"):
            service["url"] = f"http://127.0.0.1:{free_port()}"
        service.setdefault("api_token", token_for(name))
        if service.get("url"):
            service.setdefault("oauth_no_confirm", True)
        out.append(service)
    return out


def builtin_services(platform, data_dir: Path, config_file: Path, token_for, gateway=None) -> list[dict]:
    """The platform's own services: ``gpulab-jobs`` and ``mlflow`` (each can be turned off).

    Of the services, only gpulab-jobs (which holds the attestation service) gets the hub's
    ``$GPULAB_NRAS_API_KEY``; user servers never do (it is not in ``Spawner.env_keep``).
    """
    out = []
    nras_key = os.environ.get(NRAS_KEY_VAR, "")
    env = {"GPULAB_CONFIG": str(config_file), "GPULAB_DATA_DIR": str(data_dir)}
    jobs_url = f"http://127.0.0.1:{free_port()}"
    if platform.mlflow_service:
        url = f"http://127.0.0.1:{free_port()}"
        mlflow_dir = data_dir / "mlflow"
        mlflow_env = {
            **env,
            "GPULAB_MLFLOW_BACKEND_URI": f"sqlite:///{mlflow_dir / 'mlflow.sqlite'}",
            "GPULAB_MLFLOW_ARTIFACTS": str(mlflow_dir / "artifacts"),
            "GPULAB_MLFLOW_SOCKET": str(mlflow_dir / "run" / "mlflow.sock"),
            "GPULAB_MLFLOW_SHARING": platform.mlflow_sharing.lower(),
        }
        if platform.jobs_service:  # where running jobs' tokens are checked
            mlflow_env["GPULAB_JOBS_URL"] = f"{jobs_url}/services/{JOBS_SERVICE}/api/v1"
        out.append(
            {
                "name": MLFLOW_SERVICE,
                "display": True,
                "command": [sys.executable, "-m", "gpulab.services.mlflow"],
                "url": url,
                "api_token": token_for(MLFLOW_SERVICE),
                "oauth_no_confirm": True,
                "environment": mlflow_env,
            }
        )
        # services and jobs log to MLflow through its service, with a credential, like users do
        env["GPULAB_MLFLOW_URL"] = f"{url}/services/{MLFLOW_SERVICE}"
    if platform.jobs_service:
        out.append(
            {
                "name": JOBS_SERVICE,
                "command": [sys.executable, "-m", "gpulab.services.jobs"],
                "url": jobs_url,
                "api_token": token_for(JOBS_SERVICE),
                "oauth_no_confirm": True,
                "environment": {**env, NRAS_KEY_VAR: nras_key} if nras_key else env,
            }
        )
    if platform.inference_service:
        out += inference_services(data_dir, env, token_for, gateway or {})
    return out


def inference_services(data_dir: Path, env: dict, token_for, gateway: dict) -> list[dict]:
    """``gpulab-infer`` (the inference gateway: gRPC, and KServe v2 REST unless ``rest_address`` is "") and,
    unless Triton replicas are configured, an embedded Triton. ``gateway``: the InferenceGateway config."""
    out = []
    address = gateway.get("address") or f"127.0.0.1:{free_port()}"
    rest_address = gateway.get("rest_address")
    if rest_address is None:  # a REST port where the replicas' HTTP endpoints are known
        rest_address = f"127.0.0.1:{free_port()}" if gateway.get("http_replicas") or not gateway.get("replicas") else ""
    gateway_env = {**env, "GPULAB_INFER_ADDRESS": address, "GPULAB_INFER_REST_ADDRESS": rest_address}
    if gateway.get("replicas"):  # Tritons of the admin's, on TCP: they take the key
        gateway_env["GPULAB_TRITON_KEY"] = token_for("triton-restricted-key")
    else:  # the embedded Triton, on unix sockets only the service account reaches
        triton = TritonServer(socket_dir=str(data_dir / "triton"))
        for path in (triton.grpc_address, triton.http_address):
            socket_path(Path(path.removeprefix("unix:")), "Platform.data_dir")
        repository = str(data_dir / "models")
        out.append(
            {
                "name": TRITON_SERVICE,
                "command": [sys.executable, "-m", "gpulab.inference.serve"],
                "api_token": token_for(TRITON_SERVICE),
                "environment": {
                    **env,
                    "GPULAB_MODEL_REPOSITORY": repository,
                    "GPULAB_TRITON_SOCKETS": triton.socket_dir,
                    "GPULAB_TRITON_LOG": str(data_dir / "logs" / "triton.log"),
                },
            }
        )
        gateway_env.update(
            GPULAB_TRITON_REPLICAS=triton.grpc_address,
            GPULAB_TRITON_HTTP_REPLICAS=triton.http_address,
            GPULAB_MODEL_REPOSITORY=repository,
        )
    out.append(
        {
            "name": INFER_SERVICE,
            "command": [sys.executable, "-m", "gpulab.services.infer"],
            "url": f"http://127.0.0.1:{free_port()}",
            "api_token": token_for(INFER_SERVICE),
            "oauth_no_confirm": True,
            "info": {"grpc_address": address, **({"rest_address": rest_address} if rest_address else {})},
            "environment": gateway_env,
        }
    )
    return out


# what they write, below the data dir: theirs alone
SERVICE_ACCOUNT_DIRS = {
    MLFLOW_SERVICE: ["mlflow"],
    INFER_SERVICE: ["models"],
    TRITON_SERVICE: ["models", "logs", "triton"],
}


def run_as_service_account(services: list[dict], account: Account, data_dir: Path) -> None:
    """The built-in services that need no root (MLflow, the inference gateway, Triton) start as ``account``
    in its home, and get the directories they write (made 0700 of ``account``; taken over from an earlier
    run as root). gpulab-jobs stays with the hub's account: it starts jobs as their owners' accounts."""
    for service in services:
        dirs = SERVICE_ACCOUNT_DIRS.get(service["name"])
        if dirs is None or not service.get("command"):
            continue
        service["user"], service["cwd"] = account.name, account.home
        for name in dirs:
            hand_over(data_dir / name, account)
