"""The job service's OpenAPI document: hand-written paths, component schemas from the pydantic models.

``python -m gpulab.services.jobs.openapi`` rewrites the components of ``openapi.yaml`` after a
model changes; a test fails while the file and the models disagree.
"""

from pathlib import Path

import yaml
from pydantic.json_schema import models_json_schema

from ...service.errors import ErrorBody
from .models import (
    AttestationNodeList,
    AttestationNonce,
    AttestationResult,
    EnrolRequest,
    EvidenceRequest,
    Job,
    JobCredentials,
    JobEvent,
    JobIdentity,
    JobList,
    JobSpec,
    JobUpdate,
    NewNodeEnrolment,
    NodeEnrolmentList,
    NonceRequest,
    NotificationFeed,
    NotificationPrefs,
    NotificationSettings,
    Pipeline,
    PipelineList,
    PipelineSpec,
    PoolStatus,
    PoolUpdate,
    ProgressUpdate,
    Quota,
    Schedule,
    ScheduleList,
    ScheduleSpec,
    ScheduleUpdate,
    TrackingUpdate,
    VerifyRequest,
)

SPEC_PATH = Path(__file__).with_name("openapi.yaml")
REQUESTS = (
    JobSpec,
    JobUpdate,
    PoolUpdate,
    PipelineSpec,
    ScheduleSpec,
    ScheduleUpdate,
    NotificationPrefs,
    ProgressUpdate,
    TrackingUpdate,
    NonceRequest,
    VerifyRequest,
    EvidenceRequest,
    EnrolRequest,
)
RESPONSES = (
    Job,
    JobEvent,
    JobCredentials,
    JobIdentity,
    JobList,
    Pipeline,
    PipelineList,
    Schedule,
    ScheduleList,
    NotificationSettings,
    NotificationFeed,
    PoolStatus,
    Quota,
    ErrorBody,
    AttestationNonce,
    AttestationResult,
    AttestationNodeList,
    NewNodeEnrolment,
    NodeEnrolmentList,
)


def component_schemas() -> dict:
    """JSON Schemas of the request and response models, as OpenAPI components."""
    _, defs = models_json_schema(
        [(m, "validation") for m in REQUESTS] + [(m, "serialization") for m in RESPONSES],
        ref_template="#/components/schemas/{model}",
    )
    return defs["$defs"]


def load() -> dict:
    return yaml.safe_load(SPEC_PATH.read_text())


def write() -> None:
    doc = load()
    doc["components"]["schemas"] = component_schemas()
    SPEC_PATH.write_text(yaml.safe_dump(doc, sort_keys=False, width=100))


if __name__ == "__main__":
    write()
