"""Run a real gpulab platform (`gpulab up`: hub + proxy + services) for tests, and talk to it."""

import os
import pwd
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import requests

from gpulab import accounts
from gpulab.net import free_port

TEST_ADMIN_SERVICE = "test-admin"


def open_to_accounts(path: Path) -> None:
    """o+x (enter, not list) on ``path`` and the directories above it: pytest's temp dirs are 0700."""
    for d in [*reversed(Path(path).parents), Path(path)]:
        if d.exists() and not d.stat().st_mode & 0o001:
            d.chmod(d.stat().st_mode | 0o001)


def remove_accounts(prefix: str) -> None:
    """Remove the system accounts whose names start with ``prefix``, their processes (by PID) and homes."""
    for entry in pwd.getpwall():
        if entry.pw_name.startswith(prefix):
            accounts.kill_processes(entry.pw_uid)
            subprocess.run(["userdel", "--remove", entry.pw_name], capture_output=True, check=False)


class Platform:
    """A `gpulab up` subprocess on its own loopback host and a free port; stopped by PID."""

    def __init__(self, data_dir: Path, host: str, admin_token: str | None = None):
        self.data_dir = Path(data_dir)
        self.host = host
        self.port = free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.admin_token = admin_token or os.urandom(16).hex()
        self.config_file = self.data_dir / "gpulab_config.py"
        self.log_path = self.data_dir / "gpulab-up.log"
        self.proc: subprocess.Popen | None = None
        self.startup_seconds: float | None = None
        # as root, each user runs as a system account of its own: made with a prefix of this platform's,
        # homes beside the data dir, all removed by stop()
        self.account_prefix = f"gt{os.urandom(3).hex()}-"
        self.home_root = self.data_dir.parent / "homes"
        self.service_account = f"{self.account_prefix}svc"  # removed with the users' accounts
        self.passwords: dict[str, str] = {}

    def write_config(self, config: str = "", services: list[dict] = ()) -> None:
        """gpulab_config.py: an admin service for the tests' API calls, extra services, then ``config``."""
        admin = {"name": TEST_ADMIN_SERVICE, "api_token": self.admin_token}
        role = {
            "name": TEST_ADMIN_SERVICE,
            "scopes": ["admin:users", "admin:servers", "admin:groups", "tokens", "read:roles", "read:services"],
            "services": [TEST_ADMIN_SERVICE],
        }
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(
            f"c.Platform.services = {[admin, *services]!r}\nc.Roles.extra_roles = {[role]!r}\n"
            f"c.Platform.account_prefix = {self.account_prefix!r}\nc.Platform.home_root = {str(self.home_root)!r}\n"
            f"c.Platform.service_account = {self.service_account!r}\n"
            # tests that need inference turn it back on
            f"c.Platform.inference_service = False\n{config}\n"
        )

    def env(self) -> dict:
        env = dict(os.environ)
        env["GPULAB_CONFIG"] = str(self.config_file)
        env.pop("GPULAB_CONFIG_OVERRIDES", None)
        return env

    def start(
        self, config: str = "", services: list[dict] = (), timeout: float = 60, run_as: pwd.struct_passwd | None = None
    ) -> "Platform":
        """Start ``gpulab up`` (as root, or as the account ``run_as``: a personal platform)."""
        self.write_config(config, services)
        env, as_account = self.env(), {}
        if os.geteuid() == 0:  # users' accounts must reach their job dirs below the data dir
            open_to_accounts(self.data_dir)
        if run_as is not None:
            for path in (self.data_dir, self.config_file):
                os.chown(path, run_as.pw_uid, run_as.pw_gid)
            env.update(HOME=run_as.pw_dir, USER=run_as.pw_name, LOGNAME=run_as.pw_name)
            as_account = {"user": run_as.pw_uid, "group": run_as.pw_gid, "extra_groups": []}
        started = time.monotonic()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gpulab",
                "up",
                "--ip",
                self.host,
                "--port",
                str(self.port),
                "--data-dir",
                str(self.data_dir),
            ],
            env=env,
            stdout=os.fdopen(os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab"),
            stderr=subprocess.STDOUT,
            **as_account,
        )
        deadline = started + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gpulab up exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(self.url + "/hub/login", timeout=2).status_code == 200:
                    self.startup_seconds = time.monotonic() - started
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"gpulab up did not answer in {timeout}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def stop(self, timeout: float = 40) -> int | None:
        try:
            if self.proc is None or self.proc.poll() is not None:
                return self.proc and self.proc.returncode
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return self.proc.wait()
        finally:
            remove_accounts(self.account_prefix)

    def user_dir(self, user: str) -> Path:
        """A new directory that ``user``'s jobs and kernels can write: owned by the user's account as root
        (made now if the platform has not made it yet), a plain temporary one otherwise."""
        if os.geteuid() != 0:
            return Path(tempfile.mkdtemp(dir=self.data_dir.parent))
        account = accounts.ensure(accounts.AccountPolicy(self.account_prefix, {}, str(self.home_root)), user)
        d = Path(tempfile.mkdtemp(dir=account.home))
        os.chown(d, account.uid, account.gid)
        return d

    def accounts(self) -> list[pwd.struct_passwd]:
        """The system accounts this platform made for its users."""
        return [e for e in pwd.getpwall() if e.pw_name.startswith(self.account_prefix)]

    # --- hub API -----------------------------------------------------------------
    def api(self, method: str, path: str, token: str | None = None, **kwargs) -> requests.Response:
        headers = kwargs.pop("headers", {})
        headers["Authorization"] = f"token {token or self.admin_token}"
        if method in ("POST", "PUT", "PATCH") and "json" not in kwargs and "data" not in kwargs:
            kwargs["json"] = {}
        return requests.request(method, f"{self.url}/hub/api{path}", headers=headers, timeout=30, **kwargs)

    def create_user(self, name: str, groups=()) -> str:
        """Create ``name`` (if new) in ``groups``, with a password of its own (returned, kept in ``passwords``)."""
        r = self.api("POST", f"/users/{name}")
        assert r.status_code in (201, 409), r.text
        for group in groups:
            self.api("POST", f"/groups/{group}")
            r = self.api("POST", f"/groups/{group}/users", json={"users": [name]})
            assert r.status_code == 200, r.text
        if name not in self.passwords:
            r = self.api("POST", f"/gpulab/users/{name}/password")
            assert r.status_code == 201, r.text
            self.passwords[name] = r.json()["password"]
        return self.passwords[name]

    def token(self, user: str, scopes: list[str] | None = None) -> str:
        body = {"note": "test"}
        if scopes is not None:
            body["scopes"] = scopes
        r = self.api("POST", f"/users/{user}/tokens", json=body)
        assert r.status_code == 201, r.text
        return r.json()["token"]

    def wait_for_mlflow(self, token: str, timeout: float = 90) -> None:
        """Wait until the MLflow service answers through the hub with ``token``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                r = requests.get(
                    f"{self.url}/services/mlflow/health", headers={"Authorization": f"token {token}"}, timeout=10
                )
                if r.status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"MLflow not up through the hub:\n{self.log_tail()}")

    def wait_for_inference(self, token: str, timeout: float = 180) -> str:
        """Wait until the inference gateway's gRPC port says Triton is ready (the embedded Triton starts beside
        the hub); return that port's address."""
        import tritonclient.grpc as triton
        from tritonclient.utils import InferenceServerException

        from gpulab.inference.client import HubAuth

        address = self.api("GET", "/services/gpulab-infer").json()["info"]["grpc_address"]
        client = triton.InferenceServerClient(address)
        client.register_plugin(HubAuth(token))
        deadline = time.monotonic() + timeout
        while True:
            try:
                if client.is_server_ready():
                    return address
            except InferenceServerException:
                pass
            assert time.monotonic() < deadline, self.log_tail()
            time.sleep(0.5)

    def spawn(self, user: str, timeout: float = 90) -> str:
        """Start the user's server; return its URL once it answers."""
        r = self.api("POST", f"/users/{user}/server")
        assert r.status_code in (201, 202, 400), r.text
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            model = self.api("GET", f"/users/{user}").json()
            server = model.get("servers", {}).get("", {})
            if server.get("ready"):
                return f"{self.url}/user/{user}/"
            time.sleep(0.3)
        raise RuntimeError(f"server for {user} not ready in {timeout}s:\n{self.log_tail()}")

    def stop_server(self, user: str, timeout: float = 60) -> None:
        """Stop the user's server and wait until the hub has let go of it."""
        self.api("DELETE", f"/users/{user}/server")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.api("GET", f"/users/{user}").json().get("servers"):
                return
            time.sleep(0.3)
        raise RuntimeError(f"server for {user} still active after {timeout}s")

    def server_env(self, user: str) -> dict:
        """The environment of ``user``'s server (spawned if needed), as it gives its kernels."""
        self.spawn(user)
        for proc in self.descendants():
            try:
                if "jupyterhub.singleuser" in proc.cmdline() and proc.environ().get("JUPYTERHUB_USER") == user:
                    return proc.environ()
            except psutil.Error:
                continue
        raise RuntimeError(f"no server process for {user}")
