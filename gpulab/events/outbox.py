"""Hub side of user lifecycle events: validate, store in an outbox, emit via jupyter_events.

Usage from the hub's authenticator hooks::

    events = UserEvents(url="sqlite:///gpulab-events.sqlite", event_logger=app.eventlog)
    events.add_subscriber("mlflow", "http://127.0.0.1:10101/services/mlflow/events", token)
    events.emit("user.created", "alice", groups=["ml"], roles=["user"])
    deliverer.kick()   # gpulab.events.delivery.Deliverer
"""

import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from jupyter_events import EventLogger
from sqlalchemy import Column, ForeignKey, Index, String, Table, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from traitlets import Dict, Instance, Unicode, default
from traitlets.config import LoggingConfigurable

from ..service.storage import Schema, make_engine, utcnow
from . import SCHEMA_ID, SCHEMA_PATH


class Base(DeclarativeBase):
    """Declarative base of the hub's events database: the outbox, its deliveries, the users' last sent state."""


class OutboxEvent(Base):
    """One emitted event; ``id`` gives the delivery order."""

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(primary_key=True)
    event_id: Mapped[str] = mapped_column(String(36), unique=True)
    type: Mapped[str] = mapped_column(String(32))
    user: Mapped[str] = mapped_column(String(255))
    payload: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime]


class Delivery(Base):
    """Delivery state of one event to one subscriber (times are naive UTC)."""

    __tablename__ = "deliveries"
    __table_args__ = (Index("ix_deliveries_pending", "subscriber", "delivered_at"),)

    event_id: Mapped[str] = mapped_column(ForeignKey("outbox.event_id", ondelete="CASCADE"), primary_key=True)
    subscriber: Mapped[str] = mapped_column(String(255), primary_key=True)
    delivered_at: Mapped[datetime | None]
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[datetime]
    last_error: Mapped[str | None] = mapped_column(Text)


# the last state sent for each user, so that a hub restart (add_user for every user) emits nothing new
known_users = Table(
    "known_users",
    Base.metadata,
    Column("name", String(255), primary_key=True),
    Column("state", Text, nullable=False),
)

SCHEMA = Schema((Base.metadata,), Path(__file__).with_name("migrations"), "gpulab_events_alembic_version")


@dataclass(frozen=True)
class Subscriber:
    """Where to POST events, and the service's API token (kept out of reprs and logs)."""

    url: str
    token: str = field(repr=False)


class UserEvents(LoggingConfigurable):
    """Emits user lifecycle events into the outbox, one delivery row per subscriber."""

    url = Unicode(
        "",
        help="SQLAlchemy URL of the outbox database (sqlite:///... or postgresql+psycopg://...).",
    ).tag(config=True)

    event_logger = Instance(
        EventLogger,
        help="jupyter_events logger the events are also emitted through (e.g. the hub's eventlog).",
    )

    subscribers = Dict(help="Subscriber by name; populate with add_subscriber (not config: holds tokens).")

    @default("event_logger")
    def _default_event_logger(self) -> EventLogger:
        return EventLogger(parent=self)

    def __init__(self, **kwargs):
        """Register the event schema and bring the database to this release's tables."""
        super().__init__(**kwargs)
        if not self.url:
            raise ValueError("UserEvents.url (the outbox database URL) must be set")
        if SCHEMA_ID not in self.event_logger.schemas:
            self.event_logger.register_event_schema(SCHEMA_PATH)
        self.engine = make_engine(self.url)
        SCHEMA.upgrade(self.engine)

    def add_subscriber(self, name: str, url: str, token: str) -> None:
        """Deliver events emitted from now on to ``url``, authenticated with ``token``."""
        self.subscribers[name] = Subscriber(url, token)

    def emit(
        self,
        type: str,
        user: str,
        groups: Iterable[str] = (),
        roles: Iterable[str] = (),
        admin: bool = False,
    ) -> str:
        """Validate, store and emit one event; return its event id.

        Raises ``jsonschema.ValidationError`` (storing nothing) if the event does not
        match the schema. The outbox row and one delivery row per current subscriber
        are committed when this returns; the event is then emitted through
        ``event_logger`` for its handlers and listeners.
        """
        data = {
            "event_id": str(uuid.uuid4()),
            "type": type,
            "user": user,
            "groups": list(groups),
            "roles": list(roles),
            "admin": admin,
        }
        self.event_logger.schemas.validate_event(SCHEMA_ID, data)
        now = utcnow()
        with Session(self.engine) as session, session.begin():
            session.add(
                OutboxEvent(
                    event_id=data["event_id"],
                    type=type,
                    user=user,
                    payload=json.dumps(data),
                    created_at=now,
                )
            )
            session.flush()
            session.add_all(
                Delivery(event_id=data["event_id"], subscriber=name, next_attempt_at=now) for name in self.subscribers
            )
        self.event_logger.emit(schema_id=SCHEMA_ID, data=data)
        return data["event_id"]
