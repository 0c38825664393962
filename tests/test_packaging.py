"""Each role installs its own extra (pyproject.toml): the core, ``gpulab[server]`` for users' servers and jobs,
``gpulab[inference]`` for the gateway, ``gpulab[hub]`` for the hub and its services. Each role's modules are
imported here with every distribution outside that role's requirements (followed transitively through the
installed distributions' own metadata) made unimportable, so a module that reaches for another role's
dependency fails here rather than in a deployment that installed only its role."""

import json
import subprocess
import sys
import tomllib
from importlib import metadata

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.support.triton import REPO

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
ROLES = {
    "core": ([], ["gpulab.cli", "gpulab.attestation.collect", "gpulab.config", "gpulab.gpus"]),
    "server": (
        ["server"],
        ["gpulab.server_extension", "gpulab.kernels.magics", "gpulab.kernels.widgets", "gpulab.runner"],
    ),
    "inference": (["inference"], ["gpulab.services.infer.app", "gpulab.inference.convert", "gpulab.inference.serve"]),
    "hub": (
        ["hub"],
        ["gpulab.hub_config", "gpulab.services.jobs.app", "gpulab.services.mlflow.app", "gpulab.services.infer.app"],
    ),
}

# run in a fresh interpreter: imports of modules outside ALLOWED fail as if they were not installed
IMPORT_WITH_ONLY = r"""
import importlib, importlib.abc, json, sys
allowed, blocked, modules = json.loads(sys.argv[1])

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in blocked and top not in allowed:
            raise ModuleNotFoundError(f"No module named {name!r} (not a requirement of this role)", name=name)
        return None

sys.meta_path.insert(0, Blocker())
for module in modules:
    importlib.import_module(module)
"""


def requirements_of(extras: list[str]) -> list[Requirement]:
    """gpulab's own requirements with ``extras`` (each extra's own gpulab[...] followed)."""
    out, todo, seen = [Requirement(r) for r in PYPROJECT["dependencies"]], list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for line in PYPROJECT["optional-dependencies"][extra]:
            requirement = Requirement(line)
            if canonicalize_name(requirement.name) == "gpulab":
                todo += sorted(requirement.extras)
            else:
                out.append(requirement)
    return out


def distributions_of(requirements: list[Requirement]) -> set[str]:
    """Every installed distribution these requirements bring in, transitively (with the extras they ask for)."""
    found, todo = set(), [(r, frozenset(r.extras)) for r in requirements]
    visited = set()
    while todo:
        requirement, extras = todo.pop()
        name = canonicalize_name(requirement.name)
        if (name, extras) in visited:
            continue
        visited.add((name, extras))
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:  # not installed here (cudf on a machine without a GPU)
            continue
        found.add(name)
        for line in dist.requires or []:
            sub = Requirement(line)
            if sub.marker and not any(sub.marker.evaluate({"extra": e}) for e in (*extras, "")):
                continue
            todo.append((sub, frozenset(sub.extras)))
    return found


def import_names() -> dict[str, set[str]]:
    """Top-level module name -> the installed distributions that provide it."""
    out: dict[str, set[str]] = {}
    for module, dists in metadata.packages_distributions().items():
        out[module] = {canonicalize_name(d) for d in dists}
    return out


@pytest.mark.parametrize("role", ROLES)
def test_each_role_imports_with_its_own_requirements_only(role):
    extras, modules = ROLES[role]
    mine = distributions_of(requirements_of(extras)) | {"gpulab"}
    providers = import_names()
    allowed = sorted(m for m, dists in providers.items() if dists & mine)
    blocked = sorted(m for m, dists in providers.items() if not dists & mine)
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_WITH_ONLY, json.dumps([allowed, blocked, modules])],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_a_module_reaching_for_another_roles_requirement_is_caught():
    """The check itself: the core may not import JupyterHub (the hub's, the servers' and the gateway's)."""
    mine = distributions_of(requirements_of([])) | {"gpulab"}
    assert "mlflow" not in mine and "jupyterhub" not in mine and "tornado" in mine
    providers = import_names()
    blocked = sorted(m for m, dists in providers.items() if not dists & mine)
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_WITH_ONLY, json.dumps([[], blocked, ["gpulab.hub_config"]])],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "No module named 'jupyterhub' (not a requirement of this role)" in result.stderr, result.stderr[-3000:]


def test_one_version_number():
    """The Python package's version is the lab extension's (package.json), set in one place."""
    package = json.loads((REPO / "labextension" / "package.json").read_text())
    assert "version" not in PYPROJECT and "version" in PYPROJECT["dynamic"]
    assert metadata.version("gpulab") == package["version"]
