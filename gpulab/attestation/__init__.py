"""Verification of NVIDIA GPU attestation (NRAS detached EATs) for gpulab's GPU nodes.

- :mod:`.verifier` — every check of DESIGN.md §4 on one detached EAT, with a reason code per refusal;
- :mod:`.jwks` — NRAS signing keys, cached and failing closed; :mod:`.policy` — appraisal policy;
- :mod:`.nonces` — single-use nonces in SQL; :mod:`.state` — last state per node;
- :mod:`.enrolment` — enrolled nodes: their credential (hashed) and the GPUs they must present;
- :mod:`.abuse`, :mod:`.audit` — throttling, lockout and the audit trail; :mod:`.nras` — API key and client;
- :mod:`.service` — all of it behind one object for the HTTP endpoints and job gating.
"""

from .config import Attestation
from .enrolment import Enrolment, EnrolmentExists, Enrolments
from .nonces import IssuedNonce, NonceStore
from .reasons import AttestationError, Reason, http_status
from .service import AttestationService, Caller
from .state import NodeState, NodeStates
from .verifier import AttestedDevice, Verified, Verifier

__all__ = [
    "Attestation",
    "AttestationError",
    "AttestationService",
    "AttestedDevice",
    "Caller",
    "Enrolment",
    "EnrolmentExists",
    "Enrolments",
    "IssuedNonce",
    "NodeState",
    "NodeStates",
    "NonceStore",
    "Reason",
    "Verified",
    "Verifier",
    "http_status",
]
