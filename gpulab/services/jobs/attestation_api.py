"""``<prefix>api/v1/attestation/...``: GPU node attestation nonces, verification, node state and enrolment.

``/evidence`` takes a node's raw evidence and relays it to NRAS with the platform's API key, so
GPU nodes (``gpulab attest collect``) never hold the key; ``/verify`` takes an EAT a node got itself.

Callers are hub users (token or cookie, as every handler here) or a node's own identity: the
credential ``gpulab nodes enroll`` printed, sent as ``Authorization: token node:<name>:<secret>``
and checked here against its hash (:class:`~gpulab.attestation.Enrolments`), never sent on to the
hub. Only that identity, or an admin, may attest the node; ``/enrolments`` is for admins.

The :class:`~gpulab.attestation.AttestationService` (and the NRAS API key) lives only in this
hub-managed service; users' servers forward to it (``gpulab/server_extension/attestation.py``).
Refusals are ``{"error": {"code": <reason code>, ...}}`` with the status of ``http_status(reason)``,
and ``Retry-After`` when the caller is throttled or locked out. Throttling is per caller identity;
the client address (:func:`gpulab.net.client_ip`) is only recorded in the audit trail.
"""

import asyncio
import math
import re
from datetime import UTC, datetime

from ... import scopes
from ...attestation import (
    AttestationError,
    AttestationService,
    Caller,
    Enrolment,
    EnrolmentExists,
    NodeState,
    Reason,
    Verified,
    http_status,
)
from ...attestation.service import NODE_NAME
from ...net import client_ip
from ...service.errors import APIError
from .handlers import UserHandler
from .models import (
    AttestationNode,
    AttestationNodeList,
    AttestationNonce,
    AttestationResult,
    EnrolRequest,
    EvidenceRequest,
    NewNodeEnrolment,
    NodeEnrolment,
    NodeEnrolmentList,
    NonceRequest,
    VerifyRequest,
)
from .store import iso as iso_utc

NO_FIELD = frozenset({Reason.RATE_LIMITED, Reason.LOCKED_OUT, Reason.JWKS_UNAVAILABLE, Reason.NRAS_UNAVAILABLE})
FIELDS = {
    Reason.NONCE_UNKNOWN: "nonce",
    Reason.NRAS_REJECTED: "evidence_list",
    Reason.NOT_NODE_IDENTITY: "node",
    Reason.NODE_NOT_ENROLLED: "node",
}  # else "token"
NODE_CREDENTIAL = re.compile(r"(?:token|bearer)\s+(node:\S+)", re.IGNORECASE)


def iso(ts: float | None) -> str | None:
    """Epoch seconds -> ISO 8601 UTC with "Z", as the rest of the API."""
    return None if ts is None else iso_utc(datetime.fromtimestamp(ts, UTC))


def node_model(state: NodeState, max_age: float, now: float) -> AttestationNode:
    problem = state.problem(max_age, now)
    return AttestationNode(
        node=state.node,
        valid=problem is None,
        problem=problem,
        user=state.user,
        verified_at=iso(state.verified_at),
        expires_at=iso(state.expires_at),
        fingerprint=state.fingerprint,
        revoked=state.revoked,
        last_checked_at=iso(state.last_checked_at),
        last_reason=state.last_reason,
        devices=(state.summary or {}).get("devices", {}),
        nvidia_errors=(state.summary or {}).get("nvidia_errors"),
    )


def enrolment_model(e: Enrolment) -> NodeEnrolment:
    return NodeEnrolment(
        node=e.node, gpus=e.gpus, ueids=e.ueids, enrolled_at=iso(e.enrolled_at), enrolled_by=e.enrolled_by
    )


def result_model(node: str, verified: Verified) -> AttestationResult:
    return AttestationResult(
        verdict=True,
        reason="ok",
        node=node,
        fingerprint=verified.fingerprint,
        claims_version=verified.claims_version,
        issuer=verified.issuer,
        kid=verified.kid,
        jti=verified.jti,
        issued_at=iso(verified.issued_at),
        expires_at=iso(verified.expires_at),
        devices=verified.devices,
    )


class AttestationHandler(UserHandler):
    """Needs ``custom:gpulab:attest`` (admins have it as a subscope), or a node's own credential."""

    required_scope = scopes.ATTEST

    async def prepare(self):
        """A node credential is checked here and goes no further (the hub does not know it); anything
        else is a hub token or cookie. A node identity holds only ``custom:gpulab:attest``."""
        match = NODE_CREDENTIAL.fullmatch(self.request.headers.get("Authorization", ""))
        if match is not None:
            node = await asyncio.to_thread(self.attestation.enrolments.authenticate, match[1])
            if node is None:
                raise APIError(
                    401, "the node credential is not valid (removed or re-enrolled?)", code="unauthenticated"
                )
            self._token_authenticated = True  # no cookie: no XSRF check
            self.current_user = {"kind": "node", "name": f"node:{node}", "node": node, "scopes": [scopes.ATTEST]}
        super().prepare()

    @property
    def caller(self) -> Caller:
        if self.current_user.get("kind") == "node":
            return Caller.of_node(self.current_user["node"])
        return Caller.user(self.user_name, admin=self.is_admin)

    @property
    def attestation(self) -> AttestationService:
        service = self.settings.get("attestation")
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
        details = {"nvidia_errors": e.nvidia_errors} if e.nvidia_errors else None
        return APIError(
            http_status(e.reason),
            e.detail or e.reason.value,
            field=field,
            code=e.reason.value,
            headers=headers,
            details=details,
        )


class NonceHandler(AttestationHandler):
    async def post(self):
        body = self.parse(NonceRequest)
        try:
            nonce = await asyncio.to_thread(
                self.attestation.issue_nonce,
                caller=self.caller,
                node=body.node,
                client_ip=self.client_ip,
                purpose=body.purpose,
            )
        except AttestationError as e:
            raise self.refusal(e) from None
        self.write_json(AttestationNonce(nonce=nonce.value, expires_at=iso(nonce.expires_at)))


class VerifyHandler(AttestationHandler):
    async def post(self):
        body = self.parse(VerifyRequest)
        try:
            verified = await self.attestation.verify(
                body.token,
                nonce=body.nonce,
                caller=self.caller,
                node=body.node,
                client_ip=self.client_ip,
                purpose=body.purpose,
            )
        except AttestationError as e:
            raise self.refusal(e) from None
        self.write_json(result_model(body.node, verified))


class EvidenceHandler(AttestationHandler):
    async def post(self):
        body = self.parse(EvidenceRequest)
        try:
            verified = await self.attestation.attest_evidence(
                [e.model_dump() for e in body.evidence_list],
                nonce=body.nonce,
                caller=self.caller,
                node=body.node,
                client_ip=self.client_ip,
                device=body.device,
                arch=body.arch,
                purpose=body.purpose,
            )
        except AttestationError as e:
            raise self.refusal(e) from None
        self.write_json(result_model(body.node, verified))


class NodesHandler(AttestationHandler):
    async def get(self):
        nodes = self.attestation.nodes
        max_age, now = self.queue.attestation_max_age, nodes.clock()
        states = await asyncio.to_thread(nodes.all)
        self.write_json(AttestationNodeList(nodes=[node_model(s, max_age, now) for s in states], max_age=max_age))


class EnrolmentAdminHandler(AttestationHandler):
    """Enrolment is for admins (``gpulab nodes`` calls it with the platform's CLI credential)."""

    async def prepare(self):
        await super().prepare()
        if not self.is_admin:
            raise APIError(403, f"enrolling nodes needs the {scopes.ADMIN} scope", code="forbidden")


class EnrolmentsHandler(EnrolmentAdminHandler):
    async def get(self):
        enrolled = await asyncio.to_thread(self.attestation.enrolments.all)
        self.write_json(NodeEnrolmentList(nodes=[enrolment_model(e) for e in enrolled]))

    async def post(self):
        body = self.parse(EnrolRequest)
        enrolments = self.attestation.enrolments
        try:
            credential = await asyncio.to_thread(
                enrolments.enroll, body.node, by=self.user_name, gpus=body.gpus, ueids=body.ueids
            )
        except EnrolmentExists:
            raise APIError(
                409,
                f"node {body.node} is enrolled already; remove it first for a new credential",
                field="node",
                code="conflict",
            ) from None
        enrolment = enrolment_model(await asyncio.to_thread(enrolments.get, body.node))
        self.write_json(NewNodeEnrolment(**enrolment.model_dump(), credential=credential), 201)


class EnrolmentHandler(EnrolmentAdminHandler):
    async def delete(self, node):
        """The credential stops working and the node's state goes: it gates as never attested."""
        if not await asyncio.to_thread(self.attestation.enrolments.remove, node):
            raise APIError(404, f"node {node} is not enrolled", field="node", code="not_found")
        await asyncio.to_thread(self.attestation.nodes.remove, node)
        self.set_status(204)
        self.finish()


# routes under <service prefix>api/v1
default_handlers = [
    ("/attestation/nonce", NonceHandler),
    ("/attestation/verify", VerifyHandler),
    ("/attestation/evidence", EvidenceHandler),
    ("/attestation/nodes", NodesHandler),
    ("/attestation/enrolments", EnrolmentsHandler),
    (f"/attestation/enrolments/(?P<node>{NODE_NAME.pattern})", EnrolmentHandler),
]
