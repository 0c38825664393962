"""The one traitlets configuration file, ``gpulab_config.py``, read by hub, services and extension.

Its path comes from ``$GPULAB_CONFIG`` (default ``<data dir>/gpulab_config.py``).
``gpulab up`` passes command-line overrides in ``$GPULAB_CONFIG_OVERRIDES`` (JSON),
applied on top of the file.
"""

import difflib
import getpass
import json
import os
import re
from pathlib import Path

from traitlets import Bool, CaselessStrEnum, Dict, Integer, List, Set, TraitError, Unicode, default
from traitlets.config import Config, Configurable
from traitlets.config.loader import LazyConfigValue, PyFileConfigLoader

from .attestation.config import Attestation
from .data_dir import default_data_dir
from .errors import ConfigError


class Platform(Configurable):
    """Where the platform runs and keeps its state."""

    data_dir = Unicode(help="Directory for all platform state (hub DB, user homes, secrets).").tag(config=True)
    ip = Unicode("127.0.0.1", help="Address the public proxy listens on.").tag(config=True)
    port = Integer(8000, help="Port the public proxy listens on.").tag(config=True)
    public_url = Unicode(help="URL users reach the hub at (default http://<ip>:<port>); used for OAuth callbacks.").tag(
        config=True
    )
    proxy_command = List(
        Unicode(),
        help="configurable-http-proxy command; default: found on PATH or installed into the data dir.",
    ).tag(config=True)
    services = List(
        Dict(),
        help="Extra hub-managed services, as JupyterHub service dicts. "
        "A service with 'command' and no 'url' gets a free port on 127.0.0.1.",
    ).tag(config=True)
    jobs_service = Bool(True, help="Run the training job service gpulab-jobs.").tag(config=True)
    mlflow_service = Bool(True, help="Run MLflow tracking as the hub-managed service 'mlflow'.").tag(config=True)
    mlflow_sharing = CaselessStrEnum(
        ["group", "everyone", "private"],
        default_value="group",
        help="Who besides its creator (who alone may change and delete it) and admins may read an MLflow "
        "experiment (with its runs) or registered model: the creator's hub 'group's (at creation), "
        "'everyone' signed in, or nobody ('private').",
    ).tag(config=True)
    inference_service = Bool(
        True,
        help="Run the inference gateway gpulab-infer, and an embedded Triton unless InferenceGateway.replicas "
        "names external ones.",
    ).tag(config=True)
    event_subscribers = List(
        Unicode(),
        help="Names of hub-managed services that receive user lifecycle events at <service url>/services/<name>/events.",
    ).tag(config=True)
    isolation = CaselessStrEnum(
        ["accounts", "personal", "none"],
        default_value=None,
        allow_none=True,
        help="How users are kept apart. 'accounts' (the default as root): each user's server, kernels, "
        "terminals and jobs run as their own system account. 'personal' (the default without root): only the "
        "OS user who started gpulab may sign in. 'none': many users share one account and can read each "
        "other's files (every page says so).",
    ).tag(config=True)
    account_prefix = Unicode(
        "gpulab-", help="System account of hub user NAME: <prefix>NAME, made on first use (isolation 'accounts')."
    ).tag(config=True)
    accounts = Dict(
        key_trait=Unicode(),
        value_trait=Unicode(),
        help="Hub user name -> an existing system account to run as, instead of <account_prefix><name>.",
    ).tag(config=True)
    home_root = Unicode("/home", help="Where the accounts gpulab makes get their home directories.").tag(config=True)
    service_account = Unicode(
        "gpulab",
        help="System account MLflow, the inference gateway and Triton run as (isolation 'accounts'), "
        "made on first start; no hub user may map to it.",
    ).tag(config=True)

    @default("data_dir")
    def _default_data_dir(self):
        return str(default_data_dir())

    @default("public_url")
    def _default_public_url(self):
        return f"http://{self.ip}:{self.port}"


class Login(Configurable):
    """How users sign in."""

    method = CaselessStrEnum(
        ["password", "oidc"],
        default_value="password",
        help="'password': each user has their own password, set with `gpulab users` (embedded default); "
        "'oidc': an OpenID Connect provider.",
    ).tag(config=True)
    admin_users = Set(
        Unicode(), help="Hub admins (password login); default: 'admin', or the OS user who started a personal platform."
    ).tag(config=True)
    self_signup = Bool(
        False, help="Password login: let anyone create an account on the sign-up page (an admin then approves it)."
    ).tag(config=True)
    allowed_failed_logins = Integer(
        5, help="Password login: wrong passwords in a row before a user name is locked for lockout_seconds."
    ).tag(config=True)
    lockout_seconds = Integer(60, help="Password login: how long a user name stays locked.").tag(config=True)

    @default("admin_users")
    def _default_admin_users(self):
        return {"admin"} if os.geteuid() == 0 else {getpass.getuser()}


class OIDC(Configurable):
    """An OpenID Connect identity provider (used when ``Login.method = 'oidc'``)."""

    issuer = Unicode(help="Issuer URL; endpoints come from <issuer>/.well-known/openid-configuration.").tag(config=True)
    authorize_url = Unicode(help="Override the discovered authorization endpoint.").tag(config=True)
    token_url = Unicode(help="Override the discovered token endpoint.").tag(config=True)
    userdata_url = Unicode(help="Override the discovered userinfo endpoint.").tag(config=True)
    client_id = Unicode(help="OAuth client id of the hub at the provider.").tag(config=True)
    client_secret_file = Unicode(help="0600 file holding the client secret (else $GPULAB_OIDC_CLIENT_SECRET).").tag(
        config=True
    )
    scope = List(Unicode(), ["openid", "profile", "email", "groups"]).tag(config=True)
    username_claim = Unicode("preferred_username").tag(config=True)
    groups_claim = Unicode("groups", help="Userinfo claim holding the user's groups.").tag(config=True)
    allowed_groups = Set(Unicode(), help="Only members of these groups may sign in.").tag(config=True)
    admin_groups = Set(Unicode(), help="Members of these groups are hub and gpulab admins.").tag(config=True)
    allow_all = Bool(False, help="Let every user the provider authenticates sign in.").tag(config=True)


class Roles(Configurable):
    """Which gpulab roles users get."""

    everyone = List(Unicode(), ["gpulab-user"], help="Roles every signed-in user holds.").tag(config=True)
    group_roles = Dict(
        value_trait=List(Unicode()),
        key_trait=Unicode(),
        help="Hub (IdP) group name -> gpulab role names, e.g. {'ml-gpu': ['gpulab-user', 'gpulab-gpu']}.",
    ).tag(config=True)
    extra_roles = List(Dict(), help="Additional JupyterHub roles ({'name', 'scopes', 'groups'?, 'users'?}).").tag(
        config=True
    )


CONFIGURABLES = [Platform, Login, OIDC, Roles, Attestation]
OVERRIDES_ENV = "GPULAB_CONFIG_OVERRIDES"  # JSON settings on top of the file: `gpulab up`'s flags, the hub's
SECRET_NAME_PARTS = ("secret", "password", "token", "key")
_URL_PASSWORD = re.compile(r"(://[^:/@\s]+:)[^@\s]+@")  # user:password@ in database URLs


def config_path() -> Path:
    """The config file in force."""
    env = os.environ.get("GPULAB_CONFIG")
    return Path(env).expanduser() if env else default_data_dir() / "gpulab_config.py"


def load_config(path: Path | None = None) -> Config:
    """Load ``gpulab_config.py`` (absent file = defaults) plus ``$GPULAB_CONFIG_OVERRIDES``."""
    path = Path(path) if path else config_path()
    cfg = Config()
    if path.exists():
        loader = PyFileConfigLoader(path.name, str(path.parent))
        try:
            cfg.merge(loader.load_config())
        except Exception as e:  # a user's Python file: any error is a config error
            raise ConfigError(f"{path}: {type(e).__name__}: {e}") from None
    overrides = os.environ.get(OVERRIDES_ENV)
    if overrides:
        cfg.merge(Config(json.loads(overrides)))
    return cfg


def service_configurables() -> list[type[Configurable]]:
    """The services' configurables: they connect to things when built, so they are read (and checked) here
    without being built."""
    from .inference.triton import TritonServer
    from .services.infer.config import InferenceGateway
    from .services.jobs.executors.local import LocalExecutor
    from .services.jobs.executors.ray import RayExecutor
    from .services.jobs.notifications import Notifier
    from .services.jobs.queue import JobQueue
    from .services.jobs.schedules import Scheduler
    from .services.jobs.store import JobStore
    from .services.mlflow.config import MLflowService

    return [
        *(JobStore, JobQueue, Scheduler, Notifier, LocalExecutor, RayExecutor),
        *(InferenceGateway, TritonServer, MLflowService),
    ]


def check_settings(cfg: Config, classes: list[type[Configurable]]) -> None:
    """Each setting ``cfg`` gives one of ``classes``, checked against its trait without building the class:
    a :class:`ConfigError` naming the first that is not a setting or not a valid value (``c.JobQueue.user_quota:
    ...``), so that the platform refuses to start rather than fail on first use."""
    for cls in classes:
        if cls.__name__ not in cfg:
            continue
        traits = cls.class_traits(config=True)
        bare = cls.__new__(cls)  # an instance for the traits' checks, without __init__ (which connects)
        for name, value in cfg[cls.__name__].items():
            setting = f"c.{cls.__name__}.{name}"
            if name not in traits:
                close = difflib.get_close_matches(name, traits, n=1)
                hint = f"did you mean {close[0]}?" if close else "`gpulab config generate` lists them"
                raise ConfigError(f"{setting} is not a setting of {cls.__name__}; {hint}")
            if isinstance(value, LazyConfigValue):  # c.X.y.append(...): applied to the default when built
                continue
            try:
                traits[name]._validate(bare, value)
            except TraitError as e:
                raise ConfigError(f"{setting}: {e}") from None


def instances(cfg: Config) -> dict[str, Configurable]:
    """One instance of each gpulab configurable, keyed by class name."""
    out = {}
    for cls in CONFIGURABLES:
        try:
            out[cls.__name__] = cls(config=cfg)
        except Exception as e:
            raise ConfigError(f"{cls.__name__}: {e}") from None
    return out


def _redact(name: str, value):
    if isinstance(value, dict):
        return {k: _redact(str(k), v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(name, v) for v in value]
    lowered = name.lower()
    if value and any(p in lowered for p in SECRET_NAME_PARTS) and not lowered.endswith("_file"):
        return "<redacted>"
    if isinstance(value, str):
        return _URL_PASSWORD.sub(r"\1<redacted>@", value)
    return value


def effective_config(cfg: Config, services: list[type[Configurable]] = ()) -> dict:
    """Every setting of every gpulab configurable, with secret values redacted.

    ``services`` are configurables that connect to something when built (stores, executors):
    their settings are read from ``cfg`` and their declared defaults, without instantiating them.
    """
    out = {}
    for cls in CONFIGURABLES:
        obj = cls(config=cfg)
        out[cls.__name__] = {
            name: _shown(name, getattr(obj, name)) for name in sorted(cls.class_trait_names(config=True))
        }
    for cls in services:
        section = cfg[cls.__name__] if cls.__name__ in cfg else {}
        out[cls.__name__] = {
            name: _shown(name, section[name]) if name in section else trait.default_value_repr()
            for name, trait in sorted(cls.class_traits(config=True).items())
        }
    return out


def _shown(name: str, value):
    return _redact(name, sorted(value) if isinstance(value, set) else value)
