"""The one ``write_error`` of every gpulab REST API, the JSON plumbing its handlers share, and the base of every
hub service's handlers.

:class:`JSONAPIMixin` goes first among a handler's bases (before tornado's, JupyterHub's or jupyter_server's
``RequestHandler``), so that its ``write_error`` is the one that answers. A hub service's handlers derive from
:class:`ServiceHandler` (bounded bodies, a span and a metric per request) and, where hub users call them,
:class:`HubUserHandler` (the hub's token or cookie, one scope, 401 and 403 answered alike everywhere).
"""

import json

from jupyterhub.services.auth import HubOAuthenticated, check_scopes
from prometheus_client import Histogram
from pydantic import BaseModel, ValidationError
from tornado import web

from .. import scopes, tracing
from . import http_methods
from .errors import APIError, error_body, reason_code


def validation_error_body(exc: ValidationError) -> tuple[str, str]:
    """The first error's dotted field path ("resources.gpus", "entrypoint.0") and message."""
    err = exc.errors(include_url=False)[0]
    loc = err["loc"] or ((err.get("ctx") or {}).get("field", ""),)
    return ".".join(str(part) for part in loc), err["msg"]


class JSONAPIMixin:
    """Errors as ``{"error": {...}}`` (:func:`~.errors.error_body`, or the protocol's own shape where a
    subclass overrides :meth:`error_body`), JSON answers, pydantic bodies.

    What a caller is told: an :class:`APIError`'s message and field; a tornado ``HTTPError`` under 500 (a
    malformed request, an unknown method) its message; anything else is a failure of ours, answered as
    "internal error; see the <``log_name``> log" and logged with its traceback (answers are not logged as
    failures). Every 405 carries ``Allow``.
    """

    log_name = "server"

    def write_error(self, status_code: int, **kwargs) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        field = details = None
        if isinstance(exc, APIError):
            code, message, field, details = exc.code, exc.message, exc.field, exc.details
            for name, value in exc.headers.items():
                self.set_header(name, value)
            if status_code == 405:
                http_methods.allow(self)
        elif isinstance(exc, web.HTTPError) and status_code < 500:
            code = reason_code(status_code)
            if status_code == 405:
                message = http_methods.refuse(self)
            else:
                message = (exc.log_message % exc.args if exc.args else exc.log_message) or self._reason
        else:
            code, message = "internal", f"internal error; see the {self.log_name} log"
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(self.error_body(status_code, code, message, field, details)))

    def error_body(self, status: int, code: str, message: str, field: str | None, details: dict | None) -> dict:
        """The body of an error answer; protocols with their own error shape (KServe, MLflow) override it."""
        return error_body(code, message, field, details)

    def log_exception(self, typ, value, tb) -> None:
        if not isinstance(value, APIError):  # answers, not failures
            super().log_exception(typ, value, tb)

    def write_json(self, obj, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(obj.model_dump_json() if isinstance(obj, BaseModel) else json.dumps(obj))

    def json_body(self) -> dict:
        """The request body as a JSON object (empty: ``{}``), or a 400 saying what is wrong with it."""
        try:
            data = json.loads(self.request.body or b"{}")
        except ValueError as e:
            raise APIError(400, f"body is not valid JSON: {e}", code="invalid_json") from None
        except RecursionError:
            raise APIError(400, "body is nested too deeply", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "body must be a JSON object", code="invalid_json")
        return data

    def parse(self, model: type[BaseModel]):
        """The request body as ``model``, or a 4xx naming the first field at fault. A PUT or PATCH without a body
        is a 400: it would set or change nothing (or everything, to its defaults)."""
        if self.request.method in ("PUT", "PATCH") and not self.request.body:
            raise APIError(400, f"{self.request.method} needs a JSON body", code="invalid_json")
        data = self.json_body()
        try:
            return model.model_validate(data)
        except ValidationError as e:
            field, message = validation_error_body(e)
            raise APIError(
                422, f"{field}: {message}" if field else message, field=field or None, code="invalid"
            ) from None


def too_large(length: int, limit: int) -> str:
    """The 413's message for a body of ``length`` bytes."""
    return f"request body is {length} bytes; the limit is {limit}"


class ServiceHandler(JSONAPIMixin, web.RequestHandler):
    """A hub service's REST handler: a body over ``max_body`` is a 413, each request a span of ``log_name``'s
    tracer and, where the service keeps one, an observation of ``requests_metric`` (a histogram labelled method,
    handler, status)."""

    max_body = 64 * 1024
    requests_metric: Histogram | None = None

    def prepare(self):
        length = int(self.request.headers.get("Content-Length") or len(self.request.body or b""))
        if length > self.max_body:
            raise APIError(413, too_large(length, self.max_body), code="too_large")
        self._span = tracing.tracer(self.log_name).start_span(
            f"{self.request.method} {self.request.path}", context=tracing.extract(self.request.headers)
        )

    def on_finish(self):
        if self.requests_metric is not None:
            handler = type(self).__name__.removesuffix("Handler")
            status = str(self.get_status())
            self.requests_metric.labels(self.request.method, handler, status).observe(self.request.request_time())
        if getattr(self, "_span", None) is not None:
            self._span.set_attribute("http.status_code", self.get_status())
            self._span.end()


class HubUserHandler(HubOAuthenticated, ServiceHandler):
    """A request from a hub user (``Authorization: token <hub token>`` or the service's OAuth cookie) holding
    ``required_scope``; the service's ``HubOAuth`` (``JUPYTERHUB_*``) looks the credential up."""

    required_scope: str = ""

    def prepare(self):
        super().prepare()
        if self.current_user is None:
            raise APIError(
                401, "authentication required: send 'Authorization: token <hub token>'", code="unauthenticated"
            )
        if self.required_scope and not self.has(self.required_scope):
            raise APIError(
                403, f"this needs the {self.required_scope} scope, which {self.user_name} lacks", code="forbidden"
            )

    @property
    def user_name(self) -> str:
        return self.current_user["name"]

    def has(self, scope: str) -> bool:
        return bool(check_scopes([scope], set(self.current_user.get("scopes", ()))))

    @property
    def is_admin(self) -> bool:
        return self.has(scopes.ADMIN)
