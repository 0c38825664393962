"""One schemathesis run (``st run``) against a live platform, for the tests of this folder.

Every phase (coverage, fuzzing, stateful; the specs have no examples) and every check but those in
``NOT_RUN``: ``positive_data_acceptance`` expects every schema-valid request to succeed, and some rules cannot
be said in JSON Schema (a list ``cursor`` is opaque: one the API did not hand out is a 400; a size string such
as ``"0Ki"`` matches the pattern and is below the minimum). The counts of generated calls go to the test's
output (``-rA`` shows them).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).parents[2]
EXAMPLES = int(os.environ.get("GPULAB_FUZZ_EXAMPLES", "25"))  # per operation and phase
NOT_RUN = ["positive_data_acceptance"]
# schemathesis's list of refusals, and 413: its bodies that break a maxLength can pass the 1 MiB body limit, and
# their 413 is as much a refusal as a 422
CONFIG = """[checks.negative_data_rejection]
expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx"]
"""


def schemathesis(
    spec: Path, url: str, token: str, work: Path, *, owner: str | None = None, config: str = "", not_run: tuple = ()
) -> dict:
    """Run ``spec`` against ``url`` with ``Authorization: token <token>``; with ``owner``, also fail any answer
    holding an object of someone else's (``schemathesis_checks``). Asserts a clean run; returns its report."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "schemathesis.toml").write_text(CONFIG + config)
    report = work / "report.json"
    command = [
        str(Path(sys.executable).with_name("st")),
        "--config-file",
        str(work / "schemathesis.toml"),
        "run",
        str(spec),
        "--url",
        url,
        "-H",
        f"Authorization: token {token}",
        "--max-examples",
        str(EXAMPLES),
        "--seed",
        "1",
        "--workers",
        "1",
        "--request-timeout",
        "20",
        "--suppress-health-check",
        "all",
        "--report",
        "json",
        "--report-json-path",
        str(report),
        "--checks",
        "all",
        "--exclude-checks",
        ",".join([*NOT_RUN, *not_run]),
    ]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.security.schemathesis_checks", "PYTHONPATH": str(REPO)}
    if owner:
        env["GPULAB_FUZZ_USER"] = owner
    run = subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=900, check=False, env=env)
    assert report.exists(), run.stdout[-4000:] + run.stderr[-4000:]
    result = json.loads(report.read_text())
    print(
        f"{spec.name} at {url}: {result['test_cases']['generated']} calls, {result['operations']['tested']} "
        f"operations, phases {result['phases']}"
    )
    found = run.stdout.partition("= FAILURES =")[2].partition("= WARNINGS =")[0] or run.stdout[-8000:]
    assert (result["failures"], result["errors"], result["exit_code"]) == ([], [], 0), found[:16000]
    assert result["operations"]["tested"] == result["operations"]["total"], result["operations"]
    return result
