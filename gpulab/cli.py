"""The ``gpulab`` command: ``gpulab up`` runs the platform, ``gpulab config show`` prints its config,
``gpulab attest collect`` attests a GPU node, ``gpulab users`` and ``gpulab nodes`` manage who may, and
``gpulab pipeline submit`` runs a pipeline of jobs (from a user's server or terminal)."""

import argparse
import getpass
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from . import nodes, users
from .accounts import isolation_mode
from .attestation.collect import collect as attest_collect
from .config import (
    CONFIGURABLES,
    config_path,
    effective_config,
    instances,
    load_config,
    service_configurables,
)
from .errors import ConfigError
from .net import port_in_use
from .secrets import persistent_secret

CONFIG_TEMPLATE = """\
# gpulab configuration: one file for the hub, the services and the server extension.
# Every setting and its default: `gpulab config show`.  Examples:
#
# c.Platform.port = 8000
# c.Login.method = "oidc"
# c.OIDC.issuer = "https://idp.example.org/realms/ml"
# c.OIDC.client_id = "gpulab"
# c.OIDC.client_secret_file = "/etc/gpulab/oidc-client-secret"   # mode 0600
# c.OIDC.allowed_groups = {"ml"}
# c.OIDC.admin_groups = {"ml-admins"}
# c.Roles.group_roles = {"ml-gpu": ["gpulab-gpu"], "ml-deploy": ["gpulab-deployer"]}
"""


def hub_config_file() -> Path:
    """``jupyterhub_config.py``: inside the installed package, or the checkout's ``hub_config/``."""
    here = Path(__file__).resolve().parent
    for candidate in (
        here / "hub_config" / "jupyterhub_config.py",
        here.parent / "hub_config" / "jupyterhub_config.py",
    ):
        if candidate.exists():
            return candidate
    raise ConfigError("jupyterhub_config.py not found: reinstall gpulab")


def _overrides(args) -> dict:
    platform = {}
    if args.ip:
        platform["ip"] = args.ip
    if args.port:
        platform["port"] = args.port
    if args.data_dir:
        platform["data_dir"] = str(Path(args.data_dir).expanduser().resolve())
    return {"Platform": platform} if platform else {}


def _wait_ready(url: str, proc: subprocess.Popen, started: float, message: str) -> None:
    """Print ``message`` once the hub answers at ``url``."""
    while proc.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=2):
                print(f"gpulab: up in {time.monotonic() - started:.1f}s. {message}", flush=True)
                return
        except OSError:
            time.sleep(0.2)


def _stop_group(pgid: int, grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL, whatever is left in the hub's process group."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


def up(args) -> int:
    """Start the platform in the foreground; SIGINT/SIGTERM stop everything it started."""
    from .hub_config import check

    started = time.monotonic()
    os.umask(0o077)  # what the platform writes (databases, logs, secrets, job dirs) is its own unless said
    overrides = _overrides(args)
    if overrides:
        os.environ["GPULAB_CONFIG_OVERRIDES"] = json.dumps(overrides)
    if args.data_dir:
        os.environ["GPULAB_DATA_DIR"] = overrides["Platform"]["data_dir"]
    path = config_path()
    cfg = load_config(path)
    check(cfg)  # a mistake is one line here; the hub configures itself from the file, once
    platform = instances(cfg)["Platform"]
    data_dir = Path(platform.data_dir).expanduser()
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not path.exists() and not os.environ.get("GPULAB_CONFIG"):
        path.write_text(CONFIG_TEMPLATE)
    os.environ["GPULAB_CONFIG"] = str(path)
    if port_in_use(platform.ip, platform.port):
        raise ConfigError(
            f"Platform.port: {platform.ip}:{platform.port} is already in use (choose another with --port)"
        )

    admin_file = data_dir / "secrets" / "admin-password"
    first_run = not admin_file.exists()
    login = instances(cfg)["Login"]
    if login.method == "password":
        persistent_secret(admin_file)  # made here to be shown; the hub reads it
        if first_run:
            print(f"gpulab: admin password (also in {admin_file}): {admin_file.read_text().strip()}", flush=True)
        message = (
            f"Sign in at {platform.public_url} as {', '.join(sorted(login.admin_users))} (password in {admin_file})."
        )
    else:
        message = f"Sign in at {platform.public_url}."

    hub_dir = data_dir / "hub"
    hub_dir.mkdir(exist_ok=True, mode=0o700)
    local_ip = "127.0.0.1" if platform.ip in ("", "0.0.0.0", "::") else platform.ip
    (hub_dir / "cli.json").write_text(
        json.dumps(
            {  # for `gpulab users`
                "url": f"http://{local_ip}:{platform.port}",
                "isolation": isolation_mode(platform),
                "owner": getpass.getuser(),
            }
        )
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterhub", "-f", str(hub_config_file())],
        cwd=hub_dir,
        start_new_session=True,
    )

    def forward(signum, _frame):
        proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    health = f"http://{platform.ip}:{platform.port}/hub/health"
    threading.Thread(target=_wait_ready, args=(health, proc, started, message), daemon=True).start()
    code = proc.wait()
    _stop_group(proc.pid)
    return 0 if code in (0, -signal.SIGTERM) else code


def config_show(_args) -> int:
    """Print the effective configuration, secrets redacted."""
    path = config_path()
    print(f"# {path}{'' if path.exists() else ' (absent: defaults)'}")
    print(
        json.dumps(effective_config(load_config(path), service_configurables()), indent=2, sort_keys=True, default=str)
    )
    return 0


def config_generate(_args) -> int:
    """Print a gpulab_config.py with every setting, its help and its default, commented out."""
    classes = [*CONFIGURABLES, *service_configurables()]
    print(
        f"# gpulab_config.py: every setting, with its help and default (`gpulab config generate`).\n"
        f"# Read by the hub, every service and the server extension from $GPULAB_CONFIG (default {config_path()}).\n"
        "c = get_config()  # noqa: F821\n"
    )
    for cls in classes:
        print(cls.class_config_section(classes))
    return 0


def pipeline_submit(args) -> int:
    from .kernels.client import GpulabError
    from .kernels.pipelines import submit_pipeline

    try:
        pipeline = submit_pipeline(args.file)
        print(
            f"pipeline {pipeline.name} {pipeline.id}: {len(pipeline.data['steps'])} steps, files in {pipeline.directory}"
        )
        for step in pipeline.data["steps"]:
            print(f"  {step['name']}: job {step['job_id']} {step['state']} ({step['state_reason']})")
        if not args.wait:
            return 0
        pipeline.wait()
    except GpulabError as e:
        print(f"gpulab pipeline: {e}", file=sys.stderr)
        return 2
    for step in pipeline.data["steps"]:
        print(f"  {step['name']}: {step['state']} ({step['state_reason']})")
    return 0 if pipeline.state == "succeeded" else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="gpulab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="start the platform in the foreground")
    p_up.add_argument("--ip", help="address to listen on (default 127.0.0.1)")
    p_up.add_argument("--port", type=int, help="port to listen on (default 8000)")
    p_up.add_argument("--data-dir", help="where the platform keeps its state")
    p_up.set_defaults(func=up)
    p_config = sub.add_parser("config", help="configuration")
    config_sub = p_config.add_subparsers(dest="config_command", required=True)
    config_sub.add_parser("show", help="print the effective config, secrets redacted").set_defaults(func=config_show)
    config_sub.add_parser("generate", help="print a config file with every setting and its help").set_defaults(
        func=config_generate
    )
    p_attest = sub.add_parser("attest", help="GPU node attestation")
    attest_sub = p_attest.add_subparsers(dest="attest_command", required=True)
    p_collect = attest_sub.add_parser(
        "collect", help="attest this GPU node: NVIDIA's evidence, verified by the platform (exit 0: valid)"
    )
    p_collect.add_argument("--node", required=True, help="this node's name, as jobs are gated on it")
    p_collect.add_argument("--url", help="the job service's API (default $GPULAB_JOBS_URL)")
    p_collect.add_argument(
        "--token-file",
        help="0600 file with the node's credential from gpulab nodes enroll "
        "(or an admin's hub token; default $JUPYTERHUB_API_TOKEN)",
    )
    p_collect.add_argument("--device", choices=("gpu", "switch"), default="gpu", help="what to attest (default gpu)")
    p_collect.add_argument(
        "--direct-token",
        action="store_true",
        help="the collector gets NRAS's token itself (a node with its own NRAS access)",
    )
    p_collect.add_argument(
        "--collector",
        nargs=argparse.REMAINDER,
        metavar="CMD",
        help="collector argv, {nonce} and {device} filled in (default c.Attestation.collector_command); must come last",
    )
    p_collect.set_defaults(func=attest_collect)
    p_pipeline = sub.add_parser("pipeline", help="pipelines of jobs (in a user's server or terminal)")
    pipeline_sub = p_pipeline.add_subparsers(dest="pipeline_command", required=True)
    p_submit = pipeline_sub.add_parser("submit", help="submit a pipeline file: every step a job (docs/jobs.md)")
    p_submit.add_argument("file", help="the pipeline's YAML file")
    p_submit.add_argument("--wait", action="store_true", help="wait for every step; exit 1 unless all succeeded")
    p_submit.set_defaults(func=pipeline_submit)
    users.add_parser(sub)
    nodes.add_parser(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"gpulab: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
