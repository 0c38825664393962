"""The NRAS API key and the client that posts GPU/NVSwitch evidence to NRAS for a detached EAT.

The key comes from a 0600 file (``Attestation.api_key_file``) or ``$GPULAB_NRAS_API_KEY``; the
variable is removed from ``os.environ`` either way, so no child process (kernel) inherits it. It is
held as a ``Secret`` and sent only as ``Authorization: Bearer`` to the configured, allow-listed NRAS
URL, without following redirects. Request shape (NRAS v4, as NVIDIA's SDKs send it)::

    POST <nras_url>/v4/attest/gpu      (or /v4/attest/switch)
    {"nonce": "<64 hex>", "arch": "HOPPER", "claims_version": "3.0",
     "evidence_list": [{"evidence": "<base64>", "certificate": "<base64>"}, ...]}

The answer is the detached EAT, which must then go through ``Verifier.verify`` like any other.
"""

import json
import os

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from ..resilience import CircuitBreaker, CircuitOpenError
from ..secrets import Secret, secret_from
from .config import Attestation, check_url
from .reasons import AttestationError, Reason

ENV_VAR = "GPULAB_NRAS_API_KEY"
DEVICES = ("gpu", "switch")
ARCHES = ("HOPPER", "BLACKWELL", "LS10")
MAX_RESPONSE_BYTES = 1024 * 1024


def load_api_key(settings: Attestation) -> Secret | None:
    """The NRAS API key (None if not configured); ``$GPULAB_NRAS_API_KEY`` is always removed.

    Raises ``ConfigError`` (one line) if ``api_key_file`` is group/world-readable, missing or empty.
    """
    from_env = os.environ.pop(ENV_VAR, "")
    if settings.api_key_file:
        return secret_from(settings.api_key_file, ENV_VAR, "Attestation.api_key_file")
    return Secret(from_env, source=f"${ENV_VAR}") if from_env else None


class NrasClient:
    """Posts evidence to NRAS; ``requests`` counts calls made."""

    def __init__(
        self,
        base_url: str,
        api_key: Secret | None,
        *,
        allowed_hosts: set[str],
        allow_insecure_localhost: bool = False,
        timeout: float = 30.0,
        breaker: CircuitBreaker | None = None,
    ):
        self.base_url = check_url(base_url, allowed_hosts, allow_insecure_localhost, "Attestation.nras_url")
        self.base_url = self.base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self.breaker = breaker or CircuitBreaker(f"NRAS at {self.base_url}", failure_threshold=3, recovery_timeout=60)
        self.requests = 0

    @classmethod
    def from_settings(cls, s: Attestation) -> "NrasClient":
        return cls(
            s.nras_url,
            load_api_key(s),
            allowed_hosts=s.allowed_hosts,
            allow_insecure_localhost=s.allow_insecure_localhost,
            timeout=3 * s.http_timeout,
        )

    def __repr__(self) -> str:
        return f"NrasClient({self.base_url!r}, api_key={self.api_key!r})"

    async def attest(
        self,
        evidence_list: list[dict],
        nonce: str,
        *,
        device: str = "gpu",
        arch: str = "HOPPER",
        claims_version: str = "3.0",
    ) -> str:
        """The detached EAT (JSON text) NRAS returns for ``evidence_list``; raises ``AttestationError``
        (``nras_unavailable`` on outage, ``nras_rejected`` when NRAS answers 4xx, ``malformed`` input)."""
        if (
            device not in DEVICES
            or arch not in ARCHES
            or not evidence_list
            or not all(
                isinstance(e, dict) and isinstance(e.get("evidence"), str) and isinstance(e.get("certificate"), str)
                for e in evidence_list
            )
        ):
            raise AttestationError(Reason.MALFORMED, "evidence must be [{'evidence': b64, 'certificate': b64}]")
        body = {
            "nonce": nonce,
            "arch": arch,
            "claims_version": claims_version,
            "evidence_list": [{"evidence": e["evidence"], "certificate": e["certificate"]} for e in evidence_list],
        }
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key.reveal()}"
        request = HTTPRequest(
            f"{self.base_url}/v4/attest/{device}",
            method="POST",
            headers=headers,
            body=json.dumps(body),
            follow_redirects=False,
            request_timeout=self.timeout,
            validate_cert=True,
        )
        try:
            response = await self.breaker.call(self._send, request)
        except CircuitOpenError as e:
            raise AttestationError(Reason.NRAS_UNAVAILABLE, str(e)) from None
        except HTTPClientError as e:
            if 400 <= e.code < 500:
                raise AttestationError(Reason.NRAS_REJECTED, f"NRAS answered {e.code}") from None
            raise AttestationError(Reason.NRAS_UNAVAILABLE, f"NRAS answered {e.code}") from None
        except OSError as e:
            raise AttestationError(Reason.NRAS_UNAVAILABLE, f"NRAS unreachable: {type(e).__name__}") from None
        if len(response.body) > MAX_RESPONSE_BYTES:
            raise AttestationError(Reason.TOO_LARGE, "NRAS answer too large")
        return response.body.decode()

    async def _send(self, request: HTTPRequest):
        self.requests += 1
        return await AsyncHTTPClient().fetch(request)
