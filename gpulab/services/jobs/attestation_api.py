"""``<prefix>api/v1/attestation/...``: GPU node attestation nonces, verification and node state.

``/evidence`` takes a node's raw evidence and relays it to NRAS with the platform's API key, so
GPU nodes (``gpulab attest collect``) never hold the key; ``/verify`` takes an EAT a node got itself.

The :class:`~gpulab.attestation.AttestationService` (and the NRAS API key) lives only in this
hub-managed service; users' servers forward to it (``gpulab/server_extension/attestation.py``).
Refusals are ``{"error": {"code": <reason code>, ...}}`` with the status of ``http_status(reason)``,
and ``Retry-After`` when the client is throttled or locked out. Throttling is per client address
(:func:`gpulab.net.client_ip`).
"""

import math
from datetime import UTC, datetime

from ... import scopes
from ...attestation import AttestationError, AttestationService, NodeState, Reason, Verified, http_status
from ...net import client_ip
from .handlers import APIError, UserHandler
from .models import (
    AttestationNode,
    AttestationNodeList,
    AttestationNonce,
    AttestationResult,
    EvidenceRequest,
    NonceRequest,
    VerifyRequest,
)
from .store import iso as iso_utc

NO_FIELD = frozenset({Reason.RATE_LIMITED, Reason.LOCKED_OUT, Reason.JWKS_UNAVAILABLE, Reason.NRAS_UNAVAILABLE})
FIELDS = {Reason.NONCE_UNKNOWN: "nonce", Reason.NRAS_REJECTED: "evidence_list"}  # else "token"


def iso(ts: float | None) -> str | None:
    """Epoch seconds -> ISO 8601 UTC with "Z", as the rest of the API."""
    return None if ts is None else iso_utc(datetime.fromtimestamp(ts, UTC))


def node_model(state: NodeState, max_age: float, now: float) -> AttestationNode:
    problem = state.problem(max_age, now)
    return AttestationNode(
        node=state.node, valid=problem is None, problem=problem, user=state.user, verified_at=iso(state.verified_at),
        expires_at=iso(state.expires_at), fingerprint=state.fingerprint, revoked=state.revoked,
        last_checked_at=iso(state.last_checked_at), last_reason=state.last_reason,
        devices=(state.summary or {}).get("devices", {}),
    )


def result_model(node: str, verified: Verified) -> AttestationResult:
    return AttestationResult(
        verdict=True, reason="ok", node=node, fingerprint=verified.fingerprint,
        claims_version=verified.claims_version, issuer=verified.issuer, kid=verified.kid, jti=verified.jti,
        issued_at=iso(verified.issued_at), expires_at=iso(verified.expires_at),
        devices=verified.devices,
    )


class AttestationHandler(UserHandler):
    """Needs ``custom:gpulab:attest`` (admins have it as a subscope)."""

    required_scope = scopes.ATTEST

    @property
    def attestation(self) -> AttestationService:
        service = self.queue.attestation
        if service is None:
            raise APIError(503, "attestation is not configured in gpulab-jobs", code="unavailable")
        return service

    @property
    def client_ip(self) -> str:
        return client_ip(self.request.remote_ip, self.request.headers.get("X-Forwarded-For"))

    @staticmethod
    def refusal(e: AttestationError) -> APIError:
        """The API error for a refused request."""
        field = None if e.reason in NO_FIELD else FIELDS.get(e.reason, "token")
        headers = {"Retry-After": str(math.ceil(e.retry_after))} if e.retry_after is not None else None
        return APIError(http_status(e.reason), e.detail or e.reason.value, field=field, code=e.reason.value,
                        headers=headers)


class NonceHandler(AttestationHandler):
    def post(self):
        body = self.parse(NonceRequest)
        try:
            nonce = self.attestation.issue_nonce(user=self.user_name, node=body.node, client_ip=self.client_ip,
                                                 purpose=body.purpose)
        except AttestationError as e:
            raise self.refusal(e) from None
        self.write_json(AttestationNonce(nonce=nonce.value, expires_at=iso(nonce.expires_at)))


class VerifyHandler(AttestationHandler):
    async def post(self):
        body = self.parse(VerifyRequest)
        try:
            verified = await self.attestation.verify(body.token, nonce=body.nonce, user=self.user_name,
                                                     node=body.node, client_ip=self.client_ip, purpose=body.purpose)
        except AttestationError as e:
            raise self.refusal(e) from None
        self.write_json(result_model(body.node, verified))


class EvidenceHandler(AttestationHandler):
    async def post(self):
        body = self.parse(EvidenceRequest)
        try:
            verified = await self.attestation.attest_evidence(
                [e.model_dump() for e in body.evidence_list], nonce=body.nonce, user=self.user_name, node=body.node,
                client_ip=self.client_ip, device=body.device, arch=body.arch, purpose=body.purpose)
        except AttestationError as e:
            raise self.refusal(e) from None
        self.write_json(result_model(body.node, verified))


class NodesHandler(AttestationHandler):
    def get(self):
        nodes = self.attestation.nodes
        max_age, now = self.queue.attestation_max_age, nodes.clock()
        self.write_json(AttestationNodeList(nodes=[node_model(s, max_age, now) for s in nodes.all()], max_age=max_age))


def handlers(api: str) -> list:
    """Routes under ``api`` (``<service prefix>api/v1``)."""
    return [
        (api + "/attestation/nonce", NonceHandler),
        (api + "/attestation/verify", VerifyHandler),
        (api + "/attestation/evidence", EvidenceHandler),
        (api + "/attestation/nodes", NodesHandler),
    ]
