"""Who a request to MLflow is from, as the proxy tells MLflow (:mod:`.auth`) and as services ask it to.

A caller is a hub user (their own name and hub groups; ``admin`` if a hub admin), a running job (its owner
and the owner's groups, never admin), a hub service (``service:<name>``, no groups) or a user a delegate
service acts for: gpulab-infer fetches a model being deployed with
``as:<user>:<1 if admin else 0>:<its own hub token>``, so that MLflow decides whether the deployer may read it
(their groups as MLflow last saw them).
"""

USER_HEADER = "X-Gpulab-User"
ADMIN_HEADER = "X-Gpulab-Admin"
GROUPS_HEADER = "X-Gpulab-Groups"  # a JSON list; absent where the proxy does not know them
HEADER_PREFIX = "x-gpulab-"  # headers of this name from clients are dropped by the proxy
ADMIN_USERNAME = "mlflow:admin"  # MLflow's built-in admin: no hub name holds ':'
DELEGATION_PREFIX = "as:"


def mlflow_user(caller: dict) -> tuple[str, bool, list[str] | None]:
    """(MLflow user name, admin, hub groups or None if unknown) of a caller the proxy authenticated (a hub
    user/service model, a job's, or a delegation's)."""
    if caller.get("kind") == "service":
        return f"service:{caller['name']}", False, []
    admin = caller.get("kind") in ("user", "delegated") and bool(caller.get("admin"))
    return caller["name"], admin, None if caller.get("kind") == "delegated" else list(caller.get("groups") or [])


def delegated_credential(user: str, admin: bool, token: str) -> str:
    """The MLflow tracking token with which a delegate service acts for ``user``."""
    return f"{DELEGATION_PREFIX}{user}:{int(admin)}:{token}"
