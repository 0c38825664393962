"""Where the platform keeps its state when ``c.Platform.data_dir`` is not set: ``$GPULAB_DATA_DIR``, else
``~/.local/share/gpulab``. A module of its own, below :mod:`gpulab.config` and every configurable that
defaults a path into it."""

import os
from pathlib import Path

DEFAULT_DATA_DIR = "~/.local/share/gpulab"


def default_data_dir() -> Path:
    return Path(os.environ.get("GPULAB_DATA_DIR") or DEFAULT_DATA_DIR).expanduser()


def configured_data_dir(config) -> Path:
    """``c.Platform.data_dir`` of ``config`` (a traitlets Config: a configurable's ``self.config``), else the
    default: what configurables that keep state in the data dir default their paths below."""
    given = config.Platform.get("data_dir") if "Platform" in config else None
    return Path(given).expanduser() if given else default_data_dir()
