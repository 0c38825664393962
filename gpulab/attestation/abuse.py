"""Per-caller throttling of nonce and verify requests, and lockout after repeated failures."""

import math
import time
from collections.abc import Callable

from ..ratelimit import LRUDict, TokenBuckets
from .reasons import AttestationError, Reason


class AbuseGuard:
    """Token buckets per (caller, action) — ``rate`` per second, ``burst`` at once — and a lockout of
    ``lockout_seconds`` after ``max_failures`` consecutive failed verifications. At most ``max_clients``
    callers are tracked; the least recently seen is forgotten first."""

    def __init__(
        self,
        *,
        nonce_rate: float = 0.5,
        nonce_burst: int = 10,
        verify_rate: float = 0.5,
        verify_burst: int = 10,
        max_failures: int = 5,
        lockout_seconds: float = 300.0,
        max_clients: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.buckets = {
            action: TokenBuckets(rate, burst, max_clients, clock)
            for action, rate, burst in (("nonce", nonce_rate, nonce_burst), ("verify", verify_rate, verify_burst))
        }
        self.max_failures = max_failures
        self.lockout_seconds = lockout_seconds
        self.clock = clock
        self._failures = LRUDict(max_clients)  # caller -> (failures, locked until)

    def check(self, client: str, action: str) -> None:
        """Take one token for ``action``; raise ``locked_out`` or ``rate_limited`` (with ``retry_after``)."""
        now = self.clock()
        _, locked_until = self._failures.get(client, (0, 0.0))
        if locked_until > now:
            raise AttestationError(Reason.LOCKED_OUT, "too many failed verifications", retry_after=locked_until - now)
        if wait := self.buckets[action].take(client):
            raise AttestationError(
                Reason.RATE_LIMITED,
                f"too many {action} requests",
                retry_after=wait if math.isfinite(wait) else self.lockout_seconds,
            )

    def failed(self, client: str) -> None:
        """Count a failed verification; the ``max_failures``-th in a row locks the caller out."""
        failures, locked_until = self._failures.get(client, (0, 0.0))
        failures += 1
        if failures >= self.max_failures:
            failures, locked_until = 0, self.clock() + self.lockout_seconds
        self._failures[client] = (failures, locked_until)

    def succeeded(self, client: str) -> None:
        if client in self._failures:
            self._failures[client] = (0, self._failures[client][1])
