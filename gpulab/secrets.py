"""Secrets: read from 0600 files or the environment, never shown."""

import os
import secrets
import stat
from pathlib import Path

from .errors import ConfigError

JOB_SECRET_ENV = ("GPULAB_JOB_TOKEN", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD", "WANDB_API_KEY")
"""The secrets in a job's environment: masked in what the runtime prints, and never handed to an executor
whose job environment others can read (Ray's dashboard): such jobs claim them from the job service."""


class Secret:
    """A secret value whose ``repr`` and ``str`` never reveal it."""

    __slots__ = ("_value", "source")

    def __init__(self, value: str, source: str):
        self._value = value
        self.source = source

    def reveal(self) -> str:
        """The secret itself; call only where it is sent to its one destination."""
        return self._value

    def __repr__(self) -> str:
        return f"Secret(<redacted>, source={self.source!r})"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self._value)


def read_secret_file(path: str | os.PathLike, setting: str) -> Secret:
    """Read a secret from a file that only its owner may read.

    ``setting`` names the config trait that points at the file, for the error message.
    """
    p = Path(path).expanduser()
    try:
        st = p.stat()
    except FileNotFoundError:
        raise ConfigError(f"{setting}: secret file {p} does not exist") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{setting}: {p} is not a regular file")
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"{setting}: secret file {p} is readable by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {p}"
        )
    value = p.read_text().strip()
    if not value:
        raise ConfigError(f"{setting}: secret file {p} is empty")
    return Secret(value, source=str(p))


def secret_from(file_path: str, env_name: str, setting: str) -> Secret | None:
    """A secret from ``file_path`` if set, else popped from the environment variable ``env_name``."""
    if file_path:
        return read_secret_file(file_path, setting)
    value = os.environ.pop(env_name, "")
    return Secret(value, source=f"${env_name}") if value else None


def persistent_secret(path: Path, nbytes: int = 32) -> str:
    """A random secret kept in a 0600 file, created on first use."""
    if path.exists():
        return read_secret_file(path, str(path)).reveal()
    value = secrets.token_urlsafe(nbytes)
    write_secret_file(path, value)
    return value


def write_secret_file(path: Path, value: str) -> None:
    """Create (or replace) a 0600 file holding ``value``."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    os.chmod(path, 0o600)
