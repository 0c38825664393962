"""MLflow's own permissions, with the identity gpulab's proxy vouches for: ``mlflow server --app-name gpulab``.

MLflow's basic-auth app keeps users and per-experiment / per-registered-model permissions (the creator gets
MANAGE; everyone else ``default_permission``). gpulab does not give users MLflow passwords: MLflow listens
only on a unix socket in a directory of the service account, so every request comes through the proxy in
:mod:`gpulab.services.mlflow`, which authenticates it with the hub (or a job's token), drops any
``X-Gpulab-*`` header the client sent and names the caller in ``X-Gpulab-User`` (``X-Gpulab-Admin``: a hub
admin; ``X-Gpulab-Groups``: their hub groups). :func:`authenticate_from_proxy`, MLflow's
``authorization_function``, takes those headers, makes the MLflow user on first sight and keeps their hub
groups as MLflow roles (``hub-group:<name>``), so MLflow's own checks (every REST route, the artifact proxy,
search results) apply per hub user. With ``$GPULAB_MLFLOW_SHARING`` ``group``, what a user creates is
readable by the roles of their groups (:func:`share_with_groups`).

Hub names cannot hold ``:``; MLflow's built-in admin is :data:`~.identity.ADMIN_USERNAME` and services are
``service:<name>``, so neither can be a hub user's name.
"""

import json
import os
import secrets

from flask import Flask, Response, request
from mlflow.exceptions import MlflowException
from mlflow.server.auth import make_basic_auth_response, store
from mlflow.server.auth.permissions import READ
from mlflow.utils.workspace_utils import DEFAULT_WORKSPACE_NAME
from werkzeug.datastructures import Authorization

from .identity import ADMIN_HEADER, ADMIN_USERNAME, GROUPS_HEADER, USER_HEADER

GROUP_ROLE_PREFIX = "hub-group:"
_known: dict[str, tuple] = {}  # user -> (admin, groups) as stored by this process


def create_app(app: Flask | None = None):
    """MLflow's basic-auth app, and the grants of :func:`share_with_groups`."""
    from mlflow.server import app as mlflow_app
    from mlflow.server.auth import create_app as create_auth_app

    app = app or mlflow_app
    if os.environ.get("GPULAB_MLFLOW_SHARING") == "group":
        app.after_request(share_with_groups)
    return create_auth_app(app)


def authenticate_from_proxy() -> Authorization | Response:
    """The caller the proxy names, as an MLflow user (made, its admin flag and group roles brought in line)."""
    name = request.headers.get(USER_HEADER, "")
    if not name or name == ADMIN_USERNAME:
        return make_basic_auth_response()
    admin = request.headers.get(ADMIN_HEADER) == "1"
    groups = request.headers.get(GROUPS_HEADER)  # absent: a caller whose groups the proxy does not know
    wanted = (admin, groups if groups is not None else _known.get(name, (None, None))[1])
    if _known.get(name) != wanted:
        _bring_in_line(name, admin, None if groups is None else set(json.loads(groups)))
        _known[name] = wanted
    return Authorization("basic", {"username": name, "password": ""})


def _bring_in_line(name: str, admin: bool, groups: set[str] | None) -> None:
    if not store.has_user(name, use_primary=True):
        try:
            store.create_user(name, secrets.token_urlsafe(32), is_admin=admin)  # a password nobody knows
        except MlflowException:  # made meanwhile by a concurrent first request
            pass
    user = store.get_user(name)
    if user.is_admin != admin:
        store.update_user(name, is_admin=admin)
    if groups is None:
        return
    held = {r.name: r for r in store.list_user_roles(user.id) if r.name.startswith(GROUP_ROLE_PREFIX)}
    for group in groups - {n[len(GROUP_ROLE_PREFIX) :] for n in held}:
        try:
            store.assign_role_to_user(user.id, group_role(group).id)
        except MlflowException:  # assigned meanwhile
            pass
    for role_name, role in held.items():
        if role_name[len(GROUP_ROLE_PREFIX) :] not in groups:
            store.unassign_role_from_user(user.id, role.id)


def group_role(group: str):
    """The MLflow role standing for the hub group ``group`` (made on first use)."""
    name = GROUP_ROLE_PREFIX + group
    try:
        return store.get_role_by_name(DEFAULT_WORKSPACE_NAME, name)
    except MlflowException:
        try:
            return store.create_role(name, DEFAULT_WORKSPACE_NAME, description=f"members of the hub group {group}")
        except MlflowException:  # made meanwhile
            return store.get_role_by_name(DEFAULT_WORKSPACE_NAME, name)


def share_with_groups(resp: Response) -> Response:
    """After an experiment or registered model is created: READ for the roles of the creator's hub groups."""
    groups = request.headers.get(GROUPS_HEADER)
    if resp.status_code != 200 or request.method != "POST" or not groups:
        return resp
    if request.path.endswith("/mlflow/experiments/create"):
        resource = ("experiment", resp.get_json()["experiment_id"])
    elif request.path.endswith("/mlflow/registered-models/create"):
        resource = ("registered_model", resp.get_json()["registered_model"]["name"])
    else:
        return resp
    for group in json.loads(groups):
        try:
            store.add_role_permission(group_role(group).id, *resource, READ.name)
        except MlflowException:  # granted already
            pass
    return resp
