"""Configuration: one file, secrets from 0600 files, redacted display, one clear line per mistake."""

import os
import socket
import subprocess
import sys

import pytest

from gpulab.config import effective_config, load_config
from gpulab.errors import ConfigError
from gpulab.net import free_port, private_sockets
from gpulab.secrets import Secret, read_secret_file, write_secret_file
from tests.support.net import next_loopback

HOST = next_loopback()  # where `gpulab up` is asked to listen


def run_gpulab(tmp_path, config: str, *args, env=None):
    cfg = tmp_path / "gpulab_config.py"
    cfg.write_text(config)
    full_env = {**os.environ, "GPULAB_CONFIG": str(cfg), **(env or {})}
    full_env.pop("GPULAB_CONFIG_OVERRIDES", None)
    return subprocess.run(
        [sys.executable, "-m", "gpulab", *args], env=full_env, capture_output=True, text=True, timeout=60
    )


def up(tmp_path, config: str, port: int | None = None, env=None):
    port = port or free_port(HOST)
    return run_gpulab(
        tmp_path, config, "up", "--ip", HOST, "--port", str(port), "--data-dir", str(tmp_path / "data"), env=env
    )


def one_line_error(result) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpulab: error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


OIDC = """
c.Login.method = "oidc"
c.OIDC.issuer = "http://127.0.0.1:9/o"
c.OIDC.client_id = "gpulab"
c.OIDC.allowed_groups = {"ml"}
"""


def test_missing_client_secret_file(tmp_path):
    line = one_line_error(up(tmp_path, OIDC + f"c.OIDC.client_secret_file = '{tmp_path}/nope'\n"))
    assert "OIDC.client_secret_file" in line and "does not exist" in line


def test_world_readable_client_secret_file(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("s3cr3t-value")
    secret.chmod(0o644)
    line = one_line_error(up(tmp_path, OIDC + f"c.OIDC.client_secret_file = '{secret}'\n"))
    assert "readable by group or others" in line and "chmod 600" in line
    assert "s3cr3t-value" not in line


def test_no_client_secret_at_all(tmp_path):
    line = one_line_error(up(tmp_path, OIDC))
    assert "OIDC.client_secret_file is not set" in line


def test_unreachable_provider(tmp_path):
    secret = tmp_path / "secret"
    write_secret_file(secret, "s3cr3t-value")
    line = one_line_error(up(tmp_path, OIDC + f"c.OIDC.client_secret_file = '{secret}'\n"))
    assert "OIDC.issuer: cannot read the discovery document" in line


def test_unknown_scope_in_role(tmp_path):
    config = "c.Roles.extra_roles = [{'name': 'readers', 'scopes': ['custom:gpulab:everything']}]\n"
    line = one_line_error(up(tmp_path, config))
    assert "unknown scope 'custom:gpulab:everything'" in line and "readers" in line


def test_unknown_role_in_group_mapping(tmp_path):
    line = one_line_error(up(tmp_path, "c.Roles.group_roles = {'ml': ['gpulab-superuser']}\n"))
    assert "Roles.group_roles['ml']" in line and "gpulab-superuser" in line


def test_port_in_use(tmp_path):
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        sock.listen()
        port = sock.getsockname()[1]
        line = one_line_error(up(tmp_path, "", port=port))
    assert f"{HOST}:{port} is already in use" in line


def test_broken_config_file(tmp_path):
    line = one_line_error(up(tmp_path, "c.Platform.port = \n"))
    assert "gpulab_config.py" in line and "SyntaxError" in line


@pytest.mark.parametrize(
    "setting, expected",
    [
        # a wrong value: refused at start, not on every scheduling pass afterwards
        ("c.JobQueue.user_quota = {'max_jobs': 'eight'}", "c.JobQueue.user_quota: "),
        ("c.JobQueue.user_quota = {'max_job': 8}", "user_quota: 'max_job' is not a quota limit (give max_jobs and/or"),
        ("c.JobQueue.group_quotas = {'ml': {'max_gpus': -1}}", "c.JobQueue.group_quotas: "),
        (
            "c.JobQueue.cohorts = {'lab': {'ml': {'default': {'gpus': {'nominal': 2, 'lending_limit': 3}}}}}",
            "c.JobQueue.cohorts: cohorts['lab']['ml']['default']['gpus']: lending_limit 3 is more than nominal 2",
        ),
        ("c.JobQueue.usage_weights = {'gpu': 1}", "c.JobQueue.usage_weights: usage_weights: 'gpu' is not a resource"),
        ("c.InferenceGateway.processes = 'two'", "c.InferenceGateway.processes: "),
        ("c.JobQueue.executor_class = 'slurm'", "c.JobQueue.executor_class: "),
        # a misspelt name would be ignored
        ("c.JobQueue.user_qouta = {}", "c.JobQueue.user_qouta is not a setting of JobQueue; did you mean user_quota?"),
        ("c.Platform.isolaton = 'none'", "c.Platform.isolaton is not a setting of Platform; did you mean isolation?"),
    ],
)
def test_every_setting_is_checked_when_the_platform_starts(tmp_path, setting, expected):
    assert expected in one_line_error(up(tmp_path, setting + "\n"))


def test_config_generate_lists_every_setting_as_a_loadable_file(tmp_path):
    result = run_gpulab(tmp_path, "", "config", "generate")
    assert result.returncode == 0, result.stderr
    generated = tmp_path / "generated_config.py"
    generated.write_text(result.stdout)
    assert load_config(generated) == {}  # every line a comment: loading it changes nothing
    for setting, help_text in (
        ("c.JobQueue.user_quota", "Per-user limits"),
        ("c.Platform.isolation", ""),
        ("c.InferenceGateway.replicas", "Triton gRPC endpoints"),
        ("c.OIDC.issuer", ""),
    ):
        assert f"# {setting} = " in result.stdout and help_text in result.stdout, setting


def test_config_show_redacts_secrets(tmp_path):
    nras_key = tmp_path / "nras-api-key"
    write_secret_file(nras_key, "nras-KEYFILE-SECRET")
    config = (
        "c.Platform.services = [{'name': 'x', 'api_token': 'tok-SUPERSECRET'}]\nc.Platform.port = 8123\n"
        "c.JobStore.url = 'postgresql+psycopg://gpulab:db-SUPERSECRET@db.example/jobs'\n"
        "c.TritonServer.restricted_key = 'key-SUPERSECRET'\nc.JobQueue.user_quota = {'max_jobs': 3}\n"
        f"c.Attestation.api_key_file = {str(nras_key)!r}\n"
    )
    env = {"GPULAB_OIDC_CLIENT_SECRET": "env-SECRET", "GPULAB_NRAS_API_KEY": "env-NRAS-SECRET"}
    result = run_gpulab(tmp_path, config, "config", "show", env=env)
    assert result.returncode == 0, result.stderr
    assert "SUPERSECRET" not in result.stdout and "env-SECRET" not in result.stdout
    assert "<redacted>" in result.stdout and '"port": 8123' in result.stdout
    assert "postgresql+psycopg://gpulab:<redacted>@db.example/jobs" in result.stdout
    assert '"max_jobs": 3' in result.stdout  # service settings are shown too
    assert f'"api_key_file": "{nras_key}"' in result.stdout  # the Attestation section lists the path...
    assert "KEYFILE-SECRET" not in result.stdout + result.stderr  # ...never the key
    assert "env-NRAS-SECRET" not in result.stdout + result.stderr


def test_overrides_apply_on_top_of_the_file(tmp_path, monkeypatch):
    cfg = tmp_path / "gpulab_config.py"
    cfg.write_text("c.Platform.port = 8123\nc.Platform.ip = '127.0.0.9'\n")
    monkeypatch.setenv("GPULAB_CONFIG_OVERRIDES", '{"Platform": {"port": 9000}}')
    shown = effective_config(load_config(cfg))["Platform"]
    assert shown["port"] == 9000 and shown["ip"] == "127.0.0.9"
    assert shown["public_url"] == "http://127.0.0.9:9000"


def test_secret_files(tmp_path):
    path = tmp_path / "key"
    write_secret_file(path, "value-123")
    assert path.stat().st_mode & 0o777 == 0o600
    secret = read_secret_file(path, "X.key_file")
    assert secret.reveal() == "value-123"
    assert "value-123" not in repr(secret) and "value-123" not in str(secret) and "value-123" not in f"{secret}"
    path.chmod(0o640)
    with pytest.raises(ConfigError, match="X.key_file: secret file .* is readable by group or others"):
        read_secret_file(path, "X.key_file")
    assert isinstance(secret, Secret)


def test_two_processes_never_get_the_same_free_port(tmp_path, monkeypatch):
    """Ports handed out are claimed machine-wide (a file per port): a test process and the hub it starts, each
    picking ports for services that bind them later, do not pick the same one. 600 ports each, from ~27,000
    candidates: without claims some 13 would be picked twice."""
    import gpulab.net

    claims = tmp_path / "claims"
    monkeypatch.setattr(gpulab.net, "CLAIMS", claims)
    code = (
        "import sys, gpulab.net as n; from pathlib import Path; n.CLAIMS = Path(sys.argv[1]); "
        "print(' '.join(str(n.free_port()) for _ in range(600)))"
    )
    other = subprocess.run([sys.executable, "-c", code, str(claims)], capture_output=True, text=True, check=True)
    theirs = set(map(int, other.stdout.split()))
    ours = {free_port() for _ in range(600)}
    assert len(theirs) == len(ours) == 600 and not theirs & ours
    assert oct(claims.stat().st_mode & 0o7777) == "0o1777" and len(list(claims.iterdir())) == 1200
    stale = claims / str(next(iter(ours)))
    os.utime(stale, (1, 1))  # a claim older than CLAIM_SECONDS is taken over
    assert gpulab.net._claim(int(stale.name)) and stale.stat().st_mtime > 1


def test_private_sockets_are_in_a_directory_of_this_account_alone(tmp_path):
    directory = tmp_path / "run"
    directory.mkdir(mode=0o755)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(directory / "api.sock"))  # left by an earlier run
    stale.close()
    [path] = private_sockets(directory, ["api.sock"], "Service.socket_dir")
    assert path == directory / "api.sock" and not path.exists()
    assert directory.stat().st_mode & 0o777 == 0o700
    with pytest.raises(ConfigError, match=r"^Service.socket_dir: .* too long for a unix socket .*shorter data dir"):
        private_sockets(tmp_path / ("d" * 100), ["api.sock"], "Service.socket_dir")
    if os.geteuid() == 0:  # a directory another account owns (it could connect to, or replace, the sockets)
        os.chown(directory, 65534, 65534)
        with pytest.raises(ConfigError, match=r"must be a directory of this service's account"):
            private_sockets(directory, ["api.sock"], "Service.socket_dir")
