"""One error vocabulary: :class:`APIError`, its JSON body, and the table between gRPC and HTTP statuses.

Every gpulab REST API answers an error as ``{"error": {"code": <string>, "message": ..., "field": ...}}`` (the
KServe REST plane and the MLflow proxy keep their protocols' shapes, from the same :class:`APIError`). ``code``
is a stable word a client may branch on; ``message`` says what to do; ``field`` names the request field at fault.
"""

from typing import Any, NamedTuple

from pydantic import BaseModel, Field
from tornado import httputil, web


class APIError(web.HTTPError):
    """An answer, not a failure: HTTP ``status``, a ``message`` for the caller, the request ``field`` at fault,
    a ``code`` (default: from the status, see :func:`reason_code`), ``headers`` sent with it, and ``details``
    (structured, e.g. NVIDIA's error details of a failed attestation) in the body when set."""

    def __init__(
        self,
        status: int,
        message: str,
        field: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        details: dict | None = None,
    ):
        # tornado %-formats log_message when it logs: keep a literal '%' in the message literal
        super().__init__(status, message.replace("%", "%%"))
        self.message = message
        self.field = field
        self.code = code or reason_code(status)
        self.headers = headers or {}
        self.details = details


def reason_code(status: int) -> str:
    """``not_found`` for 404: the status's reason phrase as a code."""
    return httputil.responses.get(status, "Unknown").lower().replace(" ", "_").replace("-", "_")


class ErrorDetail(BaseModel):
    code: str
    message: str
    field: str | None = None
    details: dict[str, Any] | None = Field(None, description="Structured details, e.g. NVIDIA's error details")


class ErrorBody(BaseModel):
    error: ErrorDetail


def error_body(code: str, message: str, field: str | None = None, details: dict | None = None) -> dict:
    """The body of every gpulab error answer (:class:`ErrorBody`)."""
    error = {"code": code, "message": message, "field": field}
    if details:
        error["details"] = details
    return {"error": error}


class Status(NamedTuple):
    """One gRPC status code with the HTTP status and error code a REST answer gives it."""

    grpc: str  # grpc.StatusCode's name
    number: int  # its number on the wire (grpc-status)
    http: int
    code: str


# The one table between gRPC and HTTP (the Python and nginx data planes, the deploy API, the server extension's
# and the kernels' inference clients): a gRPC status not here answers as the caller's default.
STATUSES = (
    Status("OK", 0, 200, "ok"),
    Status("INVALID_ARGUMENT", 3, 400, "invalid"),
    Status("DEADLINE_EXCEEDED", 4, 504, "timeout"),
    Status("NOT_FOUND", 5, 404, "not_found"),
    Status("PERMISSION_DENIED", 7, 403, "forbidden"),
    Status("RESOURCE_EXHAUSTED", 8, 413, "too_large"),
    Status("UNAVAILABLE", 14, 503, "unavailable"),
    Status("UNAUTHENTICATED", 16, 401, "unauthenticated"),
)
_BY_GRPC = {s.grpc: s for s in STATUSES}
# HTTP statuses Triton or a proxy answers with that have no row of their own
_BY_HTTP = {s.http: s for s in STATUSES} | {502: _BY_GRPC["UNAVAILABLE"]}


def _name(code) -> str:
    """A gRPC code's name from ``grpc.StatusCode``, tritonclient's ``"StatusCode.X"`` or the name itself."""
    name = getattr(code, "name", None) or str(code)
    return name.removeprefix("StatusCode.")


def http_status(code, default: int = 500) -> int:
    """The HTTP status of gRPC status ``code`` (``grpc.StatusCode`` or its name)."""
    status = _BY_GRPC.get(_name(code))
    return status.http if status else default


def error_code(code, default: str = "internal") -> str:
    """The error code word of gRPC status ``code``."""
    status = _BY_GRPC.get(_name(code))
    return status.code if status else default


def grpc_name(http: int, default: str = "UNKNOWN") -> str:
    """The gRPC status name for an HTTP status (metrics of REST calls count by gRPC code, as gRPC calls)."""
    status = _BY_HTTP.get(http)
    return status.grpc if status else default


def lua_tables() -> str:
    """``REST_STATUS`` (gRPC number -> HTTP) and ``REST_CODE`` (HTTP -> gRPC number) as Lua table constructors,
    for the nginx data plane's configuration."""
    rest_status = ", ".join(f"[{s.number}] = {s.http}" for s in STATUSES if s.number)
    rest_code = ", ".join(f"[{http}] = {s.number}" for http, s in sorted(_BY_HTTP.items()))
    return f"rest_status = {{{rest_status}}}, rest_code = {{{rest_code}}}"
