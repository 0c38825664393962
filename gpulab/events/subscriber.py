"""Service side of user lifecycle events: authenticate, validate and apply each event once.

A hub-managed service mounts :class:`UserEventsHandler`, e.g.::

    applied = AppliedEvents("sqlite:///state.sqlite")  # the service's database, with the table applied_events
    (url_path_join(prefix, "events"), UserEventsHandler,
     {"token": os.environ["JUPYTERHUB_API_TOKEN"], "applied": applied, "apply": sync_user})

where ``sync_user(event, session)`` updates the service's state in ``session``. The table ``applied_events``
(:data:`Base`'s) belongs to the service's database and its migrations (gpulab-jobs': revision 0005).
"""

import hmac
import json
from collections.abc import Callable
from datetime import datetime

from jsonschema import ValidationError
from jupyter_events.schema import EventSchema
from sqlalchemy import String
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from tornado.web import RequestHandler

from gpulab.tracing import span_from_headers

from ..service.storage import make_engine, utcnow
from . import SCHEMA_PATH

Apply = Callable[[dict, Session], None]

_schema = EventSchema(SCHEMA_PATH)


class Base(DeclarativeBase):
    """Declarative base of the subscriber's bookkeeping table."""


class AppliedEvent(Base):
    """An event id this service has applied (naive UTC time)."""

    __tablename__ = "applied_events"

    event_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    applied_at: Mapped[datetime]


class AppliedEvents:
    """Records applied event ids so redelivered events are applied only once."""

    def __init__(self, url: str):
        self.engine = make_engine(url)  # its table made by the database's migrations

    def apply_once(self, event: dict, fn: Apply) -> bool:
        """Run ``fn(event, session)`` and record ``event["event_id"]`` in one transaction.

        Returns False, without calling ``fn``, if the id was already recorded. If ``fn``
        raises, nothing is recorded and the exception propagates (so the hub retries).
        """
        with Session(self.engine) as session:
            session.add(AppliedEvent(event_id=event["event_id"], applied_at=utcnow()))
            try:
                session.flush()
            except IntegrityError:
                return False
            fn(event, session)
            session.commit()
        return True


def validation_error(event: object) -> tuple[str, str] | None:
    """Return ``(field, message)`` for the first schema violation of ``event``, or None."""
    try:
        _schema.validate(event)
    except ValidationError as err:
        if err.validator == "required":
            field = next(name for name in err.validator_value if name not in err.instance)
        else:
            field = ".".join(str(part) for part in err.absolute_path) or "body"
        return field, err.message
    return None


class UserEventsHandler(RequestHandler):
    """``POST`` endpoint for events from the hub, authenticated by the service's API token."""

    def initialize(self, token: str, applied: AppliedEvents, apply: Apply) -> None:
        """``token``: this service's JUPYTERHUB_API_TOKEN; ``apply(event, session)``."""
        self.token = token
        self.applied = applied
        self.apply = apply

    def _fail(self, status: int, message: str, field: str | None = None) -> None:
        self.set_status(status)
        if status == 401:
            self.set_header("WWW-Authenticate", "token")
        self.finish({"error": message, "field": field} if field else {"error": message})

    def post(self) -> None:
        """Check the token, validate the event, apply it once; 204 also for duplicates."""
        scheme, _, given = self.request.headers.get("Authorization", "").partition(" ")
        given = given.strip()
        if scheme.lower() != "token" or not given:
            return self._fail(401, "missing 'Authorization: token ...' header")
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            return self._fail(403, "invalid token")
        try:
            event = json.loads(self.request.body)
        except ValueError:
            return self._fail(400, "body is not valid JSON", "body")
        invalid = validation_error(event)
        if invalid:
            return self._fail(400, f"invalid {invalid[0]}: {invalid[1]}", invalid[0])
        with span_from_headers(__name__, "apply user event", self.request.headers) as span:
            span.set_attribute("gpulab.event_id", event["event_id"])
            span.set_attribute("gpulab.duplicate", not self.applied.apply_once(event, self.apply))
        self.set_status(204)
