"""One object for the HTTP layer: nonces, verification, NRAS relay, node state, throttling and audit.

    service = AttestationService.from_config(load_config())
    gpu7 = Caller.of_node("gpu-7")  # the node's own credential; or Caller.user("ana", admin=True)
    nonce = service.issue_nonce(caller=gpu7, node="gpu-7", client_ip="10.0.0.5")
    verified = await service.verify(eat_json, nonce=nonce.value, caller=gpu7, node="gpu-7", client_ip="10.0.0.5")

Only an enrolled node's own identity, or an admin, may attest it: anyone else is refused
(``not_node_identity``) before a nonce is issued or consumed, so nobody else's attestation, failed
or not, changes the node's state. A verified EAT must name exactly the node's enrolled GPUs
(``device_mismatch``). Every call is throttled and locked out per caller identity (a hub user or a
node credential), not per address: users' code runs on the platform's loopback, where any process
can claim any ``X-Forwarded-For``. Every call is audited; a refusal raises ``AttestationError`` with
its reason. The nonce is consumed before any cryptography, so it is single-use whatever the outcome,
and an unsolicited request cannot make the service fetch the JWKS.
"""

import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from traitlets.config import Config

from .abuse import AbuseGuard
from .audit import AuditLog
from .config import Attestation
from .enrolment import Enrolments
from .nonces import IssuedNonce, NonceStore, open_database
from .nras import NrasClient
from .reasons import SERVER_SIDE, AttestationError, Reason
from .state import NodeStates
from .verifier import Verified, Verifier

PURPOSE = "node-attestation"
NODE_NAME = re.compile(r"[A-Za-z0-9._-]{1,253}")


@dataclass(frozen=True)
class Caller:
    """Who asks: a hub user (``admin``: holds custom:gpulab:admin) or a node's own identity (``node``).

    ``key`` names the caller for throttling, lockout and nonce binding; the prefixes keep a hub user
    named like a node apart from the node."""

    name: str
    admin: bool = False
    node: str | None = None

    @classmethod
    def user(cls, name: str, admin: bool = False) -> "Caller":
        return cls(name, admin)

    @classmethod
    def of_node(cls, node: str) -> "Caller":
        return cls(f"node:{node}", node=node)

    @property
    def key(self) -> str:
        return self.name if self.node else f"user:{self.name}"

    def may_attest(self, node: str) -> bool:
        return self.admin or self.node == node


class AttestationService:
    """Attestation for GPU nodes as one service; all collaborators are injectable for tests."""

    def __init__(
        self,
        *,
        verifier: Verifier,
        nonces: NonceStore,
        nodes: NodeStates,
        enrolments: Enrolments,
        guard: AbuseGuard,
        audit: AuditLog,
        nras: NrasClient | None = None,
    ):
        self.verifier = verifier
        self.nonces = nonces
        self.nodes = nodes
        self.enrolments = enrolments
        self.guard = guard
        self.audit = audit
        self.nras = nras

    @classmethod
    def from_config(
        cls, cfg: Config, *, clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic
    ) -> "AttestationService":
        """Build from ``gpulab_config.py``; raises ``ConfigError`` on a bad URL, policy or key file."""
        s = Attestation(config=cfg)
        engine = open_database(s.db_url)
        return cls(
            verifier=Verifier.from_settings(s, clock=clock),
            nonces=NonceStore(engine=engine, ttl=s.nonce_ttl, clock=clock),
            nodes=NodeStates(engine, clock=clock),
            enrolments=Enrolments(engine, clock=clock),
            guard=AbuseGuard(
                nonce_rate=s.nonce_rate,
                nonce_burst=s.nonce_burst,
                verify_rate=s.verify_rate,
                verify_burst=s.verify_burst,
                max_failures=s.max_failures,
                lockout_seconds=s.lockout_seconds,
                clock=monotonic,
            ),
            audit=AuditLog(burst=s.audit_burst, window=s.audit_window, path=s.audit_log_file, clock=monotonic),
            nras=NrasClient.from_settings(s),
        )

    def issue_nonce(self, *, caller: Caller, node: str, client_ip: str, purpose: str = PURPOSE) -> IssuedNonce:
        """A nonce bound to (caller, node, purpose); raises ``rate_limited`` / ``locked_out`` or, for a
        caller who may not attest ``node``, ``not_node_identity`` / ``node_not_enrolled``."""
        who = {"user": caller.name, "client_ip": client_ip, "node": node}
        try:
            self.guard.check(caller.key, "nonce")
            _check_node(node)
            self._authorize(caller, node)
        except AttestationError as e:
            self.audit.record("nonce", e.reason, **who, detail=e.detail)
            raise
        nonce = self.nonces.issue(user=caller.key, node=node, purpose=purpose)
        self.audit.record("nonce", "ok", **who)
        return nonce

    async def verify(
        self, eat: str | bytes | list, *, nonce: str, caller: Caller, node: str, client_ip: str, purpose: str = PURPOSE
    ) -> Verified:
        """Verify a detached EAT from NRAS that answers ``nonce``; records the node's new state."""
        return await self._run(
            "verify", caller, node, client_ip, nonce, purpose, lambda: self.verifier.verify(eat, nonce)
        )

    async def attest_evidence(
        self,
        evidence_list: list[dict],
        *,
        nonce: str,
        caller: Caller,
        node: str,
        client_ip: str,
        device: str = "gpu",
        arch: str = "HOPPER",
        purpose: str = PURPOSE,
    ) -> Verified:
        """Relay a node's evidence to NRAS with the platform's API key, then verify the EAT it returns."""
        if self.nras is None:
            raise AttestationError(Reason.NRAS_UNAVAILABLE, "no NRAS client configured")

        async def relay() -> Verified:
            eat = await self.nras.attest(evidence_list, nonce, device=device, arch=arch)
            return await self.verifier.verify(eat, nonce)

        return await self._run("verify", caller, node, client_ip, nonce, purpose, relay)

    async def _run(self, action, caller: Caller, node, client_ip, nonce, purpose, work) -> Verified:
        who = {"user": caller.name, "client_ip": client_ip, "node": node}
        consumed = False
        try:
            self.guard.check(caller.key, action)
            _check_node(node)
            try:
                self._authorize(caller, node)
                if not self.nonces.consume(nonce, user=caller.key, node=node, purpose=purpose):
                    raise AttestationError(Reason.NONCE_UNKNOWN, "nonce not issued for this caller and node, or used")
                consumed = True
                verified = await work()
                self._check_devices(node, verified)
            except AttestationError as e:
                if e.reason not in SERVER_SIDE:
                    self.guard.failed(caller.key)
                if consumed:
                    self.nodes.record(node, caller.name, e.reason, e.nvidia_errors)
                raise
        except AttestationError as e:
            self.audit.record(action, e.reason, **who, kid=e.kid, jti=e.jti, fingerprint=e.fingerprint, detail=e.detail)
            raise
        self.guard.succeeded(caller.key)
        self.nodes.record(node, caller.name, verified)
        self.audit.record(action, "ok", **who, kid=verified.kid, jti=verified.jti, fingerprint=verified.fingerprint)
        return verified

    def _authorize(self, caller: Caller, node: str) -> None:
        """Only the node's own identity or an admin may attest ``node``, and only once it is enrolled."""
        if not caller.may_attest(node):
            raise AttestationError(
                Reason.NOT_NODE_IDENTITY, f"only node {node}'s own credential or an admin may attest it"
            )
        if self.enrolments.get(node) is None:
            raise AttestationError(Reason.NODE_NOT_ENROLLED, f"node {node} is not enrolled: gpulab nodes enroll")

    def _check_devices(self, node: str, verified: Verified) -> None:
        try:
            self.enrolments.check_devices(node, verified)
        except AttestationError as e:
            e.kid, e.jti, e.fingerprint = verified.kid, verified.jti, verified.fingerprint
            raise


def _check_node(node: str) -> None:
    if not isinstance(node, str) or not NODE_NAME.fullmatch(node):
        raise AttestationError(Reason.MALFORMED, "node name must match [A-Za-z0-9._-]{1,253}")
