"""The one client of gpulab's hub services, as users' servers and kernels call them.

A :class:`HubServiceClient` is one service (its name, its URL under the hub, the hub token this process holds)
and the one way of calling it: ``Authorization: token ...`` and the current ``traceparent`` on every request,
one circuit breaker, and one reading of its error bodies. Kernels call it synchronously (:meth:`request`, over
``requests``); a user's server, on tornado's event loop, forwards its users' requests through :meth:`fetch`.
Where each service is comes from what the hub gives every user server and kernel (:data:`SERVICES`, and
``JUPYTERHUB_API_TOKEN``). Failures are :class:`GpulabError`\\ s whose message says what to do.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import requests
from opentelemetry import trace
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest, HTTPResponse

from .. import tracing
from ..resilience import CircuitBreaker, CircuitOpenError

SERVICES = {
    "gpulab-jobs": ("GPULAB_JOBS_URL", "the job service"),
    "gpulab-infer": ("GPULAB_INFER_URL", "the inference service"),
}
"""Each hub service a user's server and kernels call: the variable the hub sets to its API's URL, and what it is."""
TOKEN = ("JUPYTERHUB_API_TOKEN", "your server's hub token")

_HINTS = {
    (401, None): "the token in JUPYTERHUB_API_TOKEN was not accepted; restart your server from the hub",
    (403, "resources.gpus"): "ask an admin for GPU access, or request no GPUs",
    (503, None): "try again in a minute; if it persists, tell your admin",
}


class GpulabError(Exception):
    """A gpulab call failed; the message says what to do."""


class NotConfigured(GpulabError):
    """This process is not running in a gpulab server: ``variable`` is missing from its environment."""

    def __init__(self, variable: str, what: str):
        self.variable = variable
        super().__init__(f"not running in a gpulab server: {variable} is not set ({what})")


class Unreachable(GpulabError):
    """The service did not answer (connection refused, timed out) or its circuit is open."""


class APIError(GpulabError):
    """A gpulab service refused a request: ``status``, and its ``code``, ``message`` and ``field``."""

    def __init__(self, status: int, message: str, code: str | None = None, field: str | None = None):
        self.status, self.message, self.code, self.field = status, message, code, field
        hint = _HINTS.get((status, field)) or _HINTS.get((status, None))
        super().__init__(f"{message}; {hint}" if hint else message)

    @classmethod
    def from_response(cls, response: requests.Response) -> APIError:
        """The error in gpulab's body (``{"error": {"code", "message", "field"}}``), else the bare status."""
        try:
            error = response.json()["error"]
            return cls(response.status_code, error["message"], error.get("code"), error.get("field"))
        except (ValueError, KeyError, TypeError):
            return cls(response.status_code, f"HTTP {response.status_code} from {response.url}")


def env(name: str, what: str, environ: Mapping[str, str] = os.environ) -> str:
    """The variable ``name`` that the hub sets in users' servers and kernels; :class:`NotConfigured` without it."""
    value = environ.get(name)
    if not value:
        raise NotConfigured(name, what)
    return value


def service_url(name: str, environ: Mapping[str, str] = os.environ) -> str:
    """The API URL of hub service ``name`` (of :data:`SERVICES`) where the hub says it is."""
    variable, what = SERVICES[name]
    return env(variable, f"{what}'s address", environ)


class HubServiceClient:
    """Requests to one hub service's API (``url``) with this process's hub token: authenticated, traced, through
    one circuit breaker (on the async path, where many requests share it), errors raised as :class:`APIError`
    and failures to connect as :class:`Unreachable`."""

    def __init__(self, name: str, url: str, token: str | None = None, timeout: float = 30):
        self.name = name
        self.url = url.rstrip("/")
        self.token = token or env(*TOKEN)
        self.timeout = timeout
        self.breaker = CircuitBreaker(f"{name} at {self.url}", failure_threshold=5, recovery_timeout=10)
        self._session: requests.Session | None = None

    @classmethod
    def from_env(cls, name: str, environ: Mapping[str, str] = os.environ, **kwargs) -> HubServiceClient:
        """The service ``name`` of :data:`SERVICES` where the hub says it is; :class:`NotConfigured` if it does not."""
        url = service_url(name, environ)
        return cls(name, url, env(*TOKEN, environ), **kwargs)

    def headers(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The token, ``extra``, and the current trace context."""
        return tracing.inject({"Authorization": f"token {self.token}", **(extra or {})})

    def _url(self, path: str) -> str:
        return path if path.startswith("http") else self.url + path

    def _unreachable(self, url: str, exc: BaseException) -> Unreachable:
        return Unreachable(
            f"{self.name} is unreachable at {url.split('?')[0]} ({type(exc).__name__}: {exc}); "
            "is the platform running? Try again, or restart your server"
        )

    def request(self, method: str, path: str, **kwargs) -> requests.Response:
        """A blocking request (kernels) to ``path`` under the service's API, or to an absolute URL (the hub,
        MLflow) with the same token; ``requests``' keyword arguments. Answers of 400 and above raise."""
        url = self._url(path)
        if self._session is None:
            self._session = requests.Session()
        with tracing.tracer(__name__).start_as_current_span(
            f"{method} {url.split('?')[0]}", kind=trace.SpanKind.CLIENT
        ):
            try:
                response = self._session.request(
                    method, url, headers=self.headers(), timeout=kwargs.pop("timeout", self.timeout), **kwargs
                )
            except requests.RequestException as exc:
                raise self._unreachable(url, exc) from None
        if response.status_code >= 400:
            raise APIError.from_response(response)
        return response

    async def fetch(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
        streaming_callback: Callable[[bytes], None] | None = None,
        header_callback: Callable[[str], None] | None = None,
    ) -> HTTPResponse:
        """A request on the event loop (a user's server forwarding): every answer comes back as it is, errors
        included, for the caller to pass on; only a service that does not answer raises :class:`Unreachable`.
        ``timeout`` 0 means none (a followed log)."""
        url = self._url(path)
        request = HTTPRequest(
            url,
            method=method,
            headers=self.headers(headers),
            body=body,
            request_timeout=self.timeout if timeout is None else timeout,
            streaming_callback=streaming_callback,
            header_callback=header_callback,
        )
        try:
            async with self.breaker:
                return await AsyncHTTPClient().fetch(request, raise_error=False)
        except CircuitOpenError as exc:
            raise Unreachable(str(exc)) from None
        except (OSError, HTTPClientError) as exc:  # HTTPClientError here: 599, no answer in time
            raise self._unreachable(url, exc) from None
