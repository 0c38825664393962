"""Test doubles for NVIDIA attestation: an NRAS-like signing key, a JWKS server and an EAT minter.

- ``NrasKey``: an EC P-384 key with a self-signed certificate and a ``kid``, as NRAS publishes them.
- ``JwksServer``: serves ``/.well-known/jwks.json`` on 127.0.0.1 from a thread; counts requests and
  can be told to answer 500.
- ``EatMinter``: detached EATs shaped exactly like NRAS's (claims templates are NVIDIA's own
  samples in ``/work/shared/attestation-samples/``), with correct ``submods`` digests; every claim,
  header and key can be overridden to build the negative cases. ``failure=`` mints NRAS's own
  failure verdict as NRAS sends it: the overall token with ``x-nvidia-overall-att-result: false``
  and each device token in NRAS's error form (``iss``, ``nbf``, ``exp``, ``iat``, ``jti`` and
  ``x-nvidia-error-details`` only, no ``eat_nonce``). Each minter gives device ``GPU-<n>`` one
  UEID of its own, the same in every token, as a real node's GPUs do.
"""

import base64
import copy
import datetime as dt
import hashlib
import hmac
import json
import threading
import time
import uuid
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from jwt.algorithms import ECAlgorithm

SAMPLES = Path("/work/shared/attestation-samples")
ISSUER = "https://nras.attestation.nvidia.com"
NONCE_NOT_MATCHING = {"code": 4010, "message": "NONCE_NOT_MATCHING", "http_status": "400"}


def sample(name: str):
    return json.loads((SAMPLES / name).read_text())


GPU_TEMPLATE = sample("hopperClaimsv3_decoded.json")["GPU-0"]
SWITCH_TEMPLATE = sample("switch_decoded.json")["SWITCH-0"]
OVERALL_TEMPLATE = jwt.decode(sample("hopperClaimsv3_detached_eat.json")[0][1], options={"verify_signature": False})
# Claims 2.0 (NVIDIA's published remote sample): flat booleans instead of cert-chain objects.
GPU_TEMPLATE_V2 = {
    k: v
    for k, v in GPU_TEMPLATE.items()
    if not k.endswith("-cert-chain")
    and k
    not in (
        "x-nvidia-gpu-attestation-report-cert-chain-fwid-match",
        "x-nvidia-gpu-driver-rim-version-match",
        "x-nvidia-gpu-vbios-rim-version-match",
    )
}
GPU_TEMPLATE_V2.update(
    {
        f"x-nvidia-gpu-{c}": True
        for c in ("attestation-report-cert-chain-validated", "driver-rim-cert-validated", "vbios-rim-cert-validated")
    }
)


class NrasKey:
    """A P-384 signing key, its self-signed certificate and ``kid``."""

    def __init__(self, kid: str | None = None):
        self.kid = kid or f"nv-eat-kid-test-{uuid.uuid4()}"
        self.private = ec.generate_private_key(ec.SECP384R1())
        self.public = self.private.public_key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gpulab test NRAS signer")])
        now = dt.datetime.now(dt.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=2))
            .sign(self.private, hashes.SHA384())
        )
        self.pem = self.public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def jwk(self) -> dict:
        jwk = ECAlgorithm.to_jwk(self.public, as_dict=True)
        der = self.cert.public_bytes(serialization.Encoding.DER)
        return {**jwk, "kid": self.kid, "use": "sig", "alg": "ES384", "x5c": [base64.b64encode(der).decode()]}


class JwksServer:
    """``GET /.well-known/jwks.json`` on 127.0.0.1 in a thread. ``requests`` counts hits; set ``fail``
    to answer 500; change ``keys`` to rotate."""

    def __init__(self, keys: list[NrasKey]):
        self.keys = list(keys)
        self.fail = False
        self.requests = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests += 1
                if server.fail or self.path != "/.well-known/jwks.json":
                    self.send_response(500 if server.fail else 404)
                    self.end_headers()
                    return
                body = json.dumps({"keys": [k.jwk() for k in server.keys]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/.well-known/jwks.json"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def sign(claims: dict, key: NrasKey, *, alg: str = "ES384", kid: str | None = None, header: dict | None = None) -> str:
    """A compact JWS over ``claims``; ``alg``/``kid``/``header`` override NRAS's ``{"kid", "alg"}`` header
    (a ``None`` header value drops that parameter). ``HS*`` signs with the public key as HMAC secret
    (the key-confusion attack), ``none`` leaves the signature empty."""
    head = {k: v for k, v in {"kid": kid or key.kid, "alg": alg, **(header or {})}.items() if v is not None}
    signing_input = f"{_b64json(head)}.{_b64json(claims)}"
    if alg == "none":
        signature = b""
    elif alg.startswith("HS"):
        signature = hmac.new(key.pem, signing_input.encode(), getattr(hashlib, f"sha{alg[2:]}")).digest()
    else:
        signature = ECAlgorithm(getattr(ECAlgorithm, f"SHA{alg[2:]}")).sign(signing_input.encode(), key.private)
    return f"{signing_input}.{base64.urlsafe_b64encode(signature).rstrip(b'=').decode()}"


def _b64json(obj) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def digest(token: str) -> list:
    return ["DIGEST", ["SHA-256", hashlib.sha256(token.encode()).hexdigest()]]


class EatMinter:
    """Mints NRAS-shaped detached EATs signed by ``key`` at time ``now()``."""

    def __init__(self, key: NrasKey, clock, issuer: str = ISSUER):
        self.key = key
        self.clock = clock
        self.issuer = issuer
        self.ueids: dict[str, str] = {}

    def ueid(self, name: str) -> str:
        """Device ``name``'s UEID: random per minter, stable across its tokens."""
        return self.ueids.setdefault(name, str(uuid.uuid4().int))

    def error_claims(self, details: dict) -> dict:
        """A device token's claims in NRAS's error form: no nonce, no measurements, only NVIDIA's error."""
        now = int(self.clock())
        return {
            "iss": self.issuer,
            "nbf": now,
            "exp": now + 3600,
            "iat": now,
            "jti": str(uuid.uuid4()),
            "x-nvidia-error-details": details,
        }

    def device_claims(self, name: str, nonce: str, version: str = "3.0") -> dict:
        template = (
            SWITCH_TEMPLATE if name.startswith("SWITCH") else GPU_TEMPLATE if version == "3.0" else GPU_TEMPLATE_V2
        )
        now = int(self.clock())
        return {
            **copy.deepcopy(template),
            "iss": self.issuer,
            "eat_nonce": nonce,
            "iat": now,
            "nbf": now,
            "exp": now + 3600,
            "jti": str(uuid.uuid4()),
            "ueid": self.ueid(name),
        }

    def overall_claims(self, nonce: str, device_tokens: dict[str, str], version: str = "3.0") -> dict:
        now = int(self.clock())
        return {
            **OVERALL_TEMPLATE,
            "x-nvidia-ver": version,
            "iss": self.issuer,
            "eat_nonce": nonce,
            "iat": now,
            "nbf": now,
            "exp": now + 3600,
            "jti": str(uuid.uuid4()),
            "submods": {name: digest(tok) for name, tok in device_tokens.items()},
        }

    def mint(
        self,
        nonce: str,
        *,
        names=("GPU-0",),
        version: str = "3.0",
        overall: dict | None = None,
        device: dict | None = None,
        overall_sign: dict | None = None,
        device_sign: dict | None = None,
        tokens=None,
        failure: dict | None = None,
    ) -> str:
        """The detached EAT as NRAS returns it (JSON text).

        ``overall``/``device`` override claims (None values delete them); ``overall_sign``/``device_sign``
        pass ``alg``/``kid``/``header``/``key`` to :func:`sign`; ``tokens(genuine)`` returns the device
        map to send instead of the one ``submods`` was computed from; ``failure`` (NVIDIA's error
        details, e.g. ``NONCE_NOT_MATCHING``) makes it NRAS's failure verdict.
        """
        dev_sign = dict(device_sign or {})
        dev_key = dev_sign.pop("key", self.key)
        genuine = {
            n: sign(
                _apply(self.error_claims(failure) if failure else self.device_claims(n, nonce, version), device),
                dev_key,
                **dev_sign,
            )
            for n in names
        }
        claims = _apply(self.overall_claims(nonce, genuine, version), overall)
        if failure:
            claims["x-nvidia-overall-att-result"] = False
        ov_sign = dict(overall_sign or {})
        overall_jwt = sign(claims, ov_sign.pop("key", self.key), **ov_sign)
        return json.dumps([["JWT", overall_jwt], tokens(genuine) if tokens else genuine])


def _apply(claims: dict, changes: dict | None) -> dict:
    for name, value in (changes or {}).items():
        if value is None:
            claims.pop(name, None)
        else:
            claims[name] = value
    return claims


@contextmanager
def served_minter():
    """An :class:`EatMinter` on the real clock whose signing key is served by a :class:`JwksServer`."""
    key = NrasKey()
    jwks = JwksServer([key])
    minter = EatMinter(key, time.time)
    minter.jwks_url = jwks.url
    try:
        yield minter
    finally:
        jwks.close()


def attestation_hub_config(work: Path, minter: EatMinter, key_file: Path, node: str, max_failures: int) -> str:
    """gpulab_config.py lines for a hub whose gpulab-jobs verifies ``minter``'s tokens for the local
    node ``node``, with the NRAS key in ``key_file``, members of group "ml" as users, and fast,
    generous rate limits. Jobs log to MLflow in ``work/mlflow/mlflow.sqlite``: a folder every job's
    account may create files in (sticky, like /tmp), as each user's jobs run as their own account."""
    mlflow_dir = work / "mlflow"
    mlflow_dir.mkdir(exist_ok=True)
    mlflow_dir.chmod(0o1777)
    return f"""
c.Platform.mlflow_service = False
c.Roles.everyone = []
c.Roles.group_roles = {{"ml": ["gpulab-user"]}}
c.JobQueue.tick_interval = 0.2
c.JobQueue.mlflow_tracking_uri = "sqlite:///{mlflow_dir / "mlflow.sqlite"}"
c.LocalExecutor.node_name = "{node}"
c.Attestation.jwks_url = "{minter.jwks_url}"
c.Attestation.allow_insecure_localhost = True
c.Attestation.api_key_file = "{key_file}"
c.Attestation.nonce_rate = c.Attestation.verify_rate = 10.0
c.Attestation.nonce_burst = c.Attestation.verify_burst = 50
c.Attestation.max_failures = {max_failures}
"""
