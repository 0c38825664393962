"""The gpulab jupyter_server extension: training, inference and attestation APIs at /gpulab/api/v1/."""

import logging

from ..tracing import setup_tracing
from .jobs_api import configured
from .models_api import InferChannel
from .routes import handlers


def _jupyter_server_extension_points():
    return [{"module": "gpulab.server_extension"}]


def _load_jupyter_server_extension(serverapp):
    setup_tracing("gpulab-server")
    _skip_records_no_handler_writes(serverapp.log)
    serverapp.web_app.settings.update(
        gpulab_jobs=configured("gpulab-jobs"),
        gpulab_infer=configured("gpulab-infer"),
        gpulab_infer_grpc=InferChannel.from_env(),
    )
    serverapp.web_app.add_handlers(".*$", handlers(serverapp.base_url))
    serverapp.log.info("gpulab: API at %sgpulab/api/v1/", serverapp.base_url)


def _skip_records_no_handler_writes(log: logging.Logger) -> None:
    """traitlets leaves the server's logger (and jupyter_server tornado's) at DEBUG and filters in the handlers,
    so every debug call on every request builds a record only to drop it. Both loggers are raised to the lowest
    level a handler writes: the same lines are written, and ``isEnabledFor`` tells the truth."""
    levels = [handler.level for handler in log.handlers]
    if levels and min(levels) > log.getEffectiveLevel():
        for logger in (log, logging.getLogger("tornado")):
            logger.setLevel(min(levels))
