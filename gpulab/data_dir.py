"""Where the platform keeps its state when ``c.Platform.data_dir`` is not set: ``$GPULAB_DATA_DIR``, else
``~/.local/share/gpulab``. A module of its own, below :mod:`gpulab.config` and every configurable that
defaults a path into it."""

import os
from pathlib import Path

DEFAULT_DATA_DIR = "~/.local/share/gpulab"


def default_data_dir() -> Path:
    return Path(os.environ.get("GPULAB_DATA_DIR") or DEFAULT_DATA_DIR).expanduser()
