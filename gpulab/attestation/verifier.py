"""Strict verification of an NRAS detached EAT: ``[["JWT", overall], {"GPU-0": device_jwt, ...}]``.

Steps, in order (DESIGN.md §4); the first that fails raises ``AttestationError`` with its reason:

1. size and shape caps (``too_large``, ``malformed``);
2. every JWS header: ``alg`` exactly ES384 (``alg_not_allowed``) and a ``kid`` — before any key lookup;
3. every token (overall first): key from the JWKS cache (``unknown_kid``, ``jwks_unavailable``) and
   ES384 signature (``bad_signature``) — nothing of a payload is read before all signatures verify;
4. overall claims: ``iss`` (``wrong_issuer``), ``iat``/``nbf``/``exp`` with leeway and max age
   (``expired``, ``not_yet_valid``, ``too_old``), claims version 2.0/3.0 (``unsupported_version``),
   ``eat_nonce`` (``nonce_mismatch``), ``jti`` not seen before (``replayed_jti``);
5. ``submods`` names exactly the device tokens (``submods_mismatch``) with each one's SHA-256
   (``digest_mismatch``);
6. ``x-nvidia-overall-att-result`` is ``true`` (``overall_result_false``, with NRAS's
   ``x-nvidia-error-details`` per device): decided here, as soon as the overall token is authentic,
   bound to the nonce and pins the device tokens, because NRAS's failure verdict comes with device
   tokens in an error form (no ``eat_nonce``) that the next step would refuse as ``nonce_mismatch``,
   a reason that does not revoke the node;
7. every device token's ``iss``, time claims and ``eat_nonce`` as in 4;
8. the appraisal policy and allow-lists per device (``policy_violation``, ``device_denied``).
"""

import binascii
import functools
import hashlib
import hmac
import json
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from jwt.algorithms import ECAlgorithm

from .config import Attestation
from .jwks import JwksCache
from .policy import CLAIMS_VERSIONS, Appraiser, Policy, device_kind
from .reasons import AttestationError, Reason

ALLOWED_ALG = "ES384"
_FROM_URLSAFE = bytes.maketrans(b"-_", b"+/")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_ES384 = ECAlgorithm(ECAlgorithm.SHA384)


@dataclass(frozen=True)
class AttestedDevice:
    """What a verified device token says about one GPU (kind GPU) or NVSwitch (kind SWITCH)."""

    kind: str
    hwmodel: str | None
    driver_version: str | None
    vbios_version: str | None
    ueid: str | None
    secboot: bool | None
    dbgstat: str | None
    measres: str | None
    oemid: str | None

    @classmethod
    def from_claims(cls, name: str, claims: dict) -> "AttestedDevice":
        return cls(
            kind=device_kind(name),
            hwmodel=claims.get("hwmodel"),
            driver_version=claims.get("x-nvidia-gpu-driver-version"),
            vbios_version=claims.get("x-nvidia-gpu-vbios-version", claims.get("x-nvidia-switch-bios-version")),
            ueid=claims.get("ueid"),
            secboot=claims.get("secboot"),
            dbgstat=claims.get("dbgstat"),
            measres=claims.get("measres"),
            oemid=claims.get("oemid"),
        )


@dataclass(frozen=True)
class Verified:
    """A detached EAT that passed every check. ``fingerprint`` is the SHA-256 hex of the overall token."""

    claims_version: str
    issuer: str
    kid: str
    jti: str
    fingerprint: str
    issued_at: float
    expires_at: float
    devices: dict[str, AttestedDevice]
    verdict: bool = True

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, for API responses and stored node state."""
        return asdict(self)


@dataclass(frozen=True)
class _Jws:
    kid: str
    signing_input: bytes
    payload: str
    signature: str


class JtiCache:
    """Token ids seen in the last ``ttl`` seconds (at most ``max_size``, oldest dropped first)."""

    def __init__(self, ttl: float, max_size: int, clock: Callable[[], float]):
        self.ttl, self.max_size, self.clock = ttl, max_size, clock
        self._seen: OrderedDict[str, float] = OrderedDict()

    def add(self, jti: str) -> bool:
        """Remember ``jti``; False if it was already there (a replay)."""
        now = self.clock()
        while self._seen and next(iter(self._seen.values())) <= now:
            self._seen.popitem(last=False)
        if jti in self._seen:
            return False
        self._seen[jti] = now + self.ttl
        if len(self._seen) > self.max_size:
            self._seen.popitem(last=False)
        return True


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class Verifier:
    """Verifies detached EATs against one issuer, one JWKS and one appraisal policy."""

    def __init__(
        self,
        jwks: JwksCache,
        *,
        issuer: str,
        appraiser: Appraiser | None = None,
        leeway: float = 30.0,
        max_age: float = 600.0,
        max_eat_bytes: int = 131072,
        max_devices: int = 16,
        jti_cache_size: int = 100_000,
        clock: Callable[[], float] = time.time,
    ):
        self.jwks = jwks
        self.issuer = issuer
        self.appraiser = appraiser or Appraiser()
        self.leeway = leeway
        self.max_age = max_age
        self.max_eat_bytes = max_eat_bytes
        self.max_devices = max_devices
        self.clock = clock
        self.jtis = JtiCache(max_age + 2 * leeway, jti_cache_size, clock)

    @classmethod
    def from_settings(cls, s: Attestation, *, clock: Callable[[], float] = time.time) -> "Verifier":
        s.check()
        jwks = JwksCache(
            s.jwks_url,
            allowed_hosts=s.allowed_hosts,
            allow_insecure_localhost=s.allow_insecure_localhost,
            ttl=s.jwks_ttl,
            refresh_cooldown=s.jwks_refresh_cooldown,
            timeout=s.http_timeout,
            clock=clock,
        )
        appraiser = Appraiser(
            gpu_policy=Policy.load(s.policy_file, "Attestation.policy_file") if s.policy_file else None,
            switch_policy=(
                Policy.load(s.switch_policy_file, "Attestation.switch_policy_file") if s.switch_policy_file else None
            ),
            hwmodel_allowlist=frozenset(s.hwmodel_allowlist),
            min_driver_version=s.min_driver_version,
            min_vbios_version=s.min_vbios_version,
            ueid_denylist=frozenset(s.ueid_denylist),
        )
        return cls(
            jwks,
            issuer=s.issuer,
            appraiser=appraiser,
            leeway=s.leeway,
            max_age=s.max_age,
            max_eat_bytes=s.max_eat_bytes,
            max_devices=s.max_devices,
            jti_cache_size=s.jti_cache_size,
            clock=clock,
        )

    async def verify(self, eat: str | bytes | list, expected_nonce: str) -> Verified:
        """Verify the detached EAT ``eat`` (JSON text, or its parsed list) issued for ``expected_nonce``;
        raise ``AttestationError``."""
        overall_jwt, device_jwts = self.parse(eat)
        ids = {"fingerprint": sha256_hex(overall_jwt)}
        try:
            overall = split_jws(overall_jwt)
            ids["kid"] = overall.kid
            devices = {name: split_jws(jwt) for name, jwt in device_jwts.items()}
            for jws in (overall, *devices.values()):  # authenticate every token before reading any
                await self._check_signature(jws)
            claims = self._claims(overall)
            ids["jti"] = claims.get("jti") if isinstance(claims.get("jti"), str) else None
            version = self._check_overall(claims, expected_nonce)
            check_submods(claims.get("submods"), device_jwts)
            if claims.get("x-nvidia-overall-att-result") is not True:
                raise nras_failure(devices)
            device_claims = {name: self._claims(jws) for name, jws in devices.items()}
            for dc in device_claims.values():
                self._check_nonce(dc, expected_nonce)
            kind = device_kind(next(iter(device_jwts)))
            self.appraiser.check_overall(kind, version, claims)
            for name, dc in device_claims.items():
                self.appraiser.check_device(name, version, dc)
        except AttestationError as e:
            e.kid, e.jti, e.fingerprint = e.kid or ids.get("kid"), ids.get("jti"), ids["fingerprint"]
            raise
        return Verified(
            claims_version=version,
            issuer=claims["iss"],
            kid=ids["kid"],
            jti=ids["jti"],
            fingerprint=ids["fingerprint"],
            issued_at=claims["iat"],
            expires_at=claims["exp"],
            devices={n: AttestedDevice.from_claims(n, dc) for n, dc in device_claims.items()},
        )

    def parse(self, eat: str | bytes | list) -> tuple[str, dict[str, str]]:
        """The overall JWT and the device JWTs by name, after the size and shape checks."""
        if isinstance(eat, list):
            eat = json.dumps(eat, separators=(",", ":"))
        if not isinstance(eat, str | bytes):
            raise AttestationError(Reason.MALFORMED, "the EAT must be JSON text")
        if len(eat) > self.max_eat_bytes:
            raise AttestationError(Reason.TOO_LARGE, f"EAT larger than {self.max_eat_bytes} bytes")
        try:
            doc = json.loads(eat, parse_constant=_no_constant)
        except (ValueError, RecursionError):
            raise AttestationError(Reason.MALFORMED, "the EAT is not JSON") from None
        if not (
            isinstance(doc, list)
            and len(doc) == 2
            and isinstance(doc[0], list)
            and len(doc[0]) == 2
            and doc[0][0] == "JWT"
            and isinstance(doc[0][1], str)
            and isinstance(doc[1], dict)
        ):
            raise AttestationError(Reason.MALFORMED, 'expected [["JWT", overall], {device: jwt}]')
        devices = doc[1]
        if not devices:
            raise AttestationError(Reason.MALFORMED, "no device tokens")
        if len(devices) > self.max_devices:
            raise AttestationError(Reason.TOO_LARGE, f"more than {self.max_devices} device tokens")
        kinds = {device_kind(name) for name in devices}
        if None in kinds or len(kinds) != 1:
            raise AttestationError(Reason.MALFORMED, "device names must be all GPU-<n> or all SWITCH-<n>")
        if not all(isinstance(t, str) and t.count(".") == 2 for t in (doc[0][1], *devices.values())):
            raise AttestationError(Reason.MALFORMED, "a token is not a compact JWS")
        return doc[0][1], devices

    async def _check_signature(self, jws: _Jws) -> None:
        key = await self.jwks.get_key(jws.kid)
        if not _ES384.verify(jws.signing_input, key, _b64(jws.signature)):
            raise AttestationError(Reason.BAD_SIGNATURE, "ES384 signature does not verify")

    def _claims(self, jws: _Jws) -> dict:
        """The payload of an authenticated token, after the ``iss`` and time checks."""
        claims = _json_object(jws.payload, "payload")
        if claims.get("iss") != self.issuer:
            raise AttestationError(Reason.WRONG_ISSUER, "iss is not the configured issuer")
        self._check_times(claims)
        return claims

    def _check_overall(self, claims: dict, expected_nonce: str) -> str:
        version = claims.get("x-nvidia-ver")
        if version not in CLAIMS_VERSIONS:
            raise AttestationError(Reason.UNSUPPORTED_VERSION, f"claims version must be one of {CLAIMS_VERSIONS}")
        self._check_nonce(claims, expected_nonce)
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti or len(jti) > 128:
            raise AttestationError(Reason.MALFORMED, "jti missing")
        if not self.jtis.add(jti):
            raise AttestationError(Reason.REPLAYED_JTI, "this token was already presented")
        return version

    def _check_nonce(self, claims: dict, expected_nonce: str) -> None:
        nonce = claims.get("eat_nonce")
        if not isinstance(nonce, str) or not hmac.compare_digest(nonce.encode(), expected_nonce.encode()):
            raise AttestationError(Reason.NONCE_MISMATCH, "eat_nonce is not the expected nonce")

    def _check_times(self, claims: dict) -> None:
        times = [claims.get(c) for c in ("iat", "nbf", "exp")]
        if not all(isinstance(t, int | float) and not isinstance(t, bool) for t in times):
            raise AttestationError(Reason.MALFORMED, "iat, nbf and exp must be numbers")
        iat, nbf, exp = times
        now = self.clock()
        if now + self.leeway < nbf or now + self.leeway < iat:
            raise AttestationError(Reason.NOT_YET_VALID, "nbf or iat is in the future")
        if now - self.leeway >= exp:
            raise AttestationError(Reason.EXPIRED, "exp has passed")
        if now - iat > self.max_age + self.leeway:
            raise AttestationError(Reason.TOO_OLD, f"issued more than {self.max_age:.0f} s ago")


def check_submods(submods: Any, device_jwts: dict[str, str]) -> None:
    """``submods`` must name exactly the device tokens, each with ``["DIGEST", ["SHA-256", sha256 hex]]``."""
    if not isinstance(submods, dict) or set(submods) != set(device_jwts):
        raise AttestationError(Reason.SUBMODS_MISMATCH, "submods do not name exactly the device tokens")
    for name, entry in submods.items():
        if not (
            isinstance(entry, list)
            and len(entry) == 2
            and entry[0] == "DIGEST"
            and isinstance(entry[1], list)
            and len(entry[1]) == 2
            and entry[1][0] == "SHA-256"
            and isinstance(entry[1][1], str)
            and _HEX64.fullmatch(entry[1][1])
        ):
            raise AttestationError(Reason.MALFORMED, f'submods[{name}] is not ["DIGEST", ["SHA-256", hex]]')
        if not hmac.compare_digest(entry[1][1].encode(), sha256_hex(device_jwts[name]).encode()):
            raise AttestationError(Reason.DIGEST_MISMATCH, f"{name} does not match its submods digest")


def nras_failure(devices: dict[str, _Jws]) -> AttestationError:
    """``overall_result_false`` carrying NRAS's ``x-nvidia-error-details`` of each device token.

    The device tokens are authenticated and pinned by ``submods`` already; in NRAS's error form they
    hold only ``iss``, the time claims, ``jti`` and these details, so nothing else of them is checked.
    """
    errors = {name: _error_details(jws) for name, jws in devices.items()}
    errors = {name: e for name, e in errors.items() if e}
    said = "; ".join(f"{name}: {e.get('code', '?')} {e.get('message', '')}".strip() for name, e in errors.items())
    return AttestationError(
        Reason.OVERALL_RESULT_FALSE,
        "NRAS reports the attestation as failed" + (f" ({said})" if said else ""),
        nvidia_errors=errors or None,
    )


def _error_details(jws: _Jws) -> dict:
    """A device token's ``x-nvidia-error-details``, its scalar members only and bounded (it is stored
    and shown); empty if there are none or the payload is unreadable."""
    try:
        details = _json_object(jws.payload, "payload").get("x-nvidia-error-details")
    except AttestationError:
        return {}
    if not isinstance(details, dict):
        return {}
    scalars = [
        (str(k)[:64], v[:256] if isinstance(v, str) else v)
        for k, v in details.items()
        if v is None or isinstance(v, str | int | float | bool)
    ]
    return dict(scalars[:8])


def split_jws(token: str) -> _Jws:
    """A compact JWS's ``kid`` (header: ``alg`` ES384 and ``kid`` required, no ``crit``) and its parts."""
    header_b64, payload, signature = token.split(".")
    return _Jws(_header_kid(header_b64), f"{header_b64}.{payload}".encode(), payload, signature)


@functools.lru_cache(maxsize=256)
def _header_kid(header_b64: str) -> str:
    """The ``kid`` of a valid header; cached, as NRAS uses one header for all tokens of a day."""
    header = _json_object(header_b64, "header")
    if header.get("alg") != ALLOWED_ALG:
        raise AttestationError(Reason.ALG_NOT_ALLOWED, f"alg must be {ALLOWED_ALG}")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid or len(kid) > 256:
        raise AttestationError(Reason.MALFORMED, "header has no kid")
    if "crit" in header:
        raise AttestationError(Reason.MALFORMED, "critical header extensions are not supported")
    return kid


def _b64(segment: str) -> bytes:
    """Strict base64url (RFC 7515: no padding, nothing outside the alphabet)."""
    try:
        data = segment.encode("ascii")
        if b"+" in data or b"/" in data or b"=" in data:
            raise ValueError("not base64url")
        return binascii.a2b_base64(data.translate(_FROM_URLSAFE) + b"=" * (-len(data) % 4), strict_mode=True)
    except (binascii.Error, ValueError):
        raise AttestationError(Reason.MALFORMED, "bad base64url") from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _json_object(segment: str, what: str) -> dict:
    try:
        value = json.loads(_b64(segment).decode(), parse_constant=_no_constant)
    except (ValueError, RecursionError):
        raise AttestationError(Reason.MALFORMED, f"JWS {what} is not JSON") from None
    if not isinstance(value, dict):
        raise AttestationError(Reason.MALFORMED, f"JWS {what} is not a JSON object")
    return value
