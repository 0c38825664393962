"""A minimal hub-managed-style service that records the user events it receives.

Configured like a JupyterHub service: ``JUPYTERHUB_SERVICE_URL`` (bind address),
``JUPYTERHUB_API_TOKEN`` (the token deliveries must carry), optional
``JUPYTERHUB_SERVICE_PREFIX``; ``EVENT_RECORDER_DB`` is the SQLite file holding

- ``received``: each applied event, in apply order (once per event id), and
- ``receipts``: every POST with its response status and ``traceparent``.

Run ``python tests/support/event_recorder.py``; stops on SIGTERM.
"""

import os
import sys

# Run as a script, sys.path[0] would be tests/support, where a helper module can shadow a
# standard-library one (a platform.py once did); resolve imports from the repository root.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import asyncio  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
from urllib.parse import urlsplit  # noqa: E402

from sqlalchemy import Text  # noqa: E402
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column  # noqa: E402
from tornado.web import Application  # noqa: E402

from gpulab.events import subscriber  # noqa: E402
from gpulab.events.subscriber import AppliedEvents, UserEventsHandler  # noqa: E402
from gpulab.tracing import setup_tracing  # noqa: E402


class Base(DeclarativeBase):
    """Declarative base of the recorder's tables."""


class Received(Base):
    """An applied event."""

    __tablename__ = "received"

    seq: Mapped[int] = mapped_column(primary_key=True)
    event_id: Mapped[str]
    type: Mapped[str]
    user: Mapped[str]
    payload: Mapped[str] = mapped_column(Text)


class Receipt(Base):
    """A POST to the events endpoint, whatever its outcome."""

    __tablename__ = "receipts"

    seq: Mapped[int] = mapped_column(primary_key=True)
    event_id: Mapped[str | None]
    status: Mapped[int]
    traceparent: Mapped[str | None]


def record(event: dict, session: Session) -> None:
    """Apply an event: store it in ``received``."""
    session.add(
        Received(
            event_id=event["event_id"],
            type=event["type"],
            user=event["user"],
            payload=json.dumps(event),
        )
    )


class RecordingHandler(UserEventsHandler):
    """UserEventsHandler that also logs every request into ``receipts``, before responding."""

    def finish(self, chunk=None):
        try:
            event_id = json.loads(self.request.body).get("event_id")
        except (ValueError, AttributeError):
            event_id = None
        with Session(self.applied.engine) as session, session.begin():
            session.add(
                Receipt(
                    event_id=event_id,
                    status=self.get_status(),
                    traceparent=self.request.headers.get("traceparent"),
                )
            )
        return super().finish(chunk)


async def main() -> None:
    """Serve until SIGTERM."""
    setup_tracing("event-recorder")
    bind = urlsplit(os.environ["JUPYTERHUB_SERVICE_URL"])
    prefix = os.environ.get("JUPYTERHUB_SERVICE_PREFIX", "/")
    applied = AppliedEvents(f"sqlite:///{os.environ['EVENT_RECORDER_DB']}")
    Base.metadata.create_all(applied.engine)  # a subscriber without migrations: its tables and applied_events
    subscriber.Base.metadata.create_all(applied.engine)
    app = Application(
        [
            (
                prefix.rstrip("/") + "/events",
                RecordingHandler,
                {"token": os.environ["JUPYTERHUB_API_TOKEN"], "applied": applied, "apply": record},
            )
        ]
    )
    server = app.listen(bind.port, address=bind.hostname)
    stopped = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopped.set)
    await stopped.wait()
    server.stop()


if __name__ == "__main__":
    asyncio.run(main())
