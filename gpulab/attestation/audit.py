"""The attestation audit trail: one JSON line per outcome on the logger ``gpulab.attestation.audit``.

A record names the action, the result (``ok`` or a reason code), user, client IP, node, ``kid``,
``jti`` and the SHA-256 fingerprint of the token — never the token, a nonce or any key. Records are
rate-limited per (result, caller): past ``burst`` in a ``window`` they are only counted, and one
``attestation.suppressed`` line with the count follows when the window ends (or on ``flush``).
Prometheus counts every outcome, suppressed or not. The limit keys on the caller (hub user or node
credential), not the client IP: a user's code on the platform's loopback can claim any ``X-Forwarded-For``,
so the IP is recorded as reported, never trusted to tell callers apart.
"""

import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime

from prometheus_client import Counter

from .reasons import Reason

LOGGER_NAME = "gpulab.attestation.audit"
MAX_FIELD = 256
MAX_TRACKED = 10_000

OUTCOMES = Counter(
    "gpulab_attestation_outcomes",
    "Attestation requests by action and result (ok or reason code).",
    ["action", "result"],
)
SUPPRESSED = Counter(
    "gpulab_attestation_audit_suppressed", "Audit records dropped by the audit rate limit.", ["result"]
)


class AuditLog:
    """Writes audit records; ``path`` sends them to their own 0600 file instead of the application log."""

    def __init__(
        self, *, burst: int = 20, window: float = 60.0, path: str = "", clock: Callable[[], float] = time.monotonic
    ):
        self.burst = burst
        self.window = window
        self.clock = clock
        self.logger = logging.getLogger(LOGGER_NAME)
        self.logger.setLevel(logging.INFO)
        self._windows: OrderedDict[tuple[str, str], list] = OrderedDict()  # key -> [start, count, suppressed]
        if path:
            _attach_file(self.logger, path)

    def record(
        self,
        action: str,
        result: Reason | str,
        *,
        user: str | None,
        client_ip: str | None,
        node: str | None,
        kid: str | None = None,
        jti: str | None = None,
        fingerprint: str | None = None,
        detail: str = "",
    ) -> None:
        """Count the outcome and log it unless (result, user) is over its rate limit."""
        result = result.value if isinstance(result, Reason) else result
        OUTCOMES.labels(action, result).inc()
        now = self.clock()
        key = (result, user or "")
        state = self._windows.get(key)
        if state is None or now - state[0] >= self.window:
            if state is not None:
                self._summary(key, state)
            state = self._windows[key] = [now, 0, 0]
            self._bound()
        self._windows.move_to_end(key)
        if state[1] >= self.burst:
            state[2] += 1
            SUPPRESSED.labels(result).inc()
            return
        state[1] += 1
        self._emit(
            logging.INFO if result == "ok" else logging.WARNING,
            {
                "event": f"attestation.{action}",
                "result": result,
                "user": user,
                "client_ip": client_ip,
                "node": node,
                "kid": kid,
                "jti": jti,
                "fingerprint": fingerprint,
                "detail": detail,
            },
        )

    def flush(self) -> None:
        """Write the pending suppressed-count summaries now (shutdown, periodic callback)."""
        for key, state in self._windows.items():
            self._summary(key, state)
        self._windows.clear()

    def _bound(self) -> None:
        while len(self._windows) > MAX_TRACKED:
            key, state = self._windows.popitem(last=False)
            self._summary(key, state)

    def _summary(self, key: tuple[str, str], state: list) -> None:
        if state[2]:
            self._emit(
                logging.WARNING,
                {
                    "event": "attestation.suppressed",
                    "result": key[0],
                    "user": key[1],
                    "suppressed": state[2],
                    "window_s": self.window,
                },
            )

    def _emit(self, level: int, fields: dict) -> None:
        fields = {k: v[:MAX_FIELD] if isinstance(v, str) else v for k, v in fields.items()}
        line = json.dumps({"ts": datetime.now(UTC).isoformat(timespec="milliseconds"), **fields}, sort_keys=True)
        self.logger.log(level, line)


def _attach_file(logger: logging.Logger, path: str) -> None:
    path = os.path.abspath(os.path.expanduser(path))
    if any(getattr(h, "baseFilename", None) == path for h in logger.handlers):
        return
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
    os.chmod(path, 0o600)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.propagate = False
