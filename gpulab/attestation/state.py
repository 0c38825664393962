"""Last attestation state per GPU node (``GET /attestation/nodes``, attestation-gated jobs).

A node counts as attested while its last verified EAT is younger than the gate's max age, has not
expired, and no later genuine NRAS verdict against it (``REVOKING``) has been recorded. Garbage
submissions (bad signature, unknown nonce, ...) say nothing about the node and do not revoke it.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import JSON, Boolean, Engine, Float, String, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from .nonces import Base
from .reasons import Reason
from .verifier import Verified

REVOKING = frozenset({Reason.OVERALL_RESULT_FALSE, Reason.POLICY_VIOLATION, Reason.DEVICE_DENIED})


class NodeRow(Base):
    __tablename__ = "gpulab_attestation_nodes"

    node: Mapped[str] = mapped_column(String(255), primary_key=True)
    user: Mapped[str | None] = mapped_column(String(255))
    verified_at: Mapped[float | None] = mapped_column(Float)
    expires_at: Mapped[float | None] = mapped_column(Float)
    fingerprint: Mapped[str | None] = mapped_column(String(64))
    summary: Mapped[dict | None] = mapped_column(JSON)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    last_checked_at: Mapped[float] = mapped_column(Float)
    last_reason: Mapped[str] = mapped_column(String(64))


@dataclass(frozen=True)
class NodeState:
    """One node's row, as returned by the API."""

    node: str
    user: str | None
    verified_at: float | None
    expires_at: float | None
    fingerprint: str | None
    summary: dict[str, Any] | None
    revoked: bool
    last_checked_at: float
    last_reason: str

    def attested(self, max_age: float, now: float) -> bool:
        return (not self.revoked and self.verified_at is not None and now - self.verified_at <= max_age
                and (self.expires_at or 0) > now)


class NodeStates:
    """Reads and writes ``gpulab_attestation_nodes`` (same database as the nonces)."""

    def __init__(self, engine: Engine, clock: Callable[[], float] = time.time):
        self.engine = engine
        self.clock = clock
        Base.metadata.create_all(engine)

    def record(self, node: str, user: str, outcome: Verified | Reason) -> None:
        """Store a verification outcome for ``node``: the ``Verified`` result or the rejection reason."""
        now = self.clock()
        with Session(self.engine) as session, session.begin():
            row = session.get(NodeRow, node) or NodeRow(node=node, revoked=False)
            row.last_checked_at = now
            if isinstance(outcome, Verified):
                row.user, row.verified_at, row.expires_at = user, now, outcome.expires_at
                row.fingerprint, row.summary, row.revoked = outcome.fingerprint, outcome.as_dict(), False
                row.last_reason = "ok"
            else:
                row.last_reason = outcome.value
                row.revoked = row.revoked or outcome in REVOKING
            session.merge(row)

    def get(self, node: str) -> NodeState | None:
        with Session(self.engine) as session:
            row = session.get(NodeRow, node)
            return _state(row) if row else None

    def all(self) -> list[NodeState]:
        with Session(self.engine) as session:
            return [_state(r) for r in session.scalars(select(NodeRow).order_by(NodeRow.node))]

    def attested(self, node: str, max_age: float) -> NodeState | None:
        """The node's state if it is attested now and verified within ``max_age`` s (job gating), else None."""
        state = self.get(node)
        return state if state and state.attested(max_age, self.clock()) else None


def _state(row: NodeRow) -> NodeState:
    return NodeState(row.node, row.user, row.verified_at, row.expires_at, row.fingerprint, row.summary,
                     bool(row.revoked), row.last_checked_at, row.last_reason)
