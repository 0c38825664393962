"""How late a service's event loop runs what is due: the measure of a blocking call on it.

:class:`LoopLag` wakes every ``interval`` and records how much later than asked it woke, in a histogram
(``<prefix>_event_loop_lag_seconds``) and as the largest lag of the last ``window`` seconds
(``<prefix>_event_loop_lag_max_seconds``), which a benchmark samples during a burst.
"""

import asyncio
import time
from collections import deque

from prometheus_client import CollectorRegistry, Gauge, Histogram

BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class LoopLag:
    def __init__(self, registry: CollectorRegistry, prefix: str, interval: float = 0.05, window: float = 60.0):
        self.interval, self.window = interval, window
        self.histogram = Histogram(
            f"{prefix}_event_loop_lag_seconds",
            "How late the event loop ran a timer",
            buckets=BUCKETS,
            registry=registry,
        )
        self.gauge = Gauge(
            f"{prefix}_event_loop_lag_max_seconds",
            f"The largest event loop lag of the last {window:g} s",
            registry=registry,
        )
        self.gauge.set_function(self.recent_max)
        self._recent: deque[tuple[float, float]] = deque()  # (when, lag), lags decreasing from the left

    def record(self, lag: float, now: float) -> None:
        self.histogram.observe(lag)
        while self._recent and self._recent[-1][1] <= lag:  # a smaller lag before a larger one never counts
            self._recent.pop()
        self._recent.append((now, lag))

    def recent_max(self) -> float:
        cutoff = time.monotonic() - self.window
        while self._recent and self._recent[0][0] < cutoff:
            self._recent.popleft()
        return self._recent[0][1] if self._recent else 0.0

    async def run(self) -> None:
        while True:
            asked = time.monotonic()
            await asyncio.sleep(self.interval)
            now = time.monotonic()
            self.record(max(0.0, now - asked - self.interval), now)
