"""Stable reason codes for every attestation rejection, and the error that carries one."""

from enum import StrEnum


class Reason(StrEnum):
    """Why an attestation request was refused; the value is the stable code clients and audits see."""

    TOO_LARGE = "too_large"
    MALFORMED = "malformed"
    ALG_NOT_ALLOWED = "alg_not_allowed"
    UNKNOWN_KID = "unknown_kid"
    JWKS_UNAVAILABLE = "jwks_unavailable"
    BAD_SIGNATURE = "bad_signature"
    WRONG_ISSUER = "wrong_issuer"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    TOO_OLD = "too_old"
    UNSUPPORTED_VERSION = "unsupported_version"
    NONCE_MISMATCH = "nonce_mismatch"
    NONCE_UNKNOWN = "nonce_unknown"
    REPLAYED_JTI = "replayed_jti"
    SUBMODS_MISMATCH = "submods_mismatch"
    DIGEST_MISMATCH = "digest_mismatch"
    OVERALL_RESULT_FALSE = "overall_result_false"
    POLICY_VIOLATION = "policy_violation"
    DEVICE_DENIED = "device_denied"
    DEVICE_MISMATCH = "device_mismatch"
    NOT_NODE_IDENTITY = "not_node_identity"
    NODE_NOT_ENROLLED = "node_not_enrolled"
    NRAS_UNAVAILABLE = "nras_unavailable"
    NRAS_REJECTED = "nras_rejected"
    RATE_LIMITED = "rate_limited"
    LOCKED_OUT = "locked_out"


#: Outcomes caused by the platform or its dependencies, not by the client: no lockout strike.
SERVER_SIDE = frozenset({Reason.JWKS_UNAVAILABLE, Reason.NRAS_UNAVAILABLE})


def http_status(reason: Reason) -> int:
    """The HTTP status for a refusal: 429 throttled, 503 dependency down, 413 too large,
    502 NRAS refused the evidence, 403 the caller may not attest the node, 404 the node is not
    enrolled, else 422 (the request was understood and the token refused)."""
    if reason in (Reason.RATE_LIMITED, Reason.LOCKED_OUT):
        return 429
    if reason in SERVER_SIDE:
        return 503
    return {
        Reason.TOO_LARGE: 413,
        Reason.NRAS_REJECTED: 502,
        Reason.NOT_NODE_IDENTITY: 403,
        Reason.NODE_NOT_ENROLLED: 404,
    }.get(reason, 422)


class AttestationError(Exception):
    """A refused attestation. ``detail`` is safe to log and return: it never holds a token or key.

    ``kid``, ``jti`` and ``fingerprint`` (SHA-256 hex of the overall token) are set once known.
    ``retry_after`` (s) is set for ``rate_limited`` and ``locked_out``. ``nvidia_errors`` holds, for
    ``overall_result_false``, NRAS's own ``x-nvidia-error-details`` per device (``{"GPU-0": {"code":
    4010, "message": "NONCE_NOT_MATCHING"}}``): why NVIDIA failed the node, for the API and node state.
    """

    def __init__(
        self,
        reason: Reason,
        detail: str = "",
        *,
        kid: str | None = None,
        jti: str | None = None,
        fingerprint: str | None = None,
        retry_after: float | None = None,
        nvidia_errors: dict | None = None,
    ):
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)
        self.reason = reason
        self.detail = detail
        self.kid = kid
        self.jti = jti
        self.fingerprint = fingerprint
        self.retry_after = retry_after
        self.nvidia_errors = nvidia_errors
