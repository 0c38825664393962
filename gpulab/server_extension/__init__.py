"""The gpulab jupyter_server extension: training, inference and attestation APIs at /gpulab/api/v1/."""

from ..tracing import setup_tracing
from .jobs import JobsBackend
from .models import InferBackend
from .routes import handlers


def _jupyter_server_extension_points():
    return [{"module": "gpulab.server_extension"}]


def _load_jupyter_server_extension(serverapp):
    setup_tracing("gpulab-server")
    serverapp.web_app.settings["gpulab_jobs"] = JobsBackend.from_env()
    serverapp.web_app.settings["gpulab_infer"] = InferBackend.from_env()
    serverapp.web_app.add_handlers(".*$", handlers(serverapp.base_url))
    serverapp.log.info("gpulab: API at %sgpulab/api/v1/", serverapp.base_url)
