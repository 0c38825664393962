"""NRAS signing keys: a JWKS fetched from one configured URL, cached, refreshed sparingly, failing closed.

- A fetched JWKS is trusted for ``ttl`` seconds; after that the next lookup fetches it again.
- An unknown ``kid`` forces at most one refresh per ``refresh_cooldown`` seconds (keys rotate daily,
  so a new ``kid`` is normal; a flood of random ``kid`` values must not become a flood of fetches).
- A failed fetch (network, 5xx, open circuit, bad JSON) raises ``jwks_unavailable``; keys past
  their TTL are never used.
- Only EC P-384 keys are kept; a key with an ``x5c`` certificate must match it and be within its validity.
"""

import asyncio
import base64
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm
from jwt.exceptions import InvalidKeyError
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from ..resilience import CircuitBreaker, CircuitOpenError
from .config import check_url
from .reasons import AttestationError, Reason

MAX_JWKS_BYTES = 256 * 1024
MAX_KEYS = 64


class JwksCache:
    """ES384 public keys by ``kid`` from ``url``. ``fetches`` counts HTTP requests made (tests, bench)."""

    def __init__(
        self,
        url: str,
        *,
        allowed_hosts: set[str],
        allow_insecure_localhost: bool = False,
        ttl: float = 900.0,
        refresh_cooldown: float = 30.0,
        timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
        breaker: CircuitBreaker | None = None,
    ):
        self.url = check_url(url, allowed_hosts, allow_insecure_localhost, "Attestation.jwks_url")
        self.ttl = ttl
        self.refresh_cooldown = refresh_cooldown
        self.timeout = timeout
        self.clock = clock
        self.breaker = breaker or CircuitBreaker(
            f"NRAS JWKS at {url}", failure_threshold=3, recovery_timeout=30, clock=clock
        )
        self.fetches = 0
        self._keys: dict[str, ec.EllipticCurvePublicKey] = {}
        self._fetched_at: float | None = None
        self._last_attempt = float("-inf")
        self._lock = asyncio.Lock()

    async def get_key(self, kid: str) -> ec.EllipticCurvePublicKey:
        """The key for ``kid``; raises ``AttestationError`` (``unknown_kid`` or ``jwks_unavailable``)."""
        if not self._fresh():
            async with self._lock:
                if not self._fresh():
                    await self._refresh()
        key = self._keys.get(kid)
        if key is None:
            async with self._lock:
                key = self._keys.get(kid)
                if key is None and self.clock() - self._last_attempt >= self.refresh_cooldown:
                    await self._refresh()
                    key = self._keys.get(kid)
        if key is None:
            raise AttestationError(Reason.UNKNOWN_KID, "no NRAS key with this kid", kid=kid)
        return key

    def _fresh(self) -> bool:
        return self._fetched_at is not None and self.clock() - self._fetched_at < self.ttl

    async def _refresh(self) -> None:
        self._last_attempt = self.clock()
        try:
            body = await self.breaker.call(self._fetch)
            keys = parse_jwks(body, self.clock())
        except CircuitOpenError as e:
            raise AttestationError(Reason.JWKS_UNAVAILABLE, str(e)) from None
        except (HTTPClientError, OSError, TimeoutError, ValueError, TypeError) as e:  # all fail closed
            raise AttestationError(Reason.JWKS_UNAVAILABLE, f"fetching the JWKS failed: {type(e).__name__}") from None
        self._keys, self._fetched_at = keys, self.clock()

    async def _fetch(self) -> bytes:
        self.fetches += 1
        request = HTTPRequest(
            self.url,
            method="GET",
            headers={"Accept": "application/json"},
            follow_redirects=False,
            request_timeout=self.timeout,
            validate_cert=True,
        )
        response = await AsyncHTTPClient().fetch(request)
        if len(response.body) > MAX_JWKS_BYTES:
            raise ValueError("JWKS too large")
        return response.body


def parse_jwks(body: bytes, now: float) -> dict[str, ec.EllipticCurvePublicKey]:
    """``kid`` -> key for every usable EC P-384 signing key in a JWKS document; others are skipped."""
    doc = json.loads(body)
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise TypeError("not a JWKS")
    keys = {}
    for jwk in doc["keys"][:MAX_KEYS]:
        key = _load_key(jwk, now)
        if key is not None:
            keys[jwk["kid"]] = key
    return keys


def _load_key(jwk: object, now: float) -> ec.EllipticCurvePublicKey | None:
    """The key of one usable JWK (EC P-384 ES384 signing key with a ``kid``), else None."""
    if not (
        isinstance(jwk, dict)
        and jwk.get("kty") == "EC"
        and jwk.get("crv") == "P-384"
        and isinstance(jwk.get("kid"), str)
        and jwk.get("use", "sig") == "sig"
        and jwk.get("alg", "ES384") == "ES384"
    ):
        return None
    try:
        key = ECAlgorithm.from_jwk(jwk)
        if isinstance(key, ec.EllipticCurvePublicKey) and _x5c_matches(jwk, key, now):
            return key
    except (InvalidKeyError, ValueError, TypeError, KeyError, IndexError):
        pass
    return None


def _x5c_matches(jwk: dict, key: ec.EllipticCurvePublicKey, now: float) -> bool:
    """True without ``x5c``; else the leaf certificate holds ``key`` and is valid at ``now``."""
    chain = jwk.get("x5c")
    if chain is None:
        return True
    cert = x509.load_der_x509_certificate(base64.b64decode(chain[0], validate=True))
    at = datetime.fromtimestamp(now, UTC)
    return (
        cert.public_key().public_numbers() == key.public_numbers()
        and cert.not_valid_before_utc <= at <= cert.not_valid_after_utc
    )
