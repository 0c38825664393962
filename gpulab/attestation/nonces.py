"""Server-issued attestation nonces: 32 random bytes, single use, short-lived, bound to (user, node, purpose).

They live in a SQL table (SQLite or PostgreSQL) so a restart of the issuing service keeps them
usable; only their SHA-256 is stored, so a copy of the database cannot be used to answer one.
``consume`` is one conditional ``DELETE``: of two concurrent uses at most one succeeds.
"""

import base64
import hashlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine, Float, String, delete
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from ..service.storage import Schema, make_engine

NONCE_BYTES = 32


class Base(DeclarativeBase):
    """The attestation database's tables: nonces, node states (:mod:`.state`), enrolments (:mod:`.enrolment`)."""


SCHEMA = Schema((Base.metadata,), Path(__file__).with_name("migrations"), "gpulab_attestation_alembic_version")


def open_database(url: str) -> Engine:
    """The attestation database at ``url``, brought to this release's tables by its migrations."""
    engine = make_engine(url)
    SCHEMA.upgrade(engine)
    return engine


class NonceRow(Base):
    __tablename__ = "gpulab_attestation_nonces"

    digest: Mapped[str] = mapped_column(String(64), primary_key=True)
    user: Mapped[str] = mapped_column(String(255))
    node: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(64))
    expires_at: Mapped[float] = mapped_column(Float, index=True)


@dataclass(frozen=True)
class IssuedNonce:
    """A fresh nonce. ``value`` (64 hex digits) is what NVIDIA's tools take and ``eat_nonce`` echoes."""

    value: str
    expires_at: float

    @property
    def b64url(self) -> str:
        return base64.urlsafe_b64encode(bytes.fromhex(self.value)).rstrip(b"=").decode()


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


class NonceStore:
    """Issues and consumes nonces in the table ``gpulab_attestation_nonces``."""

    def __init__(
        self,
        db_url: str = "",
        *,
        engine: Engine | None = None,
        ttl: float = 300.0,
        clock: Callable[[], float] = time.time,
    ):
        self.engine = engine or open_database(db_url)
        self.ttl = ttl
        self.clock = clock

    def issue(self, *, user: str, node: str, purpose: str) -> IssuedNonce:
        """A new nonce for ``user`` to attest ``node`` for ``purpose``; expired ones are purged."""
        value = secrets.token_bytes(NONCE_BYTES).hex()
        now = self.clock()
        with Session(self.engine) as session, session.begin():
            session.execute(delete(NonceRow).where(NonceRow.expires_at <= now))
            session.add(
                NonceRow(digest=_digest(value), user=user, node=node, purpose=purpose, expires_at=now + self.ttl)
            )
        return IssuedNonce(value, now + self.ttl)

    def consume(self, value: str, *, user: str, node: str, purpose: str) -> bool:
        """Use up ``value``: True only if it was issued for exactly this binding, unused and unexpired."""
        if not isinstance(value, str) or len(value) != 2 * NONCE_BYTES:
            return False
        with Session(self.engine) as session, session.begin():
            result = session.execute(
                delete(NonceRow).where(
                    NonceRow.digest == _digest(value),
                    NonceRow.user == user,
                    NonceRow.node == node,
                    NonceRow.purpose == purpose,
                    NonceRow.expires_at > self.clock(),
                )
            )
        return result.rowcount == 1
