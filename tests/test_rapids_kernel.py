"""The "Python 3 (GPU, RAPIDS)" kernel spec, installed into a temporary JUPYTER_PATH and started for real.

This machine has no GPU: the CPU fallback is what runs here (the GPU path needs cudf on a GPU node).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gpulab.kernels import rapids
from tests.support.kernel import Kernel

SPEC_DIR = Path(__file__).resolve().parent.parent / "jupyter-kernels" / "gpulab-rapids"


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    jupyter_path = tmp_path_factory.mktemp("jupyter")
    shutil.copytree(SPEC_DIR, jupyter_path / "kernels" / "gpulab-rapids")
    env = {k: v for k, v in os.environ.items() if k not in ("GPULAB_JOBS_URL", "CUDA_VISIBLE_DEVICES")}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JUPYTER_PATH", str(jupyter_path))  # where jupyter_client finds the spec
        kernel = Kernel("gpulab-rapids", env=env, cwd=str(jupyter_path))
    yield kernel
    kernel.stop()


def test_kernel_spec(kernel):
    spec = json.loads((SPEC_DIR / "kernel.json").read_text())
    assert spec["display_name"] == "Python 3 (GPU, RAPIDS)" and "{connection_file}" in spec["argv"]
    assert kernel.km.kernel_spec.display_name == "Python 3 (GPU, RAPIDS)"


def test_pandas_works_with_one_notice_and_the_magics_are_loaded(kernel):
    first = kernel.run("import pandas\nprint(pandas.DataFrame({'a': [1, 2, 2]}).groupby('a').size().to_dict())")
    assert first.reply["status"] == "ok", first.messages
    assert first.stdout == f"{rapids.NO_GPU}\n{{1: 1, 2: 2}}\n"
    second = kernel.run("import sys\nprint('cudf' in sys.modules)\n%load_ext gpulab\n%jobs")
    assert second.stdout == "False\n", second.messages  # plain pandas, and no second notice
    assert second.stderr.startswith("%jobs: not running in a gpulab server: GPULAB_JOBS_URL is not set")


def test_preprocess_runner_runs_a_script_with_the_notice(tmp_path):
    script = tmp_path / "prep.py"
    script.write_text("import sys, pandas\nprint('args', sys.argv[1:], __name__)\n")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # as the job service sets it for CPU jobs
    done = subprocess.run(
        [sys.executable, "-m", "gpulab.kernels.rapids", str(script), "--in", "x.csv"],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "args ['--in', 'x.csv'] __main__\n" and done.stderr.strip() == rapids.NO_GPU


def test_a_gpu_without_cudf_says_so(monkeypatch):
    monkeypatch.setattr(rapids, "_notice", None)
    monkeypatch.setattr(rapids, "list_gpus", lambda: [{"index": 0, "name": "NVIDIA H100", "uuid": "GPU-1"}])
    monkeypatch.setitem(sys.modules, "cudf", None)  # not installed
    assert rapids.activate().startswith("gpulab: GPU found (NVIDIA H100) but cudf is not installed")
    monkeypatch.setattr(rapids, "_notice", None)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert rapids.activate() == rapids.NO_GPU
