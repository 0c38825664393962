"""JobSpec validation: each invalid field is reported with its dotted path and a clear message."""

import pytest
from pydantic import ValidationError

from gpulab.service.errors import ErrorBody
from gpulab.service.handlers import validation_error_body
from gpulab.services.jobs.models import JobSpec

BASE = {"name": "train", "entrypoint": ["python", "train.py"]}


def error_of(body: dict) -> tuple[str, str]:
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate(body)
    return validation_error_body(info.value)


def test_defaults_and_normalisation():
    spec = JobSpec.model_validate({**BASE, "resources": {"memory": "4Gi", "gpus": 1}})
    assert spec.kind == "train" and spec.priority == 0 and spec.retries == 0 and spec.attestation == "none"
    assert (spec.resources.memory, spec.resources.cpus, spec.resources.pool) == (4 * 2**30, 1.0, "default")
    assert JobSpec.model_validate({**BASE, "resources": {"memory": "512Mi"}}).resources.memory == 512 * 2**20
    assert JobSpec.model_validate({**BASE, "resources": {"memory": "2G"}}).resources.memory == 2 * 10**9
    assert JobSpec.model_validate({**BASE, "resources": {"memory": 1024}}).resources.memory == 1024
    cell = JobSpec.model_validate(
        {
            "name": "cell",
            "source": "print(1)",
            "working_dir": "/home/alice",
            "env": {"BATCH": "32", "WANDB_PROJECT": "p", "KEYS": "x"},
        }
    )
    assert cell.entrypoint is None and cell.env["BATCH"] == "32"
    assert JobSpec.model_validate_json(cell.model_dump_json()) == cell


@pytest.mark.parametrize(
    "change, field, message",
    [
        ({"name": ""}, "name", "at least 1 character"),
        ({"name": "x" * 201}, "name", "at most 200 characters"),
        ({"kind": "eval"}, "kind", "'train', 'preprocess' or 'notebook'"),
        ({"entrypoint": []}, "entrypoint", "at least 1 item"),
        ({"entrypoint": ["python", ""]}, "entrypoint.1", "at least 1 character"),
        ({"entrypoint": ["a\x00b"]}, "entrypoint", "NUL"),
        ({"entrypoint": None}, "entrypoint", "exactly one of 'entrypoint', 'source' or 'notebook'"),
        ({"source": "print(1)"}, "source", "exactly one of 'entrypoint', 'source' or 'notebook'"),
        ({"entrypoint": None, "source": "#" * (1024 * 1024 + 1)}, "source", "at most 1 MiB"),
        ({"working_dir": "relative/dir"}, "working_dir", "absolute path"),
        ({"env": {"1BAD": "x"}}, "env", "env variable name '1BAD' is not valid"),
        ({"env": {"A": 1}}, "env.A", "valid string"),
        (
            {"env": {"JUPYTERHUB_API_TOKEN": "x"}},
            "env",
            "'JUPYTERHUB_API_TOKEN' is not allowed (matches JUPYTERHUB_*)",
        ),
        ({"env": {"GPULAB_JOB_TOKEN": "x"}}, "env", "'GPULAB_JOB_TOKEN' is not allowed (matches GPULAB_*)"),
        ({"env": {"HF_TOKEN": "x"}}, "env", "'HF_TOKEN' is not allowed (matches *_TOKEN)"),
        ({"env": {"DB_SECRET": "x"}}, "env", "'DB_SECRET' is not allowed (matches *_SECRET)"),
        ({"env": {"openai_api_key": "x"}}, "env", "'openai_api_key' is not allowed (matches *_KEY)"),
        ({"env": {"PGPASSWORDFILE": "x"}}, "env", "'PGPASSWORDFILE' is not allowed (matches *PASSWORD*)"),
        ({"env": {"AWS_REGION": "x"}}, "env", "'AWS_REGION' is not allowed (matches AWS_*)"),
        ({"env": {"WANDB_API_KEY": "x"}}, "env", "'WANDB_API_KEY' is not allowed"),
        ({"resources": {"gpus": 65}}, "resources.gpus", "less than or equal to 64"),
        ({"resources": {"gpus": -1}}, "resources.gpus", "greater than or equal to 0"),
        ({"resources": {"cpus": 0}}, "resources.cpus", "greater than or equal to 0.01"),
        ({"resources": {"memory": "lots"}}, "resources.memory", "like '4Gi' or '512Mi'"),
        ({"resources": {"memory": 0}}, "resources.memory", "greater than 0"),
        ({"resources": {"memory": True}}, "resources.memory", "number of bytes"),
        ({"resources": {"pool": ""}}, "resources.pool", "at least 1 character"),
        ({"resources": {"tpus": 1}}, "resources.tpus", "Extra inputs are not permitted"),
        ({"priority": 101}, "priority", "less than or equal to 100"),
        ({"priority": -101}, "priority", "greater than or equal to -100"),
        ({"max_runtime": 0}, "max_runtime", "greater than 0"),
        ({"retries": 11}, "retries", "less than or equal to 10"),
        ({"tracking": {"experiment": ""}}, "tracking.experiment", "at least 1 character"),
        ({"tracking": {"mlflow": "x"}}, "tracking.mlflow", "Extra inputs are not permitted"),
        ({"idempotency_key": "k" * 201}, "idempotency_key", "at most 200 characters"),
        ({"labels": {f"k{i}": "v" for i in range(33)}}, "labels", "at most 32 items"),
        ({"labels": {"a=b": "v"}}, "labels", "label key 'a=b' must be"),
        ({"labels": {"team": "v" * 257}}, "labels", "label 'team': value longer than 256"),
        ({"attestation": "maybe"}, "attestation", "'none' or 'required'"),
        ({"gpus": 1}, "gpus", "Extra inputs are not permitted"),
    ],
)
def test_invalid_field(change, field, message):
    body = {k: v for k, v in {**BASE, **change}.items() if v is not None}
    path, text = error_of(body)
    assert path == field
    assert message in text


def test_missing_name_and_error_body():
    path, message = error_of({"entrypoint": ["x"]})
    assert (path, message) == ("name", "Field required")
    body = ErrorBody(error={"code": "invalid", "message": message, "field": path})
    assert body.model_dump() == {
        "error": {"code": "invalid", "message": "Field required", "field": "name", "details": None}
    }
