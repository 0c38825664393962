"""The route table of the server extension, under ``<base url>gpulab/api/v1``."""

from . import attestation_api, jobs_api, models_api, notebooks_api, pipelines_api
from .handlers import NotFoundHandler, StatusHandler, WhoAmIHandler

API_PREFIX = "gpulab/api/v1"
ROUTES = [
    ("/whoami", WhoAmIHandler),
    ("/status", StatusHandler),
    *jobs_api.ROUTES,
    *attestation_api.ROUTES,
    *models_api.ROUTES,
    *notebooks_api.ROUTES,
    *pipelines_api.ROUTES,
    ("/.*", NotFoundHandler),
]  # last: anything else under the API is a JSON 404, not Jupyter's HTML page


def handlers(base_url: str) -> list:
    """Routes joined to the server's base URL."""
    prefix = base_url.rstrip("/") + "/" + API_PREFIX
    return [(prefix + path, handler) for path, handler in ROUTES]
