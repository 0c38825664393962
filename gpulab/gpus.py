"""The GPUs this machine has: NVML when ``pynvml`` is importable, else ``nvidia-smi -L``, else none."""

import re
import shutil
import subprocess

_SMI_LINE = re.compile(r"GPU (\d+): (.+?) \(UUID: ([^)]+)\)")


def list_gpus() -> list[dict]:
    """``[{"index", "name", "uuid"}]``; empty on a machine without NVIDIA GPUs or drivers."""
    try:
        import pynvml
    except ImportError:
        return _from_smi()
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return []
    try:
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name, uuid = pynvml.nvmlDeviceGetName(handle), pynvml.nvmlDeviceGetUUID(handle)
            out.append({"index": i, "name": _text(name), "uuid": _text(uuid)})
        return out
    finally:
        pynvml.nvmlShutdown()


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _from_smi() -> list[dict]:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [{"index": int(m[1]), "name": m[2], "uuid": m[3]} for m in _SMI_LINE.finditer(out)]
