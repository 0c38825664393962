"""The kernel side of gpulab: the ``%train`` family of magics, job widgets, the Python API, RAPIDS.

``%load_ext gpulab.kernels`` registers the magics; ``client`` holds the Python API
(``submit``, ``jobs``, ``job``), ``widgets`` the Launcher, Monitor and JobList, and
``rapids`` the GPU pandas setup of the "Python 3 (GPU, RAPIDS)" kernel.
"""


def load_ipython_extension(ip) -> None:
    """Register the gpulab magics in IPython shell ``ip`` (safe to call again)."""
    from .magics import GpulabMagics

    ip.register_magics(GpulabMagics)
