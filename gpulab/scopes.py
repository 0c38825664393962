"""gpulab's custom JupyterHub scopes and the roles that bundle them."""

JOBS = "custom:gpulab:jobs"
GPU = "custom:gpulab:gpu"
DEPLOY = "custom:gpulab:deploy"
INFER = "custom:gpulab:infer"
ATTEST = "custom:gpulab:attest"
ADMIN = "custom:gpulab:admin"

CUSTOM_SCOPES = {
    JOBS: {"description": "Submit and manage your own training jobs."},
    GPU: {"description": "Request GPUs for jobs."},
    DEPLOY: {"description": "Deploy, load and unload models on Triton."},
    INFER: {"description": "Call deployed models."},
    ATTEST: {"description": "Request nonces and verify GPU attestation."},
    ADMIN: {
        "description": "Administer gpulab: every user's jobs, quotas and models.",
        "subscopes": [JOBS, GPU, DEPLOY, INFER, ATTEST],
    },
}
ALL = tuple(CUSTOM_SCOPES)

JOBS_SERVICE = "gpulab-jobs"
MLFLOW_SERVICE = "mlflow"
INFER_SERVICE = "gpulab-infer"
TRITON_SERVICE = "triton"

CLI_SERVICE = "gpulab-cli"  # the token `gpulab users` and `gpulab nodes` call with (no process of its own)
# `gpulab nodes` enrols GPU nodes in gpulab-jobs, which needs the gpulab admin scope there
CLI_SCOPES = ["admin:users", "admin:groups", "admin:servers", ADMIN, f"access:services!service={JOBS_SERVICE}"]
SERVICE_ACCESS = [f"access:services!service={name}" for name in (JOBS_SERVICE, MLFLOW_SERVICE, INFER_SERVICE)]

ROLES = {
    "gpulab-user": [JOBS, INFER, ATTEST, *SERVICE_ACCESS],
    "gpulab-gpu": [GPU],
    "gpulab-deployer": [DEPLOY],
    "gpulab-admin": [ADMIN, *SERVICE_ACCESS],
}


def expand(scopes) -> set[str]:
    """Scopes plus the gpulab subscopes they imply."""
    out = set(scopes)
    for scope in scopes:
        out.update(CUSTOM_SCOPES.get(scope, {}).get("subscopes", ()))
    return out


def gpulab_scopes(scopes) -> list[str]:
    """The gpulab custom scopes among ``scopes`` (expanded, sorted)."""
    return sorted(s for s in expand(scopes) if s in CUSTOM_SCOPES)
