"""JupyterHub roles from gpulab's config: custom scopes bundled into roles, mapped to groups."""

from jupyterhub.scopes import scope_definitions

from .. import scopes
from ..errors import ConfigError


def _check_role_names(names, setting: str) -> None:
    for name in names:
        if name not in scopes.ROLES:
            raise ConfigError(f"{setting}: unknown role '{name}' (known: {', '.join(scopes.ROLES)})")


def _check_scopes(role: dict, setting: str) -> None:
    known = set(scope_definitions) | set(scopes.CUSTOM_SCOPES)
    for scope in role.get("scopes", []):
        if scope.split("!", 1)[0] not in known:
            raise ConfigError(f"{setting}: unknown scope '{scope}' in role '{role.get('name')}'")


def roles_for(groups, admin: bool, roles_cfg) -> list[str]:
    """The gpulab roles a user with these groups holds."""
    out = set(roles_cfg.everyone)
    for group in groups:
        out.update(roles_cfg.group_roles.get(group, ()))
    if admin:
        out.add("gpulab-admin")
    return sorted(out)


def load_roles(roles_cfg, admin_users, admin_groups) -> list[dict]:
    """``c.JupyterHub.load_roles``: the gpulab roles, the ``user`` role and any extra roles."""
    _check_role_names(roles_cfg.everyone, "Roles.everyone")
    members = {name: set() for name in scopes.ROLES}
    for group, names in roles_cfg.group_roles.items():
        _check_role_names(names, f"Roles.group_roles[{group!r}]")
        for name in names:
            members[name].add(group)
    members["gpulab-admin"].update(admin_groups)

    everyone_scopes = sorted({s for name in roles_cfg.everyone for s in scopes.ROLES[name]})
    out = [{"name": "user", "description": "Every user", "scopes": ["self", *everyone_scopes]}]
    for name, role_scopes in scopes.ROLES.items():
        role = {"name": name, "scopes": list(role_scopes), "groups": sorted(members[name])}
        if name == "gpulab-admin":
            role["users"] = sorted(admin_users)
        out.append(role)
    for i, role in enumerate(roles_cfg.extra_roles):
        setting = f"Roles.extra_roles[{i}]"
        if not role.get("name"):
            raise ConfigError(f"{setting}: a role needs a 'name'")
        _check_scopes(role, setting)
        out.append(dict(role))
    return out
