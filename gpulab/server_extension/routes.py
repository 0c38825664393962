"""The route table of the server extension, under ``<base url>gpulab/api/v1``."""

from . import attestation, jobs, models
from .handlers import StatusHandler, WhoAmIHandler

API_PREFIX = "gpulab/api/v1"
ROUTES = [("/whoami", WhoAmIHandler), ("/status", StatusHandler), *jobs.ROUTES, *attestation.ROUTES, *models.ROUTES]


def handlers(base_url: str) -> list:
    """Routes joined to the server's base URL."""
    prefix = base_url.rstrip("/") + "/" + API_PREFIX
    return [(prefix + path, handler) for path, handler in ROUTES]
