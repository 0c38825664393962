"""Real Triton servers for tests (the binary in ``.venv-triton``, made by ``scripts/setup-triton``) and tiny
ONNX models to serve on them."""

import os
import signal
import subprocess
from pathlib import Path

import numpy as np

from gpulab.inference.triton import TritonServer

REPO = Path(__file__).resolve().parents[2]
VENV_PYTHON = REPO / ".venv-triton" / "bin" / "python"


def triton_python() -> str:
    """The Triton venv's Python, creating the venv on first use; skips the test when that is impossible."""
    result = subprocess.run(
        [str(REPO / "scripts" / "setup-triton")], capture_output=True, text=True, timeout=1200, check=False
    )
    if result.returncode != 0 or not VENV_PYTHON.exists():
        import pytest  # here only: benchmarks import this module without pytest

        pytest.skip(f"no Triton: scripts/setup-triton failed ({result.returncode}):\n{result.stderr[-2000:]}")
    return str(VENV_PYTHON)


def linear_onnx(
    path: Path, inputs: int = 4, outputs: int = 3, seed: int = 0, input_name: str = "x"
) -> tuple[np.ndarray, np.ndarray]:
    """Write ``y = x·W + b`` (x: [1, inputs] FP32, named ``input_name``; y: [1, outputs]) as ONNX; returns W and b."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = rng.standard_normal((inputs, outputs)).astype(np.float32)
    b = rng.standard_normal(outputs).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", [input_name, "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])],
        "linear",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [1, inputs])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, outputs])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(model, str(path))
    return w, b


def start_tritons(count: int, repository: Path, workdir: Path, key: str, sockets: int = 0) -> list[TritonServer]:
    """``count`` servers on one repository, sharing the restricted-protocol ``key``; logs in ``workdir``. The last
    ``sockets`` of them listen on unix sockets (as the platform's own Triton does), the others on TCP ports."""
    servers = [
        TritonServer(
            python=triton_python(),
            model_repository=str(repository),
            restricted_key=key,
            log_path=str(workdir / f"triton-{i}.log"),
            socket_dir=str(workdir / f"sockets-{i}") if i >= count - sockets else "",
        )
        for i in range(count)
    ]
    for server in servers:
        server.start(timeout=120)
    return servers


def crash(server: TritonServer) -> None:
    """SIGKILL the server and its Python stubs (its process group), as a crash would."""
    os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.wait()


def perf_analyzer() -> str:
    """Triton's perf_analyzer, installed on first use by ``scripts/setup-perf-analyzer``; skips the test when
    that is impossible."""
    binary = REPO / ".venv-triton" / "bin" / "perf_analyzer"
    triton_python()
    result = subprocess.run(
        [str(REPO / "scripts" / "setup-perf-analyzer")], capture_output=True, text=True, timeout=600, check=False
    )
    if result.returncode != 0:
        import pytest

        pytest.skip(f"no perf_analyzer: scripts/setup-perf-analyzer failed:\n{result.stderr[-2000:]}")
    return str(binary)
