"""One object for the HTTP layer: nonces, verification, NRAS relay, node state, throttling and audit.

    service = AttestationService.from_config(load_config())
    nonce = service.issue_nonce(user="ana", node="gpu-7", client_ip="10.0.0.5")
    verified = await service.verify(eat_json, nonce=nonce.value, user="ana", node="gpu-7", client_ip="10.0.0.5")

Every call is throttled per client and audited; a refusal raises ``AttestationError`` with its reason.
The nonce is consumed before any cryptography, so it is single-use whatever the outcome, and an
unsolicited request cannot make the service fetch the JWKS.
"""

import re
import time
from collections.abc import Callable

from traitlets.config import Config

from ..events import make_engine
from .abuse import AbuseGuard
from .audit import AuditLog
from .config import Attestation
from .nonces import IssuedNonce, NonceStore
from .nras import NrasClient
from .reasons import SERVER_SIDE, AttestationError, Reason
from .state import NodeStates
from .verifier import Verified, Verifier

PURPOSE = "node-attestation"
NODE_NAME = re.compile(r"[A-Za-z0-9._-]{1,253}")


class AttestationService:
    """Attestation for GPU nodes as one service; all collaborators are injectable for tests."""

    def __init__(self, *, verifier: Verifier, nonces: NonceStore, nodes: NodeStates, guard: AbuseGuard,
                 audit: AuditLog, nras: NrasClient | None = None):
        self.verifier = verifier
        self.nonces = nonces
        self.nodes = nodes
        self.guard = guard
        self.audit = audit
        self.nras = nras

    @classmethod
    def from_config(cls, cfg: Config, *, clock: Callable[[], float] = time.time,
                    monotonic: Callable[[], float] = time.monotonic) -> "AttestationService":
        """Build from ``gpulab_config.py``; raises ``ConfigError`` on a bad URL, policy or key file."""
        s = Attestation(config=cfg)
        engine = make_engine(s.db_url)
        return cls(
            verifier=Verifier.from_settings(s, clock=clock),
            nonces=NonceStore(engine=engine, ttl=s.nonce_ttl, clock=clock),
            nodes=NodeStates(engine, clock=clock),
            guard=AbuseGuard(nonce_rate=s.nonce_rate, nonce_burst=s.nonce_burst, verify_rate=s.verify_rate,
                             verify_burst=s.verify_burst, max_failures=s.max_failures,
                             lockout_seconds=s.lockout_seconds, clock=monotonic),
            audit=AuditLog(burst=s.audit_burst, window=s.audit_window, path=s.audit_log_file, clock=monotonic),
            nras=NrasClient.from_settings(s),
        )

    def issue_nonce(self, *, user: str, node: str, client_ip: str, purpose: str = PURPOSE) -> IssuedNonce:
        """A nonce bound to (user, node, purpose); raises ``rate_limited`` / ``locked_out``."""
        who = {"user": user, "client_ip": client_ip, "node": node}
        try:
            self.guard.check(client_ip, "nonce")
            _check_node(node)
        except AttestationError as e:
            self.audit.record("nonce", e.reason, **who, detail=e.detail)
            raise
        nonce = self.nonces.issue(user=user, node=node, purpose=purpose)
        self.audit.record("nonce", "ok", **who)
        return nonce

    async def verify(self, eat: str | bytes | list, *, nonce: str, user: str, node: str, client_ip: str,
                     purpose: str = PURPOSE) -> Verified:
        """Verify a detached EAT from NRAS that answers ``nonce``; records the node's new state."""
        return await self._run("verify", user, node, client_ip, nonce, purpose,
                               lambda: self.verifier.verify(eat, nonce))

    async def attest_evidence(self, evidence_list: list[dict], *, nonce: str, user: str, node: str, client_ip: str,
                              device: str = "gpu", arch: str = "HOPPER", purpose: str = PURPOSE) -> Verified:
        """Relay a node's evidence to NRAS with the platform's API key, then verify the EAT it returns."""
        if self.nras is None:
            raise AttestationError(Reason.NRAS_UNAVAILABLE, "no NRAS client configured")

        async def relay() -> Verified:
            eat = await self.nras.attest(evidence_list, nonce, device=device, arch=arch)
            return await self.verifier.verify(eat, nonce)

        return await self._run("verify", user, node, client_ip, nonce, purpose, relay)

    async def _run(self, action, user, node, client_ip, nonce, purpose, work) -> Verified:
        who = {"user": user, "client_ip": client_ip, "node": node}
        consumed = False
        try:
            self.guard.check(client_ip, action)
            _check_node(node)
            try:
                if not self.nonces.consume(nonce, user=user, node=node, purpose=purpose):
                    raise AttestationError(Reason.NONCE_UNKNOWN, "nonce not issued for this user and node, or used")
                consumed = True
                verified = await work()
            except AttestationError as e:
                if e.reason not in SERVER_SIDE:
                    self.guard.failed(client_ip)
                if consumed:
                    self.nodes.record(node, user, e.reason)
                raise
        except AttestationError as e:
            self.audit.record(action, e.reason, **who, kid=e.kid, jti=e.jti, fingerprint=e.fingerprint,
                              detail=e.detail)
            raise
        self.guard.succeeded(client_ip)
        self.nodes.record(node, user, verified)
        self.audit.record(action, "ok", **who, kid=verified.kid, jti=verified.jti, fingerprint=verified.fingerprint)
        return verified


def _check_node(node: str) -> None:
    if not isinstance(node, str) or not NODE_NAME.fullmatch(node):
        raise AttestationError(Reason.MALFORMED, "node name must match [A-Za-z0-9._-]{1,253}")
