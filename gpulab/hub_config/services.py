"""Hub-managed services from config: each gets an address and a persistent API token."""

import os
import sys
from pathlib import Path

from traitlets.config import Config

from ..accounts import Account, hand_over
from ..attestation.nras import ENV_VAR as NRAS_KEY_VAR
from ..errors import ConfigError
from ..inference.triton import TritonServer
from ..net import free_port, socket_path
from ..scopes import INFER_SERVICE, JOBS_SERVICE, MLFLOW_SERVICE, TRITON_SERVICE
from ..service.app import service_overrides
from ..services.infer.config import InferenceGateway


def managed_services(platform, config_file: Path, token_for) -> list[dict]:
    """``c.JupyterHub.services`` for ``Platform.services``.

    A service with a ``command`` and no ``url`` is given a free port on 127.0.0.1, and ``$GPULAB_CONFIG`` (a
    :class:`~gpulab.service.app.ServiceApp` reads the platform's config as the built-in services do);
    every service without an ``api_token`` gets one from ``token_for(name)``.
    """
    out = []
    for spec in platform.services:
        service = dict(spec)
        name = service.get("name")
        if not name:
            raise ConfigError(f"Platform.services: a service needs a name: {sorted(spec)}")
        if service.get("command"):
            service["environment"] = {"GPULAB_CONFIG": str(config_file), **service.get("environment", {})}
            if not service.get("url"):
                service["url"] = f"http://127.0.0.1:{free_port()}"
        service.setdefault("api_token", token_for(name))
        if service.get("url"):
            service.setdefault("oauth_no_confirm", True)
        out.append(service)
    return out


def builtin_services(platform, cfg: Config, data_dir: Path, config_file: Path, token_for) -> list[dict]:
    """The platform's own services: ``gpulab-jobs``, ``mlflow`` and the inference services (each can be turned
    off). Each reads ``config_file``; what the hub decides for it (addresses, sockets, the others' internal URLs)
    goes in its ``$GPULAB_CONFIG_OVERRIDES``, under the names of its settings, where ``cfg`` leaves them unset.

    Of the services, only gpulab-jobs (which holds the attestation service) gets the hub's
    ``$GPULAB_NRAS_API_KEY``; user servers never do (it is not in ``Spawner.env_keep``).
    """
    out = []
    nras_key = os.environ.get(NRAS_KEY_VAR, "")
    env = {"GPULAB_CONFIG": str(config_file)}
    platform_settings = {"Platform": {"data_dir": str(data_dir)}}
    jobs_url = f"http://127.0.0.1:{free_port()}"
    jobs_api = f"{jobs_url}/services/{JOBS_SERVICE}/api/v1"
    mlflow_url = None
    if platform.mlflow_service:
        url = f"http://127.0.0.1:{free_port()}"
        settings = unset(cfg, "MLflowService", jobs_api_url=jobs_api if platform.jobs_service else None)
        out.append(
            {
                "name": MLFLOW_SERVICE,
                "display": True,
                "command": [sys.executable, "-m", "gpulab.services.mlflow"],
                "url": url,
                "api_token": token_for(MLFLOW_SERVICE),
                "oauth_no_confirm": True,
                "environment": {**env, **service_overrides({**platform_settings, **settings})},
            }
        )
        # services and jobs log to MLflow through its service, with a credential, like users do
        mlflow_url = f"{url}/services/{MLFLOW_SERVICE}"
    if platform.jobs_service:
        settings = {}
        if mlflow_url and "mlflow_tracking_uri" not in cfg.JobQueue:  # jobs log with their own token
            settings = {"JobQueue": {"mlflow_tracking_uri": mlflow_url, "mlflow_job_token": True}}
        jobs_env = {**env, **service_overrides({**platform_settings, **settings})}
        out.append(
            {
                "name": JOBS_SERVICE,
                "command": [sys.executable, "-m", "gpulab.services.jobs"],
                "url": jobs_url,
                "api_token": token_for(JOBS_SERVICE),
                "oauth_no_confirm": True,
                "environment": {**jobs_env, NRAS_KEY_VAR: nras_key} if nras_key else jobs_env,
            }
        )
    if platform.inference_service:
        out += inference_services(cfg, data_dir, env, platform_settings, token_for, mlflow_url)
    return out


def unset(cfg: Config, section: str, **settings) -> dict:
    """``{section: settings}``, less those ``cfg`` sets (the admin's win) and those that are None."""
    given = cfg[section] if section in cfg else {}
    kept = {k: v for k, v in settings.items() if v is not None and k not in given}
    return {section: kept} if kept else {}


def inference_services(
    cfg: Config, data_dir: Path, env: dict, platform_settings: dict, token_for, mlflow_url: str | None
) -> list[dict]:
    """``gpulab-infer`` (the inference gateway: gRPC, and KServe v2 REST unless ``rest_address`` is "") and,
    unless Triton replicas are configured, an embedded Triton."""
    out = []
    gateway = InferenceGateway(config=cfg)
    given = cfg.InferenceGateway if "InferenceGateway" in cfg else {}
    address = gateway.address if "address" in given else f"127.0.0.1:{free_port()}"
    platform_mlflow = bool(mlflow_url) and "mlflow_url" not in given  # one of the admin's is no platform's
    settings = {"address": address, "mlflow_url": mlflow_url, "platform_mlflow": platform_mlflow or None}
    if gateway.replicas:  # Tritons of the admin's, on TCP: they take the key
        settings["restricted_key"] = token_for("triton-restricted-key")
        http_known = bool(gateway.http_replicas)
    else:  # the embedded Triton, on unix sockets only the service account reaches
        triton = TritonServer(socket_dir=str(data_dir / "triton"))
        for path in (triton.grpc_address, triton.http_address):
            socket_path(Path(path.removeprefix("unix:")), "Platform.data_dir")
        repository = str(data_dir / "models")
        triton_settings = {
            "TritonServer": {
                "model_repository": repository,
                "socket_dir": triton.socket_dir,
                "log_path": str(data_dir / "logs" / "triton.log"),
            }
        }
        out.append(
            {
                "name": TRITON_SERVICE,
                "command": [sys.executable, "-m", "gpulab.inference.serve"],
                "api_token": token_for(TRITON_SERVICE),
                "environment": {**env, **service_overrides({**platform_settings, **triton_settings})},
            }
        )
        settings.update(
            replicas=[triton.grpc_address], http_replicas=[triton.http_address], model_repository=repository
        )
        http_known = True
    # a REST port where the replicas' HTTP endpoints are known
    rest_address = gateway.rest_address if "rest_address" in given else ""
    if "rest_address" not in given and http_known:
        rest_address = f"127.0.0.1:{free_port()}"
    settings["rest_address"] = rest_address
    gateway_settings = unset(cfg, "InferenceGateway", **settings)
    out.append(
        {
            "name": INFER_SERVICE,
            "command": [sys.executable, "-m", "gpulab.services.infer"],
            "url": f"http://127.0.0.1:{free_port()}",
            "api_token": token_for(INFER_SERVICE),
            "oauth_no_confirm": True,
            "info": {"grpc_address": address, **({"rest_address": rest_address} if rest_address else {})},
            "environment": {**env, **service_overrides({**platform_settings, **gateway_settings})},
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
