"""MLflow's own permissions, with the identity gpulab's proxy vouches for.

``mlflow server --app-name basic-auth`` keeps users and per-experiment / per-registered-model permissions
(the creator gets MANAGE; everyone else ``default_permission``). gpulab does not give users MLflow passwords:
MLflow listens only on a unix socket in a directory of the service account, so every request comes through
the proxy in :mod:`gpulab.services.mlflow`, which authenticates it with the hub (or a job's token), drops any
``X-Gpulab-*`` header the client sent and names the caller in ``X-Gpulab-User`` (``X-Gpulab-Admin``: a hub
admin). :func:`authenticate_from_proxy`, MLflow's ``authorization_function``, takes those headers and makes
the MLflow user on first sight, so MLflow's own checks (every REST route, the artifact proxy, search
results) apply per hub user.

Hub names cannot hold ``:``; MLflow's built-in admin is :data:`~.identity.ADMIN_USERNAME` and services are
``service:<name>``, so neither can be a hub user's name.
"""

import secrets

from flask import request
from mlflow.exceptions import MlflowException
from mlflow.server.auth import make_basic_auth_response, store
from werkzeug.datastructures import Authorization

from .identity import ADMIN_HEADER, ADMIN_USERNAME, USER_HEADER

_known: dict[str, bool] = {}  # users made in this process -> admin flag stored


def authenticate_from_proxy() -> Authorization:
    """The caller the proxy names, as an MLflow user (made, or its admin flag brought in line, here)."""
    name = request.headers.get(USER_HEADER, "")
    if not name or name == ADMIN_USERNAME:
        return make_basic_auth_response()
    admin = request.headers.get(ADMIN_HEADER) == "1"
    if _known.get(name) == admin:
        return Authorization("basic", {"username": name, "password": ""})
    if not store.has_user(name, use_primary=True):
        try:
            store.create_user(name, secrets.token_urlsafe(32), is_admin=admin)  # a password nobody knows
        except MlflowException:  # made meanwhile by a concurrent first request
            pass
    if store.get_user(name).is_admin != admin:
        store.update_user(name, is_admin=admin)
    _known[name] = admin
    return Authorization("basic", {"username": name, "password": ""})
