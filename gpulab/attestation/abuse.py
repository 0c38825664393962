"""Per-client throttling of nonce and verify requests, and lockout after repeated failures."""

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from .reasons import AttestationError, Reason


@dataclass
class _Client:
    tokens: dict[str, float]
    updated: float
    failures: int = 0
    locked_until: float = 0.0


class AbuseGuard:
    """Token buckets per (client, action) — ``rate`` per second, ``burst`` at once — and a lockout of
    ``lockout_seconds`` after ``max_failures`` consecutive failed verifications. At most ``max_clients``
    clients are tracked; the least recently seen is forgotten first."""

    def __init__(self, *, nonce_rate: float = 0.5, nonce_burst: int = 10, verify_rate: float = 0.5,
                 verify_burst: int = 10, max_failures: int = 5, lockout_seconds: float = 300.0,
                 max_clients: int = 10_000, clock: Callable[[], float] = time.monotonic):
        self.limits = {"nonce": (nonce_rate, nonce_burst), "verify": (verify_rate, verify_burst)}
        self.max_failures = max_failures
        self.lockout_seconds = lockout_seconds
        self.max_clients = max_clients
        self.clock = clock
        self._clients: OrderedDict[str, _Client] = OrderedDict()

    def check(self, client: str, action: str) -> None:
        """Take one token for ``action``; raise ``locked_out`` or ``rate_limited`` (with ``retry_after``)."""
        now = self.clock()
        c = self._client(client, now)
        if c.locked_until > now:
            raise AttestationError(Reason.LOCKED_OUT, "too many failed verifications",
                                   retry_after=c.locked_until - now)
        rate = self.limits[action][0]
        for name, (r, b) in self.limits.items():
            c.tokens[name] = min(b, c.tokens[name] + (now - c.updated) * r)
        c.updated = now
        if c.tokens[action] < 1:
            raise AttestationError(Reason.RATE_LIMITED, f"too many {action} requests",
                                   retry_after=(1 - c.tokens[action]) / rate if rate else self.lockout_seconds)
        c.tokens[action] -= 1

    def failed(self, client: str) -> None:
        """Count a failed verification; the ``max_failures``-th in a row locks the client out."""
        now = self.clock()
        c = self._client(client, now)
        c.failures += 1
        if c.failures >= self.max_failures:
            c.failures, c.locked_until = 0, now + self.lockout_seconds

    def succeeded(self, client: str) -> None:
        self._client(client, self.clock()).failures = 0

    def _client(self, client: str, now: float) -> _Client:
        c = self._clients.get(client)
        if c is None:
            c = self._clients[client] = _Client({a: float(b) for a, (_, b) in self.limits.items()}, now)
            if len(self._clients) > self.max_clients:
                self._clients.popitem(last=False)
        self._clients.move_to_end(client)
        return c
