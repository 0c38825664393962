"""Locate (or install) configurable-http-proxy, the platform's gateway."""

import shutil
import subprocess
from pathlib import Path

from ..errors import ConfigError

CHP_PACKAGE = "configurable-http-proxy@5.2.0"


def proxy_command(configured: list[str], data_dir: Path) -> list[str]:
    """The CHP command: configured, on PATH, in the data dir, or freshly installed there with npm."""
    if configured:
        return list(configured)
    found = shutil.which("configurable-http-proxy")
    if found:
        return [found]
    local = data_dir / "node" / "node_modules" / ".bin" / "configurable-http-proxy"
    if not local.exists():
        npm = shutil.which("npm")
        if not npm:
            raise ConfigError(
                "configurable-http-proxy is not installed and npm is missing: install Node.js and npm "
                "(e.g. apt-get install -y nodejs npm), or set Platform.proxy_command"
            )
        print(f"gpulab: installing {CHP_PACKAGE} into {local.parent.parent.parent} (first run)", flush=True)
        result = subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--prefix", str(data_dir / "node"), CHP_PACKAGE],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0 or not local.exists():
            tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
            raise ConfigError(f"installing {CHP_PACKAGE} with npm failed: {tail[0]}")
    return [str(local)]
