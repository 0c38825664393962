"""Enforce gpulab's custom scopes in each user's server."""

from jupyterhub.singleuser.extension import JupyterHubAuthorizer

from .. import scopes

# resource -> scopes any one of which grants access
RESOURCE_SCOPES = {
    "gpulab": scopes.ALL,
    "gpulab:jobs": (scopes.JOBS,),
    "gpulab:gpu": (scopes.GPU,),
    "gpulab:deploy": (scopes.DEPLOY,),
    "gpulab:infer": (scopes.INFER,),
    "gpulab:attest": (scopes.ATTEST,),
    "gpulab:admin": (scopes.ADMIN,),
}


def user_scopes(user) -> list[str]:
    """The gpulab scopes the hub granted to this request's token."""
    hub_user = getattr(user, "hub_user", None) or {}
    return scopes.gpulab_scopes(hub_user.get("scopes", []))


class GpulabAuthorizer(JupyterHubAuthorizer):
    """JupyterHub's authorizer plus gpulab resources: ``gpulab:<part>`` needs ``custom:gpulab:<part>``."""

    def is_authorized(self, handler, user, action, resource):
        if not super().is_authorized(handler, user, action, resource):
            return False
        if not resource.startswith("gpulab"):
            return True
        needed = RESOURCE_SCOPES.get(resource)
        if needed is None:
            self.log.warning("gpulab: no scope defined for resource %s; denying", resource)
            return False
        return bool(set(needed) & set(user_scopes(user)))
