"""Checks behind scripts/gpu-check; each prints one JSON line and lands in the report.

A check that cannot run on this machine (cudf not installed) is reported as skipped with the
reason; a check that runs and finds a fault fails, and the script exits 1.
"""

import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from functools import cache
from pathlib import Path

from jupyter_client.manager import start_new_kernel
from traitlets.config import Config

from gpulab.gpus import _from_smi, list_gpus
from gpulab.kernels import rapids
from gpulab.services.jobs.models import JobSpec
from gpulab.services.jobs.queue import JobQueue
from gpulab.services.jobs.store import JobStore

REPO = Path(__file__).resolve().parent.parent
results: dict[str, dict] = {}


class Skip(Exception):
    """The check cannot run on this machine; the message says why."""


def check(name):
    def run(fn):
        t0 = time.perf_counter()
        try:
            results[name] = {"status": "ok", **(fn() or {})}
        except Skip as e:
            results[name] = {"status": "skipped", "why": str(e)}
        except Exception as e:  # noqa: BLE001 - report every check, not just the first failure
            results[name] = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
        results[name]["seconds"] = round(time.perf_counter() - t0, 2)
        print(name, json.dumps(results[name]), flush=True)

    return run


@cache
def cudf_status() -> str:
    """ "ok", "missing", or why ``import cudf`` fails here (the last line of its traceback)."""
    probe = subprocess.run([sys.executable, "-c", "import cudf"], check=False, capture_output=True, text=True)
    if probe.returncode == 0:
        return "ok"
    return "missing" if "No module named 'cudf'" in probe.stderr else probe.stderr.strip().splitlines()[-1]


@check("machine")
def _():
    query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
    smi = subprocess.run(query, check=False, capture_output=True, text=True).stdout if shutil.which(query[0]) else ""
    return {"python": platform.python_version(), "nvidia_smi": smi.strip(), "cudf": cudf_status()}


@check("gpu_detection")
def _():
    nvml, smi = list_gpus(), _from_smi()
    assert nvml, "NVML found no GPU"
    assert [g["uuid"] for g in nvml] == [g["uuid"] for g in smi], f"NVML {nvml} != nvidia-smi {smi}"
    return {"gpus": nvml}


# A GPU job: what it was given and what CUDA shows it, then a matmul on the GPU; waits for a release file.
GPU_JOB = """
import os, sys, time, torch
from pathlib import Path
x = torch.randn(4096, 4096, device="cuda")
torch.cuda.synchronize()
print("CVD=%s count=%d name=%s sum=%.1f" % (os.environ["CUDA_VISIBLE_DEVICES"], torch.cuda.device_count(),
      torch.cuda.get_device_name(0), float((x @ x).abs().sum() > 0)), flush=True)
while not Path(sys.argv[1]).exists():
    time.sleep(0.05)
"""


@check("job_queue_gpu_accounting")
def _():
    """Fill every GPU with one-GPU jobs through the real queue and local executor: one more waits
    with a GPU reason until a GPU frees; a job asking for more GPUs than the node has never starts."""

    async def until(predicate, what, timeout=120.0):
        deadline = time.monotonic() + timeout
        while not (found := predicate()):
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.05)
        return found

    async def run(d: Path):
        store = JobStore(url=f"sqlite:///{d / 'jobs.sqlite'}")
        inherit = ["PATH", "HOME", "PYTHONPATH", "LD_LIBRARY_PATH"]
        cfg = Config({"JobQueue": {"tick_interval": 0.05, "inherit_env": inherit}})
        queue = JobQueue(config=cfg, store=store, data_dir=str(d), wrap_with_runner=False)
        await queue.start()
        try:
            n = (await queue.executor.capacity())[queue.executor.pool].gpus
            if not n:
                raise Skip("the local executor found no GPU")
            release = d / "release"
            argv = [sys.executable, "-c", GPU_JOB, str(release)]
            spec = {"name": "gpu", "resources": {"gpus": 1}, "entrypoint": argv}
            ids = [(await queue.submit("alice", [], JobSpec.model_validate(spec)))[0].id for _ in range(n + 1)]
            too_big = {**spec, "name": "too-big", "resources": {"gpus": n + 1}}
            big = (await queue.submit("bob", [], JobSpec.model_validate(too_big)))[0].id
            await until(lambda: sum(store.get_job(i).state == "running" for i in ids) == n, f"{n} jobs running")
            waiting = next(store.get_job(i) for i in ids if store.get_job(i).state == "queued")
            await until(lambda: "GPU" in store.get_job(waiting.id).state_reason, "a GPU waiting reason")
            reason = store.get_job(waiting.id).state_reason
            release.touch()
            await until(lambda: all(store.get_job(i).state == "succeeded" for i in ids), "all GPU jobs to succeed")
            big_row = store.get_job(big)
            assert big_row.state == "queued" and "GPU" in big_row.state_reason, (big_row.state, big_row.state_reason)
            await queue.cancel(big, "gpu-check")
            seen = [queue.log_path(store.get_job(i)).read_text().strip().splitlines()[-1] for i in ids]
            for line in seen:
                assert " count=1 " in line and line.startswith("CVD=") and line[4:5].isdigit(), line
            return {"node_gpus": n, "jobs_saw": seen, "waiting": reason, "too_big": big_row.state_reason}
        finally:
            await queue.stop()
            store.engine.dispose()

    with tempfile.TemporaryDirectory() as d:
        return asyncio.run(run(Path(d)))


# What device nodes a job may open: each NVIDIA node, opened for real (the driver answers).
DEVICE_JOB = """
import errno, glob, os
for path in sorted(glob.glob("/dev/nvidia*")):
    try:
        os.close(os.open(path, os.O_RDWR))
        print(os.path.basename(path), "opened")
    except OSError as e:
        print(os.path.basename(path), errno.errorcode.get(e.errno, e.errno))
"""


@check("job_gpu_device_nodes")
def _():
    """Through the real queue: a one-GPU job opens its GPU's node and not the others'; a job without GPUs
    opens no NVIDIA node (cgroup v1's devices controller; v2 is reported as skipped)."""
    from gpulab import cgroups

    if cgroups.version() != 1 or not os.access(cgroups.ROOT / "devices", os.W_OK):
        raise Skip("needs cgroup v1's devices controller, writable (root)")

    async def run(d: Path):
        store = JobStore(url=f"sqlite:///{d / 'jobs.sqlite'}")
        queue = JobQueue(
            config=Config({"JobQueue": {"tick_interval": 0.05}}), store=store, data_dir=str(d), wrap_with_runner=False
        )
        await queue.start()
        try:
            if not (await queue.executor.capacity())[queue.executor.pool].gpus:
                raise Skip("the local executor found no GPU")
            seen = {}
            for gpus in (1, 0):
                spec = {
                    "name": f"devices-{gpus}",
                    "resources": {"gpus": gpus},
                    "entrypoint": [sys.executable, "-c", DEVICE_JOB],
                }
                job = (await queue.submit("alice", [], JobSpec.model_validate(spec)))[0].id
                while (row := store.get_job(job)).state not in ("succeeded", "failed"):
                    await asyncio.sleep(0.05)
                assert row.state == "succeeded", queue.log_path(row).read_text()
                opened = dict(line.split() for line in queue.log_path(row).read_text().splitlines())
                seen[gpus] = {"gpu_ids": row.handle["gpu_ids"], "nodes": opened}
            own = f"nvidia{seen[1]['gpu_ids'][0]}"
            assert seen[1]["nodes"][own] == "opened", seen[1]
            assert all(v == "EPERM" for k, v in seen[1]["nodes"].items() if k[6:].isdigit() and k != own), seen[1]
            assert all(v == "EPERM" for v in seen[0]["nodes"].values()), seen[0]
            return seen
        finally:
            await queue.stop()
            store.engine.dispose()

    with tempfile.TemporaryDirectory() as d:
        return asyncio.run(run(Path(d)))


@check("rapids_kernel")
def _():
    """The "Python 3 (GPU, RAPIDS)" kernel from this repo: cudf.pandas active when cudf works, else a
    one-line notice saying why and plain pandas."""
    with tempfile.TemporaryDirectory() as d:
        shutil.copytree(REPO / "jupyter-kernels", Path(d) / "kernels")
        os.environ["JUPYTER_PATH"] = d
        km, kc = start_new_kernel(kernel_name="gpulab-rapids")
        out = []
        try:
            code = "import pandas as pd, sys\nprint('cudf.pandas' in sys.modules, pd.DataFrame({'a': [1, 2]}).a.sum())"
            reply = kc.execute_interactive(code, timeout=300, output_hook=out.append)
            text = "".join(m["content"].get("text", "") for m in out if m["msg_type"] == "stream")
        finally:
            kc.stop_channels()
            km.shutdown_kernel(now=True)
    assert reply["content"]["status"] == "ok", reply["content"]
    notice, result = text.strip().splitlines()
    if not list_gpus():
        assert notice == rapids.NO_GPU and result == "False 3", (notice, result)
    elif (cudf := cudf_status()) == "ok":
        assert notice.startswith("gpulab: cudf.pandas active on NVIDIA"), notice
        assert result == "True 3", result
    else:
        expected = "cudf is not installed" if cudf == "missing" else "cudf.pandas could not start"
        assert expected in notice and result == "False 3", (notice, result)
    return {"notice": notice, "output": result}


GROUPBY = """
import time, numpy as np, pandas as pd
n = 10_000_000
rng = np.random.default_rng(0)
df = pd.DataFrame({"k": rng.integers(0, 1000, n), "v": rng.random(n)})
df.groupby("k").v.mean()  # warm up
t = time.perf_counter(); df.groupby("k").v.agg(["mean", "sum", "count"]); print(time.perf_counter() - t)
"""


@check("preprocess_groupby_10m_rows")
def _():
    """The %preprocess path (``python -m gpulab.kernels.rapids``) with the GPU visible vs hidden."""
    if (cudf := cudf_status()) != "ok":
        raise Skip(f"cudf does not work on this machine: {cudf}")
    with tempfile.TemporaryDirectory() as d:
        script = Path(d) / "groupby.py"
        script.write_text(GROUPBY)
        timings = {}
        for label, cvd in (("cudf.pandas", "0"), ("pandas", "")):
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": cvd}
            done = subprocess.run(
                [sys.executable, "-m", "gpulab.kernels.rapids", str(script)],
                env=env,
                check=False,
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert done.returncode == 0, done.stderr[-2000:]
            notice = done.stderr.strip().splitlines()[0]
            expected = rapids.NO_GPU if label == "pandas" else "gpulab: cudf.pandas active on NVIDIA"
            assert notice.startswith(expected), notice
            timings[label] = float(done.stdout.strip().splitlines()[-1])
    return {"groupby_seconds": timings, "speedup": round(timings["pandas"] / timings["cudf.pandas"], 1)}


if os.environ.get("OUT"):
    Path(os.environ["OUT"], "gpu-check.json").write_text(json.dumps(results, indent=2))
sys.exit(0 if all(r["status"] != "failed" for r in results.values()) else 1)
