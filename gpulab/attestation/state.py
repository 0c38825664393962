"""Last attestation state per GPU node (``GET /attestation/nodes``, attestation-gated jobs).

A node counts as attested while its last verified EAT is younger than the gate's max age, has not
expired, and no later genuine NRAS verdict against it (``REVOKING``) has been recorded. Garbage
submissions (bad signature, unknown nonce, ...) say nothing about the node and do not revoke it.
Only the node's own identity or an admin reaches this store (``AttestationService``): nobody else's
attestation, failed or not, changes a node's state.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import JSON, Boolean, Engine, Float, String, delete, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from .nonces import Base
from .reasons import Reason
from .verifier import Verified

REVOKING = frozenset(
    {Reason.OVERALL_RESULT_FALSE, Reason.POLICY_VIOLATION, Reason.DEVICE_DENIED, Reason.DEVICE_MISMATCH}
)


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

    def problem(self, max_age: float, now: float) -> str | None:
        """Why the node may not run attestation-required jobs now, or None if it may."""
        if self.revoked:
            return f"attestation revoked ({self.last_reason})"
        if self.verified_at is None:
            return f"never attested successfully (last: {self.last_reason})"
        if now - self.verified_at > max_age:
            return f"attestation older than {max_age:.0f} s"
        if (self.expires_at or 0) <= now:
            return "attestation token expired"
        return None


class NodeStates:
    """Reads and writes ``gpulab_attestation_nodes`` (same database as the nonces)."""

    def __init__(self, engine: Engine, clock: Callable[[], float] = time.time):
        self.engine = engine
        self.clock = clock

    def record(self, node: str, user: str, outcome: Verified | Reason, nvidia_errors: dict | None = None) -> None:
        """Store a verification outcome for ``node``: the ``Verified`` result or the rejection reason, with
        NRAS's error details of a failure verdict (kept in ``summary["nvidia_errors"]`` until a success)."""
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
                if nvidia_errors:
                    row.summary = {**(row.summary or {}), "nvidia_errors": nvidia_errors}
            session.merge(row)

    def remove(self, node: str) -> None:
        """Forget ``node`` (its enrolment was removed): it gates as never attested."""
        with Session(self.engine) as session, session.begin():
            session.execute(delete(NodeRow).where(NodeRow.node == node))

    def get(self, node: str) -> NodeState | None:
        with Session(self.engine) as session:
            row = session.get(NodeRow, node)
            return _state(row) if row else None

    def all(self) -> list[NodeState]:
        with Session(self.engine) as session:
            return [_state(r) for r in session.scalars(select(NodeRow).order_by(NodeRow.node))]

    def gate(self, node: str, max_age: float) -> tuple[NodeState | None, str | None]:
        """For job gating: ``(state, None)`` if ``node`` is attested and verified within ``max_age`` s,
        else ``(state or None, why not)``. ``state.fingerprint`` is what to store with the job."""
        state = self.get(node)
        if state is None:
            return None, "node never attested"
        return state, state.problem(max_age, self.clock())


def _state(row: NodeRow) -> NodeState:
    return NodeState(
        row.node,
        row.user,
        row.verified_at,
        row.expires_at,
        row.fingerprint,
        row.summary,
        bool(row.revoked),
        row.last_checked_at,
        row.last_reason,
    )
