"""Enrolled GPU nodes: each node's own credential (stored as a hash) and the GPUs it must present.

An admin enrols a node (``gpulab nodes enroll NAME``) with either the UEIDs of its GPUs or their
count; with a count, the node's first successful attestation pins the UEIDs it presented. The
credential, ``node:<name>:<secret>``, is shown once: only the SHA-256 of its 32 random bytes is
kept, which is enough for a secret of that entropy and makes a copy of the database useless.
A node presents it as ``Authorization: token node:<name>:<secret>`` to gpulab-jobs, which checks
it here: no hub user per node, and the name is part of the credential, so a node can only ever
speak for itself.
"""

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import JSON, Engine, Float, Integer, String, delete, select, update
from sqlalchemy.orm import Mapped, Session, mapped_column

from .nonces import Base
from .reasons import AttestationError, Reason
from .verifier import Verified

PREFIX = "node:"
SECRET_BYTES = 32


class EnrolmentRow(Base):
    __tablename__ = "gpulab_attestation_enrolments"

    node: Mapped[str] = mapped_column(String(255), primary_key=True)
    digest: Mapped[str] = mapped_column(String(64))
    gpus: Mapped[int] = mapped_column(Integer)
    ueids: Mapped[list | None] = mapped_column(JSON(none_as_null=True))
    enrolled_at: Mapped[float] = mapped_column(Float)
    enrolled_by: Mapped[str] = mapped_column(String(255))


@dataclass(frozen=True)
class Enrolment:
    """One enrolled node as the API shows it (never the credential)."""

    node: str
    gpus: int
    ueids: list[str] | None
    enrolled_at: float
    enrolled_by: str


class EnrolmentExists(Exception):
    """The node is enrolled already: remove it first to issue a new credential."""


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class Enrolments:
    """Reads and writes ``gpulab_attestation_enrolments`` (same database as the nonces and node state)."""

    def __init__(self, engine: Engine, clock: Callable[[], float] = time.time):
        self.engine = engine
        self.clock = clock

    def enroll(self, node: str, *, by: str, gpus: int | None = None, ueids: list[str] | None = None) -> str:
        """Enrol ``node`` with ``ueids`` (pinned now) or ``gpus`` (pinned by its first attestation);
        the credential, which is not kept. Raises ``EnrolmentExists``."""
        secret = secrets.token_urlsafe(SECRET_BYTES)
        pinned = sorted(set(ueids)) if ueids else None
        with Session(self.engine) as session, session.begin():
            if session.get(EnrolmentRow, node) is not None:
                raise EnrolmentExists(node)
            session.add(
                EnrolmentRow(
                    node=node,
                    digest=_digest(secret),
                    gpus=len(pinned) if pinned else gpus,
                    ueids=pinned,
                    enrolled_at=self.clock(),
                    enrolled_by=by,
                )
            )
        return f"{PREFIX}{node}:{secret}"

    def remove(self, node: str) -> bool:
        """Forget ``node``'s enrolment (its credential stops working); False if it was not enrolled."""
        with Session(self.engine) as session, session.begin():
            return session.execute(delete(EnrolmentRow).where(EnrolmentRow.node == node)).rowcount == 1

    def get(self, node: str) -> Enrolment | None:
        with Session(self.engine) as session:
            row = session.get(EnrolmentRow, node)
            return _enrolment(row) if row else None

    def all(self) -> list[Enrolment]:
        with Session(self.engine) as session:
            return [_enrolment(r) for r in session.scalars(select(EnrolmentRow).order_by(EnrolmentRow.node))]

    def authenticate(self, credential: str) -> str | None:
        """The node whose credential ``credential`` is (compared in constant time), or None."""
        node, _, secret = credential.removeprefix(PREFIX).rpartition(":")
        if not credential.startswith(PREFIX) or not node or not secret:
            return None
        with Session(self.engine) as session:
            row = session.get(EnrolmentRow, node)
        if row is None or not hmac.compare_digest(row.digest.encode(), _digest(secret).encode()):
            return None
        return node

    def check_devices(self, node: str, verified: Verified) -> None:
        """Raise ``device_mismatch`` unless ``verified`` names exactly the node's enrolled GPUs; pins the
        UEIDs of a node enrolled by count. One conditional UPDATE, so of two concurrent first attestations
        with different GPUs only one pins."""
        presented = sorted(d.ueid or "" for d in verified.devices.values())
        enrolment = self._enrolled(node)
        if enrolment.ueids is None:
            if len(presented) != enrolment.gpus or "" in presented:
                raise AttestationError(
                    Reason.DEVICE_MISMATCH,
                    f"{len(presented)} devices presented; node {node} is enrolled with {enrolment.gpus} GPUs",
                )
            with Session(self.engine) as session, session.begin():
                pinned = session.execute(
                    update(EnrolmentRow)
                    .where(EnrolmentRow.node == node, EnrolmentRow.ueids.is_(None))
                    .values(ueids=presented)
                ).rowcount
            if pinned:
                return
            enrolment = self._enrolled(node)  # pinned meanwhile by a concurrent attestation
        if presented != enrolment.ueids:
            unknown = sorted(set(presented) - set(enrolment.ueids))
            raise AttestationError(
                Reason.DEVICE_MISMATCH,
                f"the devices differ from node {node}'s enrolled GPUs "
                f"({len(unknown)} not enrolled, {len(enrolment.ueids)} enrolled)",
            )

    def _enrolled(self, node: str) -> Enrolment:
        enrolment = self.get(node)
        if enrolment is None:
            raise AttestationError(Reason.NODE_NOT_ENROLLED, f"node {node} is not enrolled")
        return enrolment


def _enrolment(row: EnrolmentRow) -> Enrolment:
    return Enrolment(row.node, row.gpus, row.ueids, row.enrolled_at, row.enrolled_by)
