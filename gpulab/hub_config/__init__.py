"""Build JupyterHub's configuration from ``gpulab_config.py``.

``hub_config/jupyterhub_config.py`` calls :func:`configure` with the hub's ``c``.
"""

import getpass
import os
import sys
from pathlib import Path

from jupyterhub.spawner import SimpleLocalProcessSpawner

from .. import scopes
from ..accounts import (
    ACCOUNT_NAME,
    MAX_ACCOUNT_NAME,
    Account,
    AccountPolicy,
    closed_to_others,
    ensure_service_account,
    isolation_mode,
    may_read,
)
from ..config import CONFIGURABLES, check_settings, config_path, instances, load_config, service_configurables
from ..errors import ConfigError
from ..net import free_port
from ..scopes import CLI_SCOPES, CLI_SERVICE, INFER_SERVICE, JOBS_SERVICE, MLFLOW_SERVICE
from ..secrets import Secret, persistent_secret, secret_from
from ..tracing import setup_tracing
from .auth import GpulabOIDCAuthenticator, GpulabPasswordAuthenticator
from .oidc import discover
from .proxy import proxy_command
from .roles import load_roles
from .services import SERVICE_ACCOUNT_DIRS, builtin_services, managed_services, run_as_service_account
from .spawner import AccountSpawner

NOT_ALLOWED_MESSAGE = (
    "You signed in, but your account is not in a group allowed to use gpulab. Ask your gpulab administrator for access."
)
AUTHORIZER = "gpulab.server_extension.authorizer.GpulabAuthorizer"


def _configure_password_login(c, login, data_dir: Path, isolation: str) -> None:
    c.JupyterHub.authenticator_class = GpulabPasswordAuthenticator
    c.Authenticator.admin_users = set(login.admin_users)
    a = c.GpulabPasswordAuthenticator
    admin_password = data_dir / "secrets" / "admin-password"
    persistent_secret(admin_password)  # made on first start
    a.admin_password_file = str(admin_password)
    a.enable_signup = login.self_signup
    a.open_signup = False  # signed-up users wait for an admin's approval
    a.allowed_failed_logins = login.allowed_failed_logins
    a.seconds_before_next_try = login.lockout_seconds
    if isolation == "personal":
        a.owner = getpass.getuser()


def _oidc_client(oidc) -> tuple[Secret, dict]:
    """The client secret and the provider's endpoints, or a ConfigError naming what is missing."""
    if not oidc.client_id:
        raise ConfigError("OIDC.client_id is not set")
    secret = secret_from(oidc.client_secret_file, "GPULAB_OIDC_CLIENT_SECRET", "OIDC.client_secret_file")
    if secret is None:
        raise ConfigError("OIDC.client_secret_file is not set (nor $GPULAB_OIDC_CLIENT_SECRET)")
    if not (oidc.allowed_groups or oidc.allow_all):
        raise ConfigError("OIDC: set OIDC.allowed_groups, or OIDC.allow_all = True to admit every user")
    return secret, discover(oidc)


def _configure_oidc_login(c, oidc, platform) -> None:
    secret, endpoints = _oidc_client(oidc)
    c.JupyterHub.authenticator_class = GpulabOIDCAuthenticator
    g = c.GenericOAuthenticator
    g.client_id = oidc.client_id
    g.client_secret = secret.reveal()
    g.oauth_callback_url = platform.public_url.rstrip("/") + "/hub/oauth_callback"
    g.authorize_url = endpoints["authorization_endpoint"]
    g.token_url = endpoints["token_endpoint"]
    g.userdata_url = endpoints["userinfo_endpoint"]
    g.scope = list(oidc.scope)
    g.username_claim = oidc.username_claim
    g.login_service = "your organisation"
    g.auto_login = True  # the hub's login page sends users straight to the provider
    g.manage_groups = True
    g.auth_state_groups_key = f"oauth_user.{oidc.groups_claim}"
    g.allowed_groups = set(oidc.allowed_groups)
    g.admin_groups = set(oidc.admin_groups)
    g.allow_all = oidc.allow_all
    g.custom_403_message = NOT_ALLOWED_MESSAGE


ISOLATION_NONE_BANNER = (
    "This gpulab runs every user as one system account (<code>c.Platform.isolation = 'none'</code>): "
    "users can read each other's files and secrets. Start it as root to give each user their own account."
)


def _configure_spawner(c, platform, isolation: str, data_dir: Path) -> None:
    """One system account per user (isolation 'accounts'), else every server as the account gpulab runs as."""
    if isolation != "accounts":
        # one OS account for all: a personal platform (only its owner signs in), or 'none' chosen explicitly
        c.JupyterHub.spawner_class = SimpleLocalProcessSpawner
        c.SimpleLocalProcessSpawner.home_dir_template = str(data_dir / "users" / "{username}")
        if isolation == "none":
            c.JupyterHub.template_vars = {"announcement": ISOLATION_NONE_BANNER}
        return
    _check_reachable()
    c.JupyterHub.spawner_class = AccountSpawner
    c.AccountSpawner.account_policy = vars(AccountPolicy.from_platform(platform))
    # hub names that make valid account names, so a user is refused at sign-in rather than at spawn
    longest = MAX_ACCOUNT_NAME - len(platform.account_prefix)
    c.Authenticator.username_pattern = ACCOUNT_NAME.pattern.replace("*$", f"{{0,{longest - 1}}}$")


def _check_reachable() -> None:
    """Under isolation 'accounts', users' servers run gpulab's Python as their own accounts: it must reach it."""
    reached = (("the Python interpreter", os.path.realpath(sys.executable)), ("gpulab", Path(__file__).parent))
    for what, path in reached:
        if closed := closed_to_others(path):
            raise ConfigError(
                f"Platform.isolation: user accounts cannot reach {what} at {path}: {closed} is closed to other "
                f"accounts (mode {closed.stat().st_mode & 0o777:04o}); install gpulab where every account can read "
                f"it, or run: chmod o+x {closed}"
            )


def _service_names(platform) -> set[str]:
    """The hub-managed services' names, as :func:`configure` will make them."""
    builtin = {JOBS_SERVICE: platform.jobs_service, MLFLOW_SERVICE: platform.mlflow_service}
    builtin[INFER_SERVICE] = platform.inference_service
    return {n for n, on in builtin.items() if on} | {s.get("name") for s in platform.services}


def check(cfg) -> None:
    """Everything :func:`configure` refuses, without its side effects (no port picked, no secret or account
    made): ``gpulab up`` runs it before it starts the hub, so that a mistake is one line from ``gpulab up``
    rather than a hub that does not start."""
    check_settings(cfg, [*CONFIGURABLES, *service_configurables()])  # the services' too
    conf = instances(cfg)
    platform, login = conf["Platform"], conf["Login"]
    if login.method == "oidc":
        _oidc_client(conf["OIDC"])
        admin_users, admin_groups = set(), set(conf["OIDC"].admin_groups)
    else:
        admin_users, admin_groups = set(login.admin_users), set()
    load_roles(conf["Roles"], admin_users, admin_groups)
    if isolation_mode(platform) == "accounts":
        _check_reachable()
    subscribers = [JOBS_SERVICE] * platform.jobs_service + list(platform.event_subscribers)
    _check_subscribers(subscribers, _service_names(platform))


def _check_subscribers(subscribers: list[str], services) -> None:
    missing = [n for n in subscribers if n not in services]
    if missing:
        raise ConfigError(f"Platform.event_subscribers: no service named {', '.join(missing)}")


def _keep_config_private(config_file: Path, data_dir: Path, services: Account | None) -> None:
    """gpulab_config.py may hold tokens and passwords: no user account may read it; the account of the
    services (``services``), which read it too, must."""
    if not config_file.exists():
        return
    if config_file.resolve().is_relative_to(data_dir):
        if services:
            os.chown(config_file, -1, services.gid)
        config_file.chmod(0o640 if services else 0o600)
        return
    st = config_file.stat()
    if st.st_mode & 0o004 or (st.st_mode & 0o040 and not (services and st.st_gid == services.gid)):
        print(
            f"gpulab: warning: {config_file} is readable by other accounts; if it holds secrets, run: "
            f"chmod 600 {config_file}",
            file=sys.stderr,
        )
    if services and not may_read(services, config_file):
        raise ConfigError(
            f"Platform.service_account: {services.name} cannot read {config_file}, which MLflow, the inference "
            f"gateway and Triton read as that account; run: chgrp {services.name} {config_file} && chmod 640 "
            f"{config_file}"
        )


def _service_env(platform, services: dict) -> dict:
    """Where user servers and kernels find the platform's services (no secrets)."""
    env = {}
    if JOBS_SERVICE in services:
        env["GPULAB_JOBS_URL"] = f"{services[JOBS_SERVICE]['url']}/services/{JOBS_SERVICE}/api/v1"
    if INFER_SERVICE in services:
        infer = services[INFER_SERVICE]
        env["GPULAB_INFER_URL"] = f"{infer['url']}/services/{INFER_SERVICE}/api/v1"
        env["GPULAB_INFER_ADDRESS"] = infer["info"]["grpc_address"]
        if infer["info"].get("rest_address"):
            env["GPULAB_INFER_REST_ADDRESS"] = infer["info"]["rest_address"]
        if infer.get("info", {}).get("tls_ca_file"):
            env["GPULAB_INFER_TLS_CA"] = infer["info"]["tls_ca_file"]
    if MLFLOW_SERVICE in services:
        env["GPULAB_MLFLOW_UI_URL"] = f"{platform.public_url.rstrip('/')}/services/{MLFLOW_SERVICE}/"
        # mlflow.start_run() in a kernel logs to the platform's MLflow, not to ./mlruns, at the public address, so
        # that the links MLflow prints ("View run at ...") open in the user's browser
        env["MLFLOW_TRACKING_URI"] = env["GPULAB_MLFLOW_UI_URL"].rstrip("/")
    return env


def configure(c, config_file: Path | None = None) -> None:
    """Fill the hub's config ``c`` from gpulab's config."""
    cfg = load_config(config_file)
    check_settings(cfg, [*CONFIGURABLES, *service_configurables()])  # the services' too: refuse to start
    conf = instances(cfg)
    platform, login, oidc, roles_cfg = conf["Platform"], conf["Login"], conf["OIDC"], conf["Roles"]
    data_dir = Path(platform.data_dir).expanduser().resolve()
    isolation = isolation_mode(platform)
    hub_dir = data_dir / "hub"
    hub_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if isolation == "accounts":  # users' job directories are below it: they may pass, not list
        data_dir.chmod(0o711)
    setup_tracing("gpulab-hub")

    j = c.JupyterHub
    j.ip, j.port = platform.ip, platform.port
    j.hub_ip = "127.0.0.1"
    j.hub_port = free_port()
    j.db_url = f"sqlite:///{hub_dir / 'jupyterhub.sqlite'}"
    j.cookie_secret_file = str(hub_dir / "jupyterhub_cookie_secret")
    j.pid_file = str(hub_dir / "jupyterhub.pid")
    j.custom_scopes = scopes.CUSTOM_SCOPES
    c.ConfigurableHTTPProxy.command = proxy_command(platform.proxy_command, data_dir)
    c.ConfigurableHTTPProxy.api_url = f"http://127.0.0.1:{free_port()}"
    c.ConfigurableHTTPProxy.auth_token = persistent_secret(hub_dir / "proxy-token")
    c.ConfigurableHTTPProxy.pid_file = str(hub_dir / "proxy.pid")

    if login.method == "oidc":
        _configure_oidc_login(c, oidc, platform)
        admin_users, admin_groups = set(), set(oidc.admin_groups)
    else:
        _configure_password_login(c, login, data_dir, isolation)
        admin_users, admin_groups = set(login.admin_users), set()
    j.load_roles = [
        *load_roles(roles_cfg, admin_users, admin_groups),
        {"name": CLI_SERVICE, "scopes": CLI_SCOPES, "services": [CLI_SERVICE]},
    ]

    config_file = Path(config_file) if config_file else config_path()

    def token_for(name: str) -> str:
        return persistent_secret(hub_dir / "services" / f"{name}.token")

    services = builtin_services(platform, cfg, data_dir, config_file, token_for)
    if isolation == "accounts":
        service_account = None
        if any(s["name"] in SERVICE_ACCOUNT_DIRS for s in services):
            service_account = ensure_service_account(AccountPolicy.from_platform(platform))
            run_as_service_account(services, service_account, data_dir)
        _keep_config_private(config_file, data_dir, service_account)
    services += managed_services(platform, config_file, token_for)
    services.append({"name": CLI_SERVICE, "api_token": token_for(CLI_SERVICE)})
    subscribers = [JOBS_SERVICE] * platform.jobs_service + list(platform.event_subscribers)
    j.services = services
    by_name = {s["name"]: s for s in services}
    tls_ca = cfg.InferenceGateway.get("tls_ca_file") or cfg.InferenceGateway.get("tls_cert_file")
    if tls_ca and INFER_SERVICE in by_name:  # clients verify the gateway's TLS certificate against it
        by_name[INFER_SERVICE].setdefault("info", {})["tls_ca_file"] = str(Path(tls_ca).expanduser())
    if INFER_SERVICE in by_name and MLFLOW_SERVICE in by_name:  # deploys fetch models with the gateway's token
        j.load_roles.append(
            {
                "name": "gpulab-infer-service",
                "scopes": [f"access:services!service={MLFLOW_SERVICE}"],
                "services": [INFER_SERVICE],
            }
        )
    _check_subscribers(subscribers, by_name)
    c.UserEventsMixin.events_url = f"sqlite:///{hub_dir / 'events.sqlite'}"
    c.UserEventsMixin.event_subscribers = [
        {"name": n, "url": by_name[n]["url"].rstrip("/") + f"/services/{n}/events", "token": by_name[n]["api_token"]}
        for n in subscribers
    ]

    s = c.Spawner
    _configure_spawner(c, platform, isolation, data_dir)
    s.cmd = [sys.executable, "-m", "jupyterhub.singleuser"]
    s.args = [f"--ServerApp.authorizer_class={AUTHORIZER}"]
    if os.geteuid() == 0:  # containers and CI run as root
        s.args.append("--allow-root")
    s.default_url = "/lab"
    s.http_timeout = 60
    s.environment = {"GPULAB_CONFIG": str(config_file), **_service_env(platform, by_name)}
    if MLFLOW_SERVICE in by_name:  # the MLflow client sends it as a bearer token; the server's own, to its account
        s.environment["MLFLOW_TRACKING_TOKEN"] = lambda spawner: spawner.api_token
        # runs go to an experiment of the user's own (MLflow's shared Default is read-only to users)
        s.environment["MLFLOW_EXPERIMENT_NAME"] = lambda spawner: spawner.user.name
    service_access = [f"access:services!service={s['name']}" for s in services]
    s.server_token_scopes = [
        "users:activity!user",
        "access:servers!server",
        "read:users:name!user",
        "read:users:groups!user",
        *scopes.ALL,
        *service_access,
    ]
    s.oauth_client_allowed_scopes = [*scopes.ALL, *service_access]
    # gpulab's own sections (Roles, ...) for hub-side code, and any JupyterHub/Spawner/... settings
    # the admin wrote in gpulab_config.py, which win over the ones above
    c.merge(cfg)
