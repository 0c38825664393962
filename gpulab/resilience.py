"""Circuit breaker and retries for every remote call gpulab makes (Ray, MLflow, Triton, attestation).

breaker = CircuitBreaker("ray at http://127.0.0.1:8265")
async with breaker:                      # raises CircuitOpenError at once while open
    await fetch(...)
async for attempt in retrying():         # idempotent calls only
    with attempt:
        await breaker.call(fetch, ...)
"""

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential, wait_random
from tornado.httpclient import HTTPClientError

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


def is_outage(exc: BaseException) -> bool:
    """Default failure test: the dependency is unreachable, timed out or answered 5xx."""
    if isinstance(exc, HTTPClientError):
        return exc.code == 599 or exc.code >= 500
    return isinstance(exc, OSError | asyncio.TimeoutError)


class CircuitOpenError(Exception):
    """Raised without calling the dependency while its circuit is open."""

    def __init__(self, name: str, retry_in: float):
        self.name = name
        self.retry_in = retry_in
        super().__init__(f"{name} is unavailable (circuit open, retry in {math.ceil(retry_in)} s)")


class CircuitBreaker:
    """Opens after ``failure_threshold`` consecutive failures; after ``recovery_timeout`` s one probe
    call goes through (half-open): success closes the circuit, failure opens it again. An exception
    that ``is_failure`` rejects counts as success (the dependency answered)."""

    def __init__(
        self,
        name: str,
        failure_threshold: int = 5,
        recovery_timeout: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        is_failure: Callable[[BaseException], bool] = is_outage,
    ):
        self.name = name
        self.failure_threshold = failure_threshold
        self.recovery_timeout = recovery_timeout
        self.clock = clock
        self.is_failure = is_failure
        self.failures = 0  # consecutive
        self.opened_at: float | None = None
        self.last_error = ""
        self._probing = False

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return CLOSED
        return HALF_OPEN if self.clock() - self.opened_at >= self.recovery_timeout else OPEN

    def snapshot(self) -> dict[str, Any]:
        """For status endpoints and metrics."""
        return {
            "name": self.name,
            "state": self.state,
            "failures": self.failures,
            "retry_in": self._retry_in(),
            "last_error": self.last_error,
        }

    def _retry_in(self) -> float:
        if self.opened_at is None:
            return 0.0
        return max(0.0, self.opened_at + self.recovery_timeout - self.clock())

    async def __aenter__(self) -> "CircuitBreaker":
        state = self.state
        if state == OPEN or (state == HALF_OPEN and self._probing):
            raise CircuitOpenError(self.name, self._retry_in())
        self._probing = state == HALF_OPEN
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        self._probing = False
        if exc is None or not self.is_failure(exc):
            if not isinstance(exc, asyncio.CancelledError):
                self.failures, self.opened_at, self.last_error = 0, None, ""
            return
        self.failures += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        if self.opened_at is not None or self.failures >= self.failure_threshold:
            self.opened_at = self.clock()

    async def call(self, fn: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Any:
        async with self:
            return await fn(*args, **kwargs)


def retrying(
    attempts: int = 3, initial: float = 0.2, maximum: float = 2.0, retry_on: Callable[[BaseException], bool] = is_outage
) -> AsyncRetrying:
    """Retries with exponential backoff and jitter, re-raising the last error; for idempotent calls
    only. A ``CircuitOpenError`` is never retried."""
    return AsyncRetrying(
        stop=stop_after_attempt(attempts),
        wait=wait_exponential(multiplier=initial, max=maximum) + wait_random(0, initial),
        retry=retry_if_exception(lambda exc: not isinstance(exc, CircuitOpenError) and retry_on(exc)),
        reraise=True,
    )
