"""Checks behind scripts/gpu-check; each prints one line and lands in the JSON report."""

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from jupyter_client.manager import start_new_kernel

from gpulab.gpus import list_gpus
from gpulab.services.jobs.executors.base import Launch
from gpulab.services.jobs.executors.local import LocalExecutor

results = {}


def check(name):
    def run(fn):
        t0 = time.perf_counter()
        try:
            results[name] = {"ok": True, **(fn() or {})}
        except Exception as e:  # report every check, not just the first failure
            results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        results[name]["seconds"] = round(time.perf_counter() - t0, 2)
        print(name, json.dumps(results[name]), flush=True)
    return run


@check("gpus")
def _():
    gpus = list_gpus()
    assert gpus, "no GPU found by NVML or nvidia-smi"
    return {"gpus": gpus}


@check("local_executor_cuda_visible_devices")
def _():
    async def run():
        with tempfile.TemporaryDirectory() as d:
            ex = LocalExecutor(state_dir=d)
            cap = await ex.capacity()
            code = "import os; print(os.environ['CUDA_VISIBLE_DEVICES'])"
            launch = Launch(job_id="gpucheck", attempt=1, owner="check", argv=[sys.executable, "-c", code],
                            working_dir=d, env={}, gpus=1, cpus=1, memory=None, pool=ex.pool,
                            log_path=Path(d) / "attempt-1.log", gpu_ids=[0])
            handle = await ex.start(launch)
            while (await ex.poll(handle)).state == "running":
                await asyncio.sleep(0.1)
            return {"capacity_gpus": cap[ex.pool].gpus, "job_saw": (Path(d) / "attempt-1.log").read_text().strip()}

    out = asyncio.run(run())
    assert out["job_saw"] == "0" and out["capacity_gpus"] >= 1, out
    return out


@check("rapids_kernel_cudf_pandas")
def _():
    km, kc = start_new_kernel(kernel_name="gpulab-rapids")
    out = []
    try:
        code = "import pandas as pd, sys\nprint('cudf.pandas' in sys.modules, type(pd.DataFrame).__module__)"
        reply = kc.execute_interactive(code, timeout=300, output_hook=lambda m: out.append(m))
        text = "".join(m["content"].get("text", "") for m in out if m["msg_type"] == "stream")
        assert reply["content"]["status"] == "ok", reply["content"]
        assert text.startswith("True"), text
        return {"output": text.strip()}
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


GROUPBY = """
import time, numpy as np, {lib} as xd
n = 10_000_000
rng = np.random.default_rng(0)
df = xd.DataFrame({{"k": rng.integers(0, 1000, n), "v": rng.random(n)}})
df.groupby("k").v.mean()  # warm up
t = time.perf_counter(); df.groupby("k").v.agg(["mean", "sum", "count"]); print(time.perf_counter() - t)
"""


@check("groupby_10m_rows")
def _():
    timings = {}
    for lib in ("pandas", "cudf"):
        done = subprocess.run([sys.executable, "-c", GROUPBY.format(lib=lib)], capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        timings[lib] = float(done.stdout.strip().splitlines()[-1])
    return {"seconds": timings, "speedup": round(timings["pandas"] / timings["cudf"], 1)}


if os.environ.get("OUT"):
    Path(os.environ["OUT"], "gpu-check.json").write_text(json.dumps(results, indent=2))
sys.exit(0 if all(r["ok"] for r in results.values()) else 1)
