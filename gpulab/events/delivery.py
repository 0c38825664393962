"""Hub side: deliver outbox events to subscribers at least once, in order per subscriber.

Each subscriber's pending events are sent oldest first; a failure stops that
subscriber's queue until its backoff has passed, so event N+1 never overtakes N.
"""

import asyncio
import contextlib
from datetime import timedelta

from opentelemetry.trace import SpanKind, Status, StatusCode
from sqlalchemy import select, update
from sqlalchemy.orm import Session
from tornado.httpclient import AsyncHTTPClient

from gpulab.tracing import inject, tracer

from ..service.periodic import periodic
from ..service.storage import utcnow
from .outbox import Delivery, OutboxEvent, Subscriber, UserEvents

BACKOFF_BASE_S = 1.0
BACKOFF_CAP_S = 60.0
REQUEST_TIMEOUT_S = 10.0


def backoff_delay(attempts: int) -> timedelta:
    """Wait after the ``attempts``-th failure: 1 s, 2 s, 4 s, ... capped at 60 s."""
    return timedelta(seconds=min(BACKOFF_BASE_S * 2 ** (attempts - 1), BACKOFF_CAP_S))


async def deliver_pending(outbox: UserEvents, http_client: AsyncHTTPClient) -> int:
    """Send every due pending event to each subscriber; return how many were delivered."""
    counts = await asyncio.gather(
        *(_deliver_to(outbox, http_client, name, subscriber) for name, subscriber in list(outbox.subscribers.items()))
    )
    return sum(counts)


async def _deliver_to(outbox: UserEvents, http_client: AsyncHTTPClient, name: str, subscriber: Subscriber) -> int:
    """Deliver ``name``'s queue head first until it is empty, not yet due, or a send fails."""
    delivered = 0
    while True:
        with Session(outbox.engine) as session:
            head = session.execute(
                select(Delivery.event_id, Delivery.next_attempt_at, OutboxEvent.payload)
                .join(OutboxEvent, OutboxEvent.event_id == Delivery.event_id)
                .where(Delivery.subscriber == name, Delivery.delivered_at.is_(None))
                .order_by(OutboxEvent.id)
                .limit(1)
            ).first()
        if head is None or head.next_attempt_at > utcnow():
            return delivered
        error = await _post(http_client, name, subscriber, head.event_id, head.payload)
        key = (Delivery.event_id == head.event_id) & (Delivery.subscriber == name)
        with Session(outbox.engine) as session, session.begin():
            if error is None:
                session.execute(update(Delivery).where(key).values(delivered_at=utcnow()))
                delivered += 1
                continue
            attempts = session.scalars(select(Delivery.attempts).where(key)).one() + 1
            session.execute(
                update(Delivery)
                .where(key)
                .values(
                    attempts=attempts,
                    last_error=error,
                    next_attempt_at=utcnow() + backoff_delay(attempts),
                )
            )
        outbox.log.warning(
            "Delivering event %s to %s failed (attempt %d): %s",
            head.event_id,
            name,
            attempts,
            error,
        )
        return delivered


async def _post(
    http_client: AsyncHTTPClient, name: str, subscriber: Subscriber, event_id: str, payload: str
) -> str | None:
    """POST one event in a CLIENT span; return None on 2xx, else the error text."""
    with tracer(__name__).start_as_current_span(
        "deliver user event",
        kind=SpanKind.CLIENT,
        attributes={"gpulab.event_id": event_id, "gpulab.subscriber": name},
    ) as span:
        headers = inject({"Authorization": f"token {subscriber.token}", "Content-Type": "application/json"})
        try:
            response = await http_client.fetch(
                subscriber.url,
                method="POST",
                body=payload,
                headers=headers,
                request_timeout=REQUEST_TIMEOUT_S,
                raise_error=False,
            )
        except Exception as e:  # connection refused, timeout, DNS: retried later
            error = f"{type(e).__name__}: {e}"
        else:
            span.set_attribute("http.response.status_code", response.code)
            error = None if 200 <= response.code < 300 else f"HTTP {response.code} {response.reason}"
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, error))
        return error


class Deliverer:
    """Runs :func:`deliver_pending` as an asyncio task every ``interval`` s and on :meth:`kick`.

    ``http_client`` defaults to tornado's shared ``AsyncHTTPClient()`` of the running loop.
    """

    def __init__(
        self,
        outbox: UserEvents,
        http_client: AsyncHTTPClient | None = None,
        interval: float = 1.0,
    ):
        self.outbox = outbox
        self.http_client = http_client
        self.interval = interval
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Start the delivery loop on the running event loop."""
        if self.http_client is None:
            self.http_client = AsyncHTTPClient()
        if self._task is None:
            self._task = asyncio.create_task(self._run())

    def kick(self) -> None:
        """Deliver now (e.g. right after an emit) instead of at the next interval."""
        self._wake.set()

    async def stop(self) -> None:
        """Cancel the loop and wait for it to end."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        await periodic(
            lambda: deliver_pending(self.outbox, self.http_client),
            self.interval,
            self.outbox.log,
            "delivering user events",
            wake=self._wake,
        )
