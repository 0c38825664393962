"""Schemathesis checks of gpulab's own, loaded with ``SCHEMATHESIS_HOOKS=tests.security.schemathesis_checks``."""

import json
import os

import schemathesis

OWNER_KEYS = ("owner", "deployer")  # who an object in an answer belongs to (jobs, models)


def owners(value) -> set[str]:
    """Every owner named anywhere in a JSON answer."""
    if isinstance(value, dict):
        found = {value[k] for k in OWNER_KEYS if isinstance(value.get(k), str)}
        for item in value.values():
            found |= owners(item)
        return found
    if isinstance(value, list):
        return set().union(*map(owners, value)) if value else set()
    return set()


@schemathesis.check
def no_object_of_another_user(ctx, response, case):
    """No answer to ``$GPULAB_FUZZ_USER`` holds an object that belongs to someone else (unset: not checked)."""
    user = os.environ.get("GPULAB_FUZZ_USER")
    if not user or "json" not in response.headers.get("content-type", [""])[0]:
        return
    try:
        body = json.loads(response.content)
    except ValueError:
        return  # not JSON: response_schema_conformance says whether it should have been
    others = owners(body) - {user}
    if others:
        raise AssertionError(f"the answer holds objects of {sorted(others)}")
