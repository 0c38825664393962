# JupyterHub configuration for gpulab. Do not edit: configure the platform in
# gpulab_config.py ($GPULAB_CONFIG); this file only hands the hub's `c` to gpulab.
from gpulab.hub_config import configure

configure(c)  # noqa: F821 (c is provided by JupyterHub)
