# JupyterHub configuration for gpulab. Do not edit: configure the platform in
# gpulab_config.py ($GPULAB_CONFIG); this file only hands the hub's `c` to gpulab.
import sys

from gpulab.errors import ConfigError
from gpulab.hub_config import configure

try:
    configure(c)  # noqa: F821 (c is provided by JupyterHub)
except ConfigError as e:  # one line, not a traceback; `gpulab up` checked the file before
    sys.exit(f"gpulab: error: {e}")
