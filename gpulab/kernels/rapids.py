"""GPU-accelerated pandas: cudf.pandas when this process sees a GPU, plain pandas (said once) otherwise.

As an IPython extension (``%load_ext gpulab.kernels.rapids``, loaded by the "Python 3 (GPU,
RAPIDS)" kernel) it also loads the gpulab magics and shows the notice with the first cell
run. ``python -m gpulab.kernels.rapids script.py [args...]`` runs a script the same way
(``%preprocess`` jobs).
"""

import os
import runpy
import sys

from ..gpus import list_gpus

NO_GPU = "gpulab: no GPU found; pandas runs on the CPU (cudf.pandas not active)"
_notice: str | None = None


def visible_gpus() -> list[str]:
    """Names of the GPUs this process may use (none when ``CUDA_VISIBLE_DEVICES`` hides them all)."""
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1", "none", "NoDevFiles")
    return [] if hidden else [gpu["name"] for gpu in list_gpus()]


def activate() -> str:
    """Install cudf.pandas if a GPU is visible (before ``import pandas``); return the one-line notice."""
    global _notice
    if _notice is None:
        gpus = visible_gpus()
        if not gpus:
            _notice = NO_GPU
        else:
            try:
                import cudf.pandas

                cudf.pandas.install()
            except ImportError:
                _notice = (
                    f"gpulab: GPU found ({gpus[0]}) but cudf is not installed; pandas runs on the CPU "
                    "(pip install 'gpulab[gpu]')"
                )
            except Exception as exc:  # noqa: BLE001 - a broken CUDA setup must not stop the kernel
                _notice = f"gpulab: cudf.pandas could not start on {gpus[0]} ({exc}); pandas runs on the CPU"
            else:
                _notice = f"gpulab: cudf.pandas active on {gpus[0]}; import pandas runs on the GPU"
    return _notice


def load_ipython_extension(ip) -> None:
    """Activate, load the gpulab magics, and print the notice with the first cell the user runs."""
    from . import load_ipython_extension as load_magics

    notice = activate()
    load_magics(ip)

    def show_once(*_):
        ip.events.unregister("pre_run_cell", show_once)
        print(notice, flush=True)

    ip.events.register("pre_run_cell", show_once)


def main() -> None:
    """``python -m gpulab.kernels.rapids script.py [args...]``: run the script with activated pandas."""
    if len(sys.argv) < 2:
        sys.exit("usage: python -m gpulab.kernels.rapids script.py [args...]")
    print(activate(), file=sys.stderr, flush=True)
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
