"""One loop for the services' background passes: the job queue's ticks, the scheduler's checks, the notifier's
deliveries, the user events' deliveries."""

import asyncio
import logging
from collections.abc import Awaitable, Callable
from contextlib import suppress


async def periodic(
    step: Callable[[], Awaitable[object]],
    interval: float,
    log: logging.Logger | logging.LoggerAdapter,
    what: str,
    *,
    wake: asyncio.Event | None = None,
    stopping: asyncio.Event | None = None,
) -> None:
    """Run ``step`` now and then every ``interval`` seconds: at once when ``wake`` is set, until ``stopping`` is
    set (or the task is cancelled). A step that raises is logged ("``what`` failed") and the next one goes on, so
    that one bad pass does not end the service's background work."""
    event = wake or stopping
    while stopping is None or not stopping.is_set():
        if wake is not None:
            wake.clear()
        try:
            await step()
        except Exception:
            log.exception("%s failed; trying again in %g s", what, interval)
        with suppress(TimeoutError):  # not wait_for: in 3.11 it can swallow a cancel (the queue's stop())
            async with asyncio.timeout(interval):
                await (event.wait() if event is not None else asyncio.Event().wait())
