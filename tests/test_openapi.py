"""Every route a handler serves is in its OpenAPI spec, and the other way round."""

import re
from pathlib import Path

from gpulab.server_extension.routes import handlers
from tests.support.openapi import Spec

ROOT = Path(__file__).parent.parent


def spec_path_pattern(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "{}", path)


def route_pattern(route: str, prefix: str) -> str:
    return re.sub(r"\(\?P<[^>]+>[^)]+\)|\([^)]+\)", "{}", route[len(prefix) :]).rstrip("$")


def test_server_extension_routes_match_spec():
    prefix = "/gpulab/api/v1"
    routes = {route_pattern(r[0], prefix) for r in handlers("/")}
    spec = {spec_path_pattern(p) for p in Spec(ROOT / "gpulab" / "server_extension" / "openapi.yaml").paths()}
    assert routes - {"/.*"} == spec  # the last route answers JSON 404 for anything else


def test_job_service_routes_match_spec():
    from gpulab.services.jobs.app import api_handlers as job_handlers

    prefix = "/services/gpulab-jobs/api/v1"
    routes = {route_pattern(r[0], prefix) for r in job_handlers("/services/gpulab-jobs/")}
    spec = {spec_path_pattern(p) for p in Spec(ROOT / "gpulab" / "services" / "jobs" / "openapi.yaml").paths()}
    assert routes == spec


def test_inference_service_routes_match_spec():
    from gpulab.services.infer.api import handlers as infer_handlers

    prefix = "/services/gpulab-infer/api/v1"
    routes = {route_pattern(r[0], prefix) for r in infer_handlers("/services/gpulab-infer/")}
    spec = {spec_path_pattern(p) for p in Spec(ROOT / "gpulab" / "services" / "infer" / "openapi.yaml").paths()}
    assert routes == spec


def test_job_service_spec_schemas_match_models():
    from gpulab.services.jobs import openapi

    assert openapi.load()["components"]["schemas"] == openapi.component_schemas(), (
        "run: python -m gpulab.services.jobs.openapi"
    )
