"""gpulab's NRAS token verifier, nonces, node state, throttling, audit trail and API-key handling.

Tokens are minted by tests/support/attestation.py with our own P-384 keys from NVIDIA's real claim
templates; NVIDIA's published sample EATs are checked for shape, digests and policy (their
signatures need NVIDIA's JWKS, which is not reachable here). Cases marked "SDK accepts" are ones
NVIDIA's own Python SDK lets through.
"""

import base64
import json
import logging
import os
import secrets
import stat
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client import REGISTRY
from tornado.httpserver import HTTPServer
from tornado.web import Application, RequestHandler
from traitlets.config import Config

from gpulab.attestation import (
    Attestation,
    AttestationError,
    AttestationService,
    Caller,
    Enrolments,
    NonceStore,
    Reason,
    Verifier,
)
from gpulab.attestation.abuse import AbuseGuard
from gpulab.attestation.audit import LOGGER_NAME, AuditLog
from gpulab.attestation.config import check_url
from gpulab.attestation.jwks import JwksCache, parse_jwks
from gpulab.attestation.nonces import open_database
from gpulab.attestation.nras import ENV_VAR, NrasClient, load_api_key
from gpulab.attestation.policy import Appraiser, Policy
from gpulab.attestation.reasons import http_status
from gpulab.attestation.state import NodeStates
from gpulab.attestation.verifier import check_submods, sha256_hex, split_jws
from gpulab.config import effective_config
from gpulab.errors import ConfigError
from gpulab.net import free_port
from gpulab.secrets import Secret
from tests.support.attestation import (
    GPU_TEMPLATE,
    NONCE_NOT_MATCHING,
    SWITCH_TEMPLATE,
    EatMinter,
    JwksServer,
    NrasKey,
    sample,
)

DENIED_UEID = "123456789"
HOPPER = "GH100 A01 GSP BROM"  # hwmodel in NVIDIA's published NRAS tokens (the minter's template)
HOPPER_CHIP = "GH100"  # what the allow-list names: admits both "GH100 A01 GSP BROM" and a bare "GH100"
SWITCH = "LS_10 A01 FSP BROM"


class Clock:
    """Wall clock for tokens and caches, moved by hand."""

    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock():
    return Clock(float(int(time.time())))


@pytest.fixture
def key():
    return NrasKey()


@pytest.fixture
def other_key():
    return NrasKey()


@pytest.fixture
def jwks_server(key):
    server = JwksServer([key])
    yield server
    server.close()


def settings(jwks_url: str, **extra) -> Attestation:
    return Attestation(
        config=Config(
            {
                "Attestation": {
                    "jwks_url": jwks_url,
                    "allow_insecure_localhost": True,
                    "leeway": 30,
                    "max_age": 600,
                    "hwmodel_allowlist": [HOPPER_CHIP, SWITCH],
                    "min_driver_version": "550.54.14",
                    "min_vbios_version": "96.00.74.00.01",
                    "ueid_denylist": [DENIED_UEID],
                    **extra,
                }
            }
        )
    )


@pytest.fixture
def verifier(jwks_server, clock):
    return Verifier.from_settings(settings(jwks_server.url), clock=clock)


@pytest.fixture
def minter(key, clock):
    return EatMinter(key, clock)


@pytest.fixture
def nonce():
    return secrets.token_hex(32)


# --- positive cases --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "names, version",
    [
        (("GPU-0",), "3.0"),
        (tuple(f"GPU-{i}" for i in range(8)), "3.0"),
        (("GPU-0",), "2.0"),
        (tuple(f"SWITCH-{i}" for i in range(4)), "3.0"),
    ],
    ids=["1-gpu-claims-3.0", "8-gpu", "claims-2.0", "4-nvswitch"],
)
async def test_valid_eat_is_verified(verifier, minter, nonce, names, version):
    eat = minter.mint(nonce, names=names, version=version)
    result = await verifier.verify(eat, nonce)
    overall = json.loads(eat)[0][1]
    assert result.verdict is True and result.claims_version == version
    assert result.fingerprint == sha256_hex(overall) and result.kid == minter.key.kid
    assert result.jti == json.loads(base64.urlsafe_b64decode(overall.split(".")[1] + "=="))["jti"]
    assert set(result.devices) == set(names)
    device = result.devices[names[0]]
    assert device.secboot is True and device.dbgstat == "disabled" and device.measres == "success"
    if names[0].startswith("GPU"):
        assert (device.kind, device.hwmodel, device.driver_version, device.vbios_version) == (
            "GPU",
            HOPPER,
            "550.90.07",
            "96.00.9F.00.01",
        )
    else:
        assert (device.kind, device.hwmodel, device.vbios_version) == ("SWITCH", SWITCH, "96.10.55.00.01")
    assert json.loads(json.dumps(result.as_dict()))["devices"][names[0]]["ueid"] == device.ueid


# --- one negative per reason code --------------------------------------------------------------------


def _tamper_payload(eat: str) -> str:
    """Change a claim of the overall token but keep NRAS's signature (a forged token)."""
    doc = json.loads(eat)
    head, payload, sig = doc[0][1].split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["x-nvidia-overall-att-result"] = True
    claims["jti"] = "forged"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    doc[0][1] = f"{head}.{forged}.{sig}"
    return json.dumps(doc)


def _now(m):
    return int(m.clock())


OTHER_NONCE = "ab" * 32
CASES = [
    # (id, reason, build(minter, nonce, other_key) -> EAT text)
    ("too-large", Reason.TOO_LARGE, lambda m, n, o: json.dumps([["JWT", "a.b.c"], {"GPU-0": "x" * 200_000}])),
    ("too-many-devices", Reason.TOO_LARGE, lambda m, n, o: m.mint(n, names=[f"GPU-{i}" for i in range(17)])),
    ("not-json", Reason.MALFORMED, lambda m, n, o: "eyJhbGciOiJFUzM4NCJ9.e30.sig"),
    ("not-detached-eat", Reason.MALFORMED, lambda m, n, o: json.dumps({"JWT": m.mint(n)})),
    ("empty-detached-dict [SDK accepts]", Reason.MALFORMED, lambda m, n, o: m.mint(n, tokens=lambda g: {})),
    ("unknown-device-name", Reason.MALFORMED, lambda m, n, o: m.mint(n, names=("CPU-0",))),
    ("mixed-gpu-and-switch", Reason.MALFORMED, lambda m, n, o: m.mint(n, names=("GPU-0", "SWITCH-0"))),
    ("no-kid", Reason.MALFORMED, lambda m, n, o: m.mint(n, overall_sign={"header": {"kid": None}})),
    ("crit-header", Reason.MALFORMED, lambda m, n, o: m.mint(n, overall_sign={"header": {"crit": ["x"], "x": 1}})),
    ("missing-exp", Reason.MALFORMED, lambda m, n, o: m.mint(n, overall={"exp": None})),
    ("non-finite-exp", Reason.MALFORMED, lambda m, n, o: m.mint(n, overall={"exp": float("inf")})),
    ("missing-jti", Reason.MALFORMED, lambda m, n, o: m.mint(n, overall={"jti": None})),
    (
        "bad-submods-entry",
        Reason.MALFORMED,
        lambda m, n, o: m.mint(n, overall={"submods": {"GPU-0": ["DIGEST", ["SHA-1", "ab" * 10]]}}),
    ),
    (
        "alg-HS256-key-confusion [SDK catches]",
        Reason.ALG_NOT_ALLOWED,
        lambda m, n, o: m.mint(n, overall_sign={"alg": "HS256"}),
    ),
    ("alg-none [SDK catches]", Reason.ALG_NOT_ALLOWED, lambda m, n, o: m.mint(n, overall_sign={"alg": "none"})),
    ("alg-HS384-device", Reason.ALG_NOT_ALLOWED, lambda m, n, o: m.mint(n, device_sign={"alg": "HS384"})),
    (
        "unknown-kid [SDK catches]",
        Reason.UNKNOWN_KID,
        lambda m, n, o: m.mint(n, overall_sign={"kid": "nv-eat-kid-prod-unknown"}),
    ),
    (
        "foreign-key [SDK catches]",
        Reason.BAD_SIGNATURE,
        lambda m, n, o: m.mint(n, overall_sign={"key": o, "kid": m.key.kid}),
    ),
    (
        "forged-device-signature [SDK accepts]",
        Reason.BAD_SIGNATURE,
        lambda m, n, o: m.mint(n, device_sign={"key": o, "kid": m.key.kid}),
    ),
    ("tampered-payload", Reason.BAD_SIGNATURE, lambda m, n, o: _tamper_payload(m.mint(n))),
    (
        "wrong-iss [SDK accepts]",
        Reason.WRONG_ISSUER,
        lambda m, n, o: m.mint(n, overall={"iss": "https://nras.attestation-stg.nvidia.com"}),
    ),
    ("wrong-iss-device", Reason.WRONG_ISSUER, lambda m, n, o: m.mint(n, device={"iss": "https://evil.example"})),
    (
        "expired [SDK catches]",
        Reason.EXPIRED,
        lambda m, n, o: m.mint(n, overall={"iat": _now(m) - 7200, "nbf": _now(m) - 7200, "exp": _now(m) - 3600}),
    ),
    ("future-nbf [SDK accepts]", Reason.NOT_YET_VALID, lambda m, n, o: m.mint(n, overall={"nbf": _now(m) + 3600})),
    ("future-iat-device", Reason.NOT_YET_VALID, lambda m, n, o: m.mint(n, device={"iat": _now(m) + 3600})),
    ("too-old", Reason.TOO_OLD, lambda m, n, o: m.mint(n, overall={"iat": _now(m) - 1000, "nbf": _now(m) - 1000})),
    ("claims-version-1.0", Reason.UNSUPPORTED_VERSION, lambda m, n, o: m.mint(n, overall={"x-nvidia-ver": "1.0"})),
    ("wrong-nonce [SDK accepts]", Reason.NONCE_MISMATCH, lambda m, n, o: m.mint(OTHER_NONCE)),
    (
        "wrong-nonce-in-device-token",
        Reason.NONCE_MISMATCH,
        lambda m, n, o: m.mint(n, device={"eat_nonce": OTHER_NONCE}),
    ),
    ("no-nonce", Reason.NONCE_MISMATCH, lambda m, n, o: m.mint(n, overall={"eat_nonce": None})),
    (
        "extra-device-not-in-submods [SDK accepts]",
        Reason.SUBMODS_MISMATCH,
        lambda m, n, o: m.mint(n, tokens=lambda g: {**g, "GPU-1": g["GPU-0"]}),
    ),
    (
        "device-missing-from-eat",
        Reason.SUBMODS_MISMATCH,
        lambda m, n, o: m.mint(n, names=("GPU-0", "GPU-1"), tokens=lambda g: {"GPU-0": g["GPU-0"]}),
    ),
    (
        "swapped-device-tokens [SDK accepts]",
        Reason.DIGEST_MISMATCH,
        lambda m, n, o: m.mint(
            n, names=("GPU-0", "GPU-1"), tokens=lambda g: {"GPU-0": g["GPU-1"], "GPU-1": g["GPU-0"]}
        ),
    ),
    (
        "overall-result-false [SDK catches]",
        Reason.OVERALL_RESULT_FALSE,
        lambda m, n, o: m.mint(n, failure=NONCE_NOT_MATCHING),
    ),  # NRAS's real error form: no eat_nonce
    (
        "dbgstat-enabled [SDK accepts]",
        Reason.POLICY_VIOLATION,
        lambda m, n, o: m.mint(n, device={"dbgstat": "enabled"}),
    ),
    ("secboot-false [SDK accepts]", Reason.POLICY_VIOLATION, lambda m, n, o: m.mint(n, device={"secboot": False})),
    ("secboot-string-true", Reason.POLICY_VIOLATION, lambda m, n, o: m.mint(n, device={"secboot": "true"})),
    ("measres-missing", Reason.POLICY_VIOLATION, lambda m, n, o: m.mint(n, device={"measres": None})),
    (
        "vbios-cert-revoked",
        Reason.POLICY_VIOLATION,
        lambda m, n, o: m.mint(
            n,
            device={
                "x-nvidia-gpu-vbios-rim-cert-chain": {
                    **GPU_TEMPLATE["x-nvidia-gpu-vbios-rim-cert-chain"],
                    "x-nvidia-cert-status": "revoked",
                }
            },
        ),
    ),
    (
        "claims-2.0-against-3.0-policy",
        Reason.POLICY_VIOLATION,
        lambda m, n, o: m.mint(n, overall={"x-nvidia-ver": "3.0"}, version="2.0"),
    ),
    ("hwmodel-not-allowed", Reason.POLICY_VIOLATION, lambda m, n, o: m.mint(n, device={"hwmodel": "GB100 A01 X"})),
    (
        "driver-too-old",
        Reason.POLICY_VIOLATION,
        lambda m, n, o: m.mint(n, device={"x-nvidia-gpu-driver-version": "535.104.05"}),
    ),
    (
        "vbios-too-old",
        Reason.POLICY_VIOLATION,
        lambda m, n, o: m.mint(n, device={"x-nvidia-gpu-vbios-version": "96.00.5E.00.01"}),
    ),
    ("ueid-denied", Reason.DEVICE_DENIED, lambda m, n, o: m.mint(n, device={"ueid": DENIED_UEID})),
]


@pytest.mark.parametrize("build, reason", [(c[2], c[1]) for c in CASES], ids=[c[0] for c in CASES])
async def test_rejected_with_reason(verifier, minter, nonce, other_key, build, reason):
    eat = build(minter, nonce, other_key)
    with pytest.raises(AttestationError) as info:
        await verifier.verify(eat, nonce)
    assert info.value.reason == reason, info.value
    if reason not in (Reason.TOO_LARGE, Reason.MALFORMED):
        assert info.value.fingerprint == sha256_hex(json.loads(eat)[0][1])


async def test_nras_failure_verdict_is_overall_result_false_with_nvidia_details(verifier, minter, nonce):
    """NRAS's failure verdict: genuine, nonce-bound, digest-pinned overall token, device tokens in the
    error form without eat_nonce. Decided on the overall result, not refused as nonce_mismatch."""
    eat = minter.mint(nonce, names=("GPU-0", "GPU-1"), failure=NONCE_NOT_MATCHING)
    with pytest.raises(AttestationError) as info:
        await verifier.verify(eat, nonce)
    assert info.value.reason == Reason.OVERALL_RESULT_FALSE
    assert info.value.nvidia_errors == {"GPU-0": NONCE_NOT_MATCHING, "GPU-1": NONCE_NOT_MATCHING}
    assert "GPU-0: 4010 NONCE_NOT_MATCHING" in info.value.detail
    with pytest.raises(AttestationError) as info:  # a verdict for another nonce stays nonce_mismatch
        await verifier.verify(minter.mint(OTHER_NONCE, failure=NONCE_NOT_MATCHING), nonce)
    assert info.value.reason == Reason.NONCE_MISMATCH


@pytest.mark.parametrize(
    "hwmodel, allowed", [(HOPPER, True), ("GH100", True), ("GB100 A01 GSP BROM", False), ("", False), (" ", False)]
)
async def test_hwmodel_allowlist_names_the_chip(verifier, minter, nonce, hwmodel, allowed):
    eat = minter.mint(nonce, device={"hwmodel": hwmodel})
    if allowed:
        assert (await verifier.verify(eat, nonce)).devices["GPU-0"].hwmodel == hwmodel
    else:
        with pytest.raises(AttestationError) as info:
            await verifier.verify(eat, nonce)
        assert info.value.reason == Reason.POLICY_VIOLATION


async def test_replayed_jti(verifier, minter, nonce):
    eat = minter.mint(nonce)
    await verifier.verify(eat, nonce)
    with pytest.raises(AttestationError) as info:
        await verifier.verify(eat, nonce)
    assert info.value.reason == Reason.REPLAYED_JTI


async def test_jwks_500_fails_closed(verifier, jwks_server, minter, nonce):
    jwks_server.fail = True
    with pytest.raises(AttestationError) as info:
        await verifier.verify(minter.mint(nonce), nonce)
    assert info.value.reason == Reason.JWKS_UNAVAILABLE and jwks_server.requests == 1


def test_every_reason_has_a_test_and_a_status():
    elsewhere = {
        Reason.REPLAYED_JTI,
        Reason.JWKS_UNAVAILABLE,
        Reason.NONCE_UNKNOWN,
        Reason.RATE_LIMITED,
        Reason.LOCKED_OUT,
        Reason.NRAS_UNAVAILABLE,
        Reason.NRAS_REJECTED,
        Reason.DEVICE_MISMATCH,
        Reason.NOT_NODE_IDENTITY,
        Reason.NODE_NOT_ENROLLED,
    }
    assert {c[1] for c in CASES} | elsewhere == set(Reason)
    assert {
        r.value: http_status(r)
        for r in (
            Reason.LOCKED_OUT,
            Reason.JWKS_UNAVAILABLE,
            Reason.TOO_LARGE,
            Reason.BAD_SIGNATURE,
            Reason.NOT_NODE_IDENTITY,
            Reason.NODE_NOT_ENROLLED,
            Reason.DEVICE_MISMATCH,
        )
    } == {
        "locked_out": 429,
        "jwks_unavailable": 503,
        "too_large": 413,
        "bad_signature": 422,
        "not_node_identity": 403,
        "node_not_enrolled": 404,
        "device_mismatch": 422,
    }


# --- JWKS cache: fetch counting --------------------------------------------------------------------


async def test_jwks_cached_then_refreshed_after_ttl(verifier, jwks_server, minter, clock):
    for _ in range(20):
        n = secrets.token_hex(32)
        await verifier.verify(minter.mint(n), n)
    assert jwks_server.requests == 1 == verifier.jwks.fetches
    clock.advance(901)
    n = secrets.token_hex(32)
    await verifier.verify(minter.mint(n), n)
    assert jwks_server.requests == 2


async def test_unknown_kid_one_refresh_then_cooldown(verifier, jwks_server, minter, clock, key):
    n = secrets.token_hex(32)
    await verifier.verify(minter.mint(n), n)
    assert jwks_server.requests == 1
    clock.advance(61)
    for _ in range(5):  # random kids: one refresh, then none during the cooldown
        with pytest.raises(AttestationError) as info:
            await verifier.verify(minter.mint(n, overall_sign={"kid": secrets.token_hex(8)}), n)
        assert info.value.reason == Reason.UNKNOWN_KID
    assert jwks_server.requests == 2
    rotated = NrasKey()  # NRAS rotates: the new kid appears after the cooldown
    jwks_server.keys.append(rotated)
    clock.advance(61)
    n = secrets.token_hex(32)
    result = await verifier.verify(EatMinter(rotated, clock).mint(n), n)
    assert result.kid == rotated.kid and jwks_server.requests == 3


async def test_jwks_failure_after_ttl_serves_no_stale_keys_and_opens_circuit(verifier, jwks_server, minter, clock):
    n = secrets.token_hex(32)
    await verifier.verify(minter.mint(n), n)
    jwks_server.fail = True
    clock.advance(901)
    for _ in range(6):
        n = secrets.token_hex(32)
        with pytest.raises(AttestationError) as info:
            await verifier.verify(minter.mint(n), n)
        assert info.value.reason == Reason.JWKS_UNAVAILABLE
    assert jwks_server.requests == 1 + 3  # the breaker opened after 3 failures
    jwks_server.fail = False
    clock.advance(31)
    n = secrets.token_hex(32)
    await verifier.verify(minter.mint(n), n)
    assert jwks_server.requests == 5


def test_jwks_keeps_only_matching_p384_keys(key, clock):
    from cryptography.hazmat.primitives.asymmetric import ec
    from jwt.algorithms import ECAlgorithm

    p256 = {**ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP256R1()).public_key(), as_dict=True), "kid": "p256"}
    mismatched = {**NrasKey().jwk(), "x5c": key.jwk()["x5c"], "kid": "x5c-mismatch"}
    no_x5c = {k: v for k, v in NrasKey(kid="plain").jwk().items() if k != "x5c"}
    keys = parse_jwks(json.dumps({"keys": [key.jwk(), p256, mismatched, no_x5c, {"kty": "RSA"}]}).encode(), clock())
    assert set(keys) == {key.kid, "plain"}
    assert parse_jwks(json.dumps({"keys": [key.jwk()]}).encode(), clock() + 3 * 86400) == {}  # cert expired


@pytest.mark.parametrize(
    "url, insecure_ok",
    [
        ("https://evil.example/.well-known/jwks.json", True),
        ("http://nras.attestation.nvidia.com/.well-known/jwks.json", True),
        ("http://127.0.0.1:8080/jwks.json", False),
        ("http://localhost:8080/jwks.json", True),
        ("https://nras.attestation.nvidia.com@evil.example/jwks.json", True),
        ("https://evil.example\\@nras.attestation.nvidia.com/", True),
        ("https://nras.attestation.nvidia.com.evil.example/", True),
    ],
)
def test_service_urls_must_be_allow_listed(url, insecure_ok):
    with pytest.raises(ConfigError):
        JwksCache(url, allowed_hosts={"nras.attestation.nvidia.com"}, allow_insecure_localhost=insecure_ok)
    with pytest.raises(ConfigError):
        Attestation(config=Config({"Attestation": {"jwks_url": url, "allow_insecure_localhost": insecure_ok}})).check()


def test_config_show_lists_attestation_without_secrets():
    shown = effective_config(Config({"Attestation": {"api_key_file": "/etc/gpulab/nras.key"}}))  # a built-in section
    assert shown["Attestation"]["api_key_file"] == "/etc/gpulab/nras.key"
    assert shown["Attestation"]["max_eat_bytes"] == 131072 and shown["Attestation"]["nonce_ttl"] == 300


def test_default_urls_pass_the_allow_list():
    s = Attestation()
    s.check()
    assert s.jwks_url == "https://nras.attestation.nvidia.com/.well-known/jwks.json"
    assert check_url("http://127.0.0.1:9/x", set(), True, "t") == "http://127.0.0.1:9/x"


# --- NVIDIA's published samples: shape, digests, policy --------------------------------------------


@pytest.mark.parametrize(
    "eat_file, decoded_file, name, hwmodel",
    [
        ("hopperClaimsv3_detached_eat.json", "hopperClaimsv3_decoded.json", "GPU-0", HOPPER),
        ("switch_detached_eat.json", "switch_decoded.json", "SWITCH-0", SWITCH),
    ],
)
async def test_nvidia_samples_parse_digests_and_policy(eat_file, decoded_file, name, hwmodel, verifier):
    text = json.dumps(sample(eat_file))
    overall_jwt, devices = verifier.parse(text)
    assert list(devices) == [name]
    overall, device = split_jws(overall_jwt), split_jws(devices[name])
    assert overall.kid.startswith("nv-eat-kid-prod-" if name == "GPU-0" else "nv-eat-kid-stg-")
    overall_claims = json.loads(base64.urlsafe_b64decode(overall.payload + "=="))
    device_claims = json.loads(base64.urlsafe_b64decode(device.payload + "=="))
    assert device_claims == sample(decoded_file)[name]
    check_submods(overall_claims["submods"], devices)  # real NRAS digests bind the device token
    with pytest.raises(AttestationError) as info:
        check_submods(overall_claims["submods"], {name: devices[name][:-4] + "AAAA"})
    assert info.value.reason == Reason.DIGEST_MISMATCH
    kind = name.split("-")[0]
    appraiser = Appraiser(hwmodel_allowlist=frozenset({hwmodel}), min_vbios_version="96.00.00.00.00")
    appraiser.check_overall(kind, overall_claims["x-nvidia-ver"], overall_claims)
    appraiser.check_device(name, overall_claims["x-nvidia-ver"], device_claims)
    for bad in ({"dbgstat": "enabled"}, {"secboot": False}, {"measres": "fail"}):
        with pytest.raises(AttestationError) as info:
            appraiser.check_device(name, "3.0", {**device_claims, **bad})
        assert info.value.reason == Reason.POLICY_VIOLATION
    with pytest.raises(AttestationError) as info:  # signed by NVIDIA's production key, which we do not serve
        await verifier.verify(text, overall_claims["eat_nonce"])
    assert info.value.reason == Reason.UNKNOWN_KID


def test_nvidia_sample_claims_under_wrong_kind_or_version_fail():
    appraiser = Appraiser()
    hopper = sample("hopperClaimsv3_decoded.json")["GPU-0"]
    with pytest.raises(AttestationError):
        appraiser.check_device("SWITCH-0", "3.0", hopper)
    with pytest.raises(AttestationError):
        appraiser.check_device("GPU-0", "2.0", hopper)  # 3.0 claims lack 2.0's flat cert booleans
    with pytest.raises(AttestationError):
        appraiser.check_device("GPU-0", "3.0", SWITCH_TEMPLATE)


def test_policy_file_in_nvidia_format(tmp_path):
    path = tmp_path / "policy.json"
    path.write_text(
        json.dumps(
            {
                "version": "4.0",
                "authorization-rules": {
                    "type": "JWT",
                    "overall-claims": {"x-nvidia-ver": "3.0"},
                    "detached-claims": {
                        "measres": "success",
                        "x-nvidia-gpu-arch-check": True,
                        "x-nvidia-gpu-driver-rim-cert-chain": {"x-nvidia-cert-status": "valid"},
                    },
                },
            }
        )
    )
    policy = Policy.load(str(path), "Attestation.policy_file")
    hopper = sample("hopperClaimsv3_decoded.json")["GPU-0"]
    assert policy.device_violations(hopper) == []
    assert policy.device_violations({**hopper, "x-nvidia-gpu-driver-rim-cert-chain": {}}) == [
        "x-nvidia-gpu-driver-rim-cert-chain.x-nvidia-cert-status missing"
    ]
    assert policy.device_violations({**hopper, "x-nvidia-gpu-arch-check": 1}) == ["x-nvidia-gpu-arch-check != true"]
    path.write_text("{}")
    with pytest.raises(ConfigError):
        Policy.load(str(path), "Attestation.policy_file")


# --- nonces ------------------------------------------------------------------------------------------


@pytest.fixture
def db_url(tmp_path):
    return f"sqlite:///{tmp_path / 'attestation.sqlite'}"


def test_nonce_single_use_and_binding(db_url, clock):
    store = NonceStore(db_url, clock=clock)
    issued = store.issue(user="ana", node="gpu-1", purpose="node-attestation")
    assert len(issued.value) == 64 and int(issued.value, 16) >= 0 and len(issued.b64url) == 43
    assert issued.expires_at == clock() + 300
    for user, node, purpose in [
        ("bob", "gpu-1", "node-attestation"),
        ("ana", "gpu-2", "node-attestation"),
        ("ana", "gpu-1", "other"),
    ]:
        assert not store.consume(issued.value, user=user, node=node, purpose=purpose)
    assert store.consume(issued.value, user="ana", node="gpu-1", purpose="node-attestation")
    assert not store.consume(issued.value, user="ana", node="gpu-1", purpose="node-attestation")
    assert not store.consume("00" * 32, user="ana", node="gpu-1", purpose="node-attestation")


def test_nonce_expires(db_url, clock):
    store = NonceStore(db_url, ttl=300, clock=clock)
    issued = store.issue(user="ana", node="gpu-1", purpose="p")
    clock.advance(301)
    assert not store.consume(issued.value, user="ana", node="gpu-1", purpose="p")


def test_nonce_survives_restart_and_is_stored_hashed(db_url, clock, tmp_path):
    issued = NonceStore(db_url, clock=clock).issue(user="ana", node="gpu-1", purpose="p")
    assert issued.value.encode() not in (tmp_path / "attestation.sqlite").read_bytes()
    assert NonceStore(db_url, clock=clock).consume(issued.value, user="ana", node="gpu-1", purpose="p")


def test_nonce_consume_is_atomic(db_url, clock):
    store = NonceStore(db_url, clock=clock)
    issued = store.issue(user="ana", node="gpu-1", purpose="p")
    barrier = threading.Barrier(8)

    def use(_):
        barrier.wait()
        return store.consume(issued.value, user="ana", node="gpu-1", purpose="p")

    with ThreadPoolExecutor(8) as pool:
        assert sorted(pool.map(use, range(8))) == [False] * 7 + [True]


# --- the service: nonce + verify + node state + throttling + audit ------------------------------


def make_service(jwks_server, clock, db_url, nras=None, **extra) -> AttestationService:
    """The service with node gpu-1 enrolled with one GPU (its first attestation pins it)."""
    s = settings(jwks_server.url, **extra)
    engine = open_database(db_url)
    enrolments = Enrolments(engine, clock=clock)
    enrolments.enroll("gpu-1", by="admin", gpus=1)
    return AttestationService(
        verifier=Verifier.from_settings(s, clock=clock),
        nonces=NonceStore(engine=engine, clock=clock),
        nodes=NodeStates(engine, clock=clock),
        enrolments=enrolments,
        guard=AbuseGuard(
            nonce_burst=s.nonce_burst,
            nonce_rate=s.nonce_rate,
            verify_burst=s.verify_burst,
            verify_rate=s.verify_rate,
            max_failures=s.max_failures,
            lockout_seconds=s.lockout_seconds,
            clock=clock,
        ),
        audit=AuditLog(burst=s.audit_burst, window=s.audit_window, clock=clock),
        nras=nras,
    )


WHO = {"caller": Caller.of_node("gpu-1"), "node": "gpu-1", "client_ip": "10.0.0.5"}
ADMIN = Caller.user("ana", admin=True)


async def test_service_flow_and_node_state(jwks_server, clock, db_url, minter):
    service = make_service(jwks_server, clock, db_url)
    nonce = service.issue_nonce(**WHO)
    verified = await service.verify(minter.mint(nonce.value), nonce=nonce.value, **WHO)
    assert service.nodes.gate("gpu-2", max_age=600) == (None, "node never attested")
    state, problem = service.nodes.gate("gpu-1", max_age=600)
    assert problem is None and state.fingerprint == verified.fingerprint
    assert state.summary["devices"]["GPU-0"]["hwmodel"] == HOPPER and state.user == "node:gpu-1"
    assert [s.node for s in service.nodes.all()] == ["gpu-1"]
    clock.advance(601)
    assert service.nodes.gate("gpu-1", max_age=600)[1] == "attestation older than 600 s"
    with pytest.raises(AttestationError) as info:  # nonce used up
        await service.verify(minter.mint(nonce.value), nonce=nonce.value, **WHO)
    assert info.value.reason == Reason.NONCE_UNKNOWN


async def test_service_nonce_bound_to_node_and_spent_by_a_failure(jwks_server, clock, db_url, minter):
    service = make_service(jwks_server, clock, db_url)
    service.enrolments.enroll("gpu-2", by="admin", gpus=1)
    nonce = service.issue_nonce(**{**WHO, "caller": ADMIN})
    with pytest.raises(AttestationError) as info:
        await service.verify(minter.mint(nonce.value), nonce=nonce.value, **{**WHO, "caller": ADMIN, "node": "gpu-2"})
    assert info.value.reason == Reason.NONCE_UNKNOWN
    with pytest.raises(AttestationError) as info:  # bound to its caller too
        await service.verify(minter.mint(nonce.value), nonce=nonce.value, **WHO)
    assert info.value.reason == Reason.NONCE_UNKNOWN
    nonce = service.issue_nonce(**WHO)
    assert jwks_server.requests == 0  # no key lookup without a live nonce
    with pytest.raises(AttestationError) as info:
        await service.verify(minter.mint(nonce.value, device={"dbgstat": "enabled"}), nonce=nonce.value, **WHO)
    assert info.value.reason == Reason.POLICY_VIOLATION
    with pytest.raises(AttestationError) as info:
        await service.verify(minter.mint(nonce.value), nonce=nonce.value, **WHO)
    assert info.value.reason == Reason.NONCE_UNKNOWN


async def test_genuine_failure_revokes_node_garbage_does_not(jwks_server, clock, db_url, minter):
    service = make_service(jwks_server, clock, db_url)
    nonce = service.issue_nonce(**WHO)
    await service.verify(minter.mint(nonce.value), nonce=nonce.value, **WHO)
    nonce = service.issue_nonce(**WHO)
    with pytest.raises(AttestationError):
        await service.verify("garbage", nonce=nonce.value, **WHO)
    state, problem = service.nodes.gate("gpu-1", 600)
    assert problem is None and state.last_reason == "malformed"
    nonce = service.issue_nonce(**WHO)
    with pytest.raises(AttestationError):
        await service.verify(minter.mint(nonce.value, device={"secboot": False}), nonce=nonce.value, **WHO)
    assert service.nodes.gate("gpu-1", 600)[1] == "attestation revoked (policy_violation)"


async def test_rate_limit_and_lockout(jwks_server, clock, db_url, minter):
    service = make_service(
        jwks_server, clock, db_url, nonce_burst=3, nonce_rate=0.5, max_failures=3, lockout_seconds=300
    )
    nonces = [service.issue_nonce(**WHO) for _ in range(3)]
    with pytest.raises(AttestationError) as info:
        service.issue_nonce(**WHO)
    assert info.value.reason == Reason.RATE_LIMITED and info.value.retry_after == pytest.approx(2)
    with pytest.raises(AttestationError) as info:  # per caller: another address does not help
        service.issue_nonce(**{**WHO, "client_ip": "10.0.0.6"})
    assert info.value.reason == Reason.RATE_LIMITED
    service.issue_nonce(**{**WHO, "caller": ADMIN})  # another caller has buckets of its own
    clock.advance(2)
    service.issue_nonce(**WHO)
    for n in nonces:
        with pytest.raises(AttestationError):
            await service.verify(minter.mint(OTHER_NONCE), nonce=n.value, **WHO)
    for client_ip in ("10.0.0.5", "10.0.0.6", "127.0.0.1"):
        with pytest.raises(AttestationError) as info:
            service.issue_nonce(**{**WHO, "client_ip": client_ip})
        assert info.value.reason == Reason.LOCKED_OUT and info.value.retry_after == pytest.approx(300)
    clock.advance(301)
    nonce = service.issue_nonce(**WHO)
    await service.verify(minter.mint(nonce.value), nonce=nonce.value, **WHO)


async def test_jwks_outage_is_no_lockout_strike(jwks_server, clock, db_url, minter):
    service = make_service(jwks_server, clock, db_url, max_failures=2)
    jwks_server.fail = True
    for _ in range(3):
        clock.advance(61)
        nonce = service.issue_nonce(**WHO)
        with pytest.raises(AttestationError) as info:
            await service.verify(minter.mint(nonce.value), nonce=nonce.value, **WHO)
        assert info.value.reason == Reason.JWKS_UNAVAILABLE
    service.issue_nonce(**WHO)  # not locked out


async def test_only_the_node_itself_or_an_admin_may_attest_it(jwks_server, clock, db_url, minter):
    service = make_service(jwks_server, clock, db_url)
    nonce = service.issue_nonce(**WHO)
    await service.verify(minter.mint(nonce.value), nonce=nonce.value, **WHO)
    before = service.nodes.get("gpu-1")
    service.enrolments.enroll("gpu-2", by="admin", gpus=1)
    for caller in (Caller.user("eve"), Caller.of_node("gpu-2"), Caller.user("node:gpu-1")):
        with pytest.raises(AttestationError) as info:
            service.issue_nonce(**{**WHO, "caller": caller})
        assert info.value.reason == Reason.NOT_NODE_IDENTITY
        with pytest.raises(AttestationError) as info:  # NRAS's failure verdict, from someone else
            await service.verify(
                minter.mint(nonce.value, failure=NONCE_NOT_MATCHING), nonce=nonce.value, **{**WHO, "caller": caller}
            )
        assert info.value.reason == Reason.NOT_NODE_IDENTITY
    assert service.nodes.get("gpu-1") == before and service.nodes.gate("gpu-1", 600)[1] is None
    with pytest.raises(AttestationError) as info:
        service.issue_nonce(**{**WHO, "caller": ADMIN, "node": "gpu-9"})
    assert info.value.reason == Reason.NODE_NOT_ENROLLED
    nonce = service.issue_nonce(**{**WHO, "caller": ADMIN})  # an admin may attest any enrolled node
    await service.verify(minter.mint(nonce.value), nonce=nonce.value, **{**WHO, "caller": ADMIN})
    assert service.nodes.get("gpu-1").user == "ana"


async def test_nras_failure_verdict_revokes_the_node(jwks_server, clock, db_url, minter):
    service = make_service(jwks_server, clock, db_url)
    nonce = service.issue_nonce(**WHO)
    await service.verify(minter.mint(nonce.value), nonce=nonce.value, **WHO)
    nonce = service.issue_nonce(**WHO)
    with pytest.raises(AttestationError) as info:
        await service.verify(minter.mint(nonce.value, failure=NONCE_NOT_MATCHING), nonce=nonce.value, **WHO)
    assert info.value.reason == Reason.OVERALL_RESULT_FALSE
    state, problem = service.nodes.gate("gpu-1", 600)
    assert problem == "attestation revoked (overall_result_false)" and state.revoked
    assert state.summary["nvidia_errors"] == {"GPU-0": NONCE_NOT_MATCHING}
    nonce = service.issue_nonce(**WHO)  # a later success clears both
    await service.verify(minter.mint(nonce.value), nonce=nonce.value, **WHO)
    state = service.nodes.get("gpu-1")
    assert not state.revoked and "nvidia_errors" not in state.summary


async def test_devices_must_be_the_enrolled_gpus(jwks_server, clock, db_url, minter):
    service = make_service(jwks_server, clock, db_url)  # gpu-1: one GPU, pinned by its first attestation
    nonce = service.issue_nonce(**WHO)
    with pytest.raises(AttestationError) as info:
        await service.verify(minter.mint(nonce.value, names=("GPU-0", "GPU-1")), nonce=nonce.value, **WHO)
    assert info.value.reason == Reason.DEVICE_MISMATCH and "enrolled with 1 GPUs" in info.value.detail
    assert service.enrolments.get("gpu-1").ueids is None
    nonce = service.issue_nonce(**WHO)
    await service.verify(minter.mint(nonce.value), nonce=nonce.value, **WHO)
    assert service.enrolments.get("gpu-1").ueids == [minter.ueid("GPU-0")]
    nonce = service.issue_nonce(**WHO)  # another GPU, genuinely attested: refused, and the node revoked
    with pytest.raises(AttestationError) as info:
        await service.verify(minter.mint(nonce.value, device={"ueid": "42"}), nonce=nonce.value, **WHO)
    assert info.value.reason == Reason.DEVICE_MISMATCH and info.value.fingerprint
    assert service.nodes.gate("gpu-1", 600)[1] == "attestation revoked (device_mismatch)"

    service.enrolments.enroll("gpu-3", by="admin", ueids=["42", "43"])
    who = {**WHO, "caller": Caller.of_node("gpu-3"), "node": "gpu-3"}
    nonce = service.issue_nonce(**who)
    with pytest.raises(AttestationError) as info:
        await service.verify(minter.mint(nonce.value, names=("GPU-0", "GPU-1")), nonce=nonce.value, **who)
    assert info.value.reason == Reason.DEVICE_MISMATCH


def test_node_credentials_are_stored_hashed(db_url, clock, tmp_path):
    enrolments = Enrolments(open_database(db_url), clock=clock)
    credential = enrolments.enroll("gpu-7", by="admin", gpus=2)
    name, secret = credential.removeprefix("node:").rsplit(":", 1)
    assert (
        name == "gpu-7" and len(secret) >= 43 and secret.encode() not in (tmp_path / "attestation.sqlite").read_bytes()
    )
    assert enrolments.authenticate(credential) == "gpu-7"
    for wrong in (credential[:-1] + ("A" if credential[-1] != "A" else "B"), f"node:gpu-8:{secret}", secret, "node:"):
        assert enrolments.authenticate(wrong) is None
    assert enrolments.remove("gpu-7") and enrolments.authenticate(credential) is None


def test_service_from_config(jwks_server, db_url):
    cfg = Config({"Attestation": {"jwks_url": jwks_server.url, "allow_insecure_localhost": True, "db_url": db_url}})
    service = AttestationService.from_config(cfg)
    assert service.verifier.jwks.url == jwks_server.url and service.nras.api_key is None
    with pytest.raises(ConfigError):
        AttestationService.from_config(Config({"Attestation": {"jwks_url": jwks_server.url, "db_url": db_url}}))


# --- audit trail -------------------------------------------------------------------------------------


def _audit_lines(caplog) -> list[dict]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == LOGGER_NAME]


def _sample(action: str, result: str) -> float:
    return REGISTRY.get_sample_value("gpulab_attestation_outcomes_total", {"action": action, "result": result}) or 0


async def test_audit_records_rate_limited_with_summary(caplog, clock):
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    audit = AuditLog(burst=2, window=60, clock=clock)
    before = _sample("verify", "bad_signature")
    for i in range(5):  # a new forged client address each time does not escape the limit
        audit.record(
            "verify",
            Reason.BAD_SIGNATURE,
            user="eve",
            client_ip=f"10.0.0.{i}",
            node="gpu-1",
            kid="k",
            jti=f"j{i}",
            fingerprint="f" * 64,
        )
    audit.record("verify", Reason.BAD_SIGNATURE, user="ana", client_ip="10.0.0.1", node="gpu-1")
    clock.advance(60)
    audit.record("verify", Reason.BAD_SIGNATURE, user="eve", client_ip="10.0.0.9", node="gpu-1")
    lines = _audit_lines(caplog)
    assert [(line["event"], line.get("user")) for line in lines] == [
        ("attestation.verify", "eve"),
        ("attestation.verify", "eve"),
        ("attestation.verify", "ana"),
        ("attestation.suppressed", "eve"),
        ("attestation.verify", "eve"),
    ]
    assert lines[3]["suppressed"] == 3 and lines[3]["result"] == "bad_signature"
    assert set(lines[0]) == {
        "ts",
        "event",
        "result",
        "user",
        "client_ip",
        "node",
        "kid",
        "jti",
        "fingerprint",
        "detail",
    }
    assert _sample("verify", "bad_signature") - before == 7


def test_audit_file_is_private(tmp_path, clock):
    path = tmp_path / "audit.log"
    audit = AuditLog(path=str(path), clock=clock)
    try:
        audit.record("nonce", "ok", user="ana", client_ip="10.0.0.5", node="gpu-1")
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert json.loads(path.read_text())["result"] == "ok"
    finally:
        for h in list(audit.logger.handlers):
            audit.logger.removeHandler(h)
            h.close()
        audit.logger.propagate = True


# --- API key, NRAS client (against a fake) and the no-leak check ---------------------------------


@pytest.fixture
def api_key_file(tmp_path):
    path = tmp_path / "nras.key"
    path.write_text("nvapi-" + secrets.token_hex(24) + "\n")
    path.chmod(0o600)
    return path


def test_api_key_file_must_be_private(api_key_file):
    api_key_file.chmod(0o640)
    with pytest.raises(ConfigError) as info:
        load_api_key(Attestation(config=Config({"Attestation": {"api_key_file": str(api_key_file)}})))
    message = str(info.value)
    assert "\n" not in message and "Attestation.api_key_file" in message and "chmod 600" in message
    assert api_key_file.read_text().strip() not in message


def test_api_key_from_file_and_env_removed(api_key_file, monkeypatch):
    monkeypatch.setenv(ENV_VAR, "nvapi-from-env")
    key = load_api_key(Attestation(config=Config({"Attestation": {"api_key_file": str(api_key_file)}})))
    assert key.reveal() == api_key_file.read_text().strip() and ENV_VAR not in os.environ
    assert key.reveal() not in repr(key) and "redacted" in repr(key) and key.reveal() not in str(key)


def test_api_key_from_env_is_removed_and_not_inherited(monkeypatch):
    value = "nvapi-" + secrets.token_hex(24)
    monkeypatch.setenv(ENV_VAR, value)
    key = load_api_key(Attestation())
    assert isinstance(key, Secret) and key.reveal() == value and ENV_VAR not in os.environ
    client = NrasClient("https://nras.attestation.nvidia.com", key, allowed_hosts={"nras.attestation.nvidia.com"})
    assert value not in repr(client)
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(sorted(os.environ.items()))"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert value not in child.stdout
    assert load_api_key(Attestation()) is None


class FakeNras(RequestHandler):
    """A FAKE of NVIDIA's Remote Attestation Service (POST /v4/attest/gpu) for tests only: it asserts
    the request shape and the Bearer header, then answers an EAT minted with the test key."""

    def initialize(self, state):
        self.state = state

    def post(self, device):
        state = self.state
        state["calls"].append({"device": device, "authorization": self.request.headers.get("Authorization")})
        if state.get("status"):
            self.set_status(state["status"])
            if state["status"] == 302:
                self.set_header("Location", "/capture")
            return self.finish()
        assert self.request.headers["Authorization"] == f"Bearer {state['key']}"
        body = json.loads(self.request.body)
        assert set(body) == {"nonce", "arch", "claims_version", "evidence_list"} and body["arch"] == "HOPPER"
        assert body["evidence_list"] == [{"evidence": "ZXZpZGVuY2U=", "certificate": "Y2VydA=="}]
        self.write(state["minter"].mint(body["nonce"]))

    def get(self, _):  # the redirect target: must never be reached
        self.state["calls"].append({"device": "capture", "authorization": self.request.headers.get("Authorization")})


@pytest.fixture
async def fake_nras(minter, api_key_file):
    state = {"calls": [], "minter": minter, "key": api_key_file.read_text().strip()}
    app = Application(
        [(r"/v4/attest/(gpu|switch)", FakeNras, {"state": state}), (r"/(capture)", FakeNras, {"state": state})]
    )
    server = HTTPServer(app)
    port = free_port()
    server.listen(port, "127.0.0.1")
    state["url"] = f"http://127.0.0.1:{port}"
    yield state
    server.stop()


EVIDENCE = [{"evidence": "ZXZpZGVuY2U=", "certificate": "Y2VydA=="}]


def nras_client(fake_nras, api_key_file):
    cfg = Config(
        {
            "Attestation": {
                "nras_url": fake_nras["url"],
                "allow_insecure_localhost": True,
                "api_key_file": str(api_key_file),
            }
        }
    )
    return NrasClient.from_settings(Attestation(config=cfg))


async def test_evidence_relayed_to_nras_with_bearer_key(fake_nras, api_key_file, jwks_server, clock, db_url):
    service = make_service(jwks_server, clock, db_url, nras=nras_client(fake_nras, api_key_file))
    nonce = service.issue_nonce(**WHO)
    verified = await service.attest_evidence(EVIDENCE, nonce=nonce.value, **WHO)
    assert verified.devices["GPU-0"].hwmodel == HOPPER
    assert fake_nras["calls"] == [{"device": "gpu", "authorization": f"Bearer {fake_nras['key']}"}]


@pytest.mark.parametrize(
    "status, reason", [(500, Reason.NRAS_UNAVAILABLE), (403, Reason.NRAS_REJECTED), (302, Reason.NRAS_UNAVAILABLE)]
)
async def test_nras_errors_and_no_redirects(fake_nras, api_key_file, status, reason):
    fake_nras["status"] = status
    with pytest.raises(AttestationError) as info:
        await nras_client(fake_nras, api_key_file).attest(EVIDENCE, OTHER_NONCE)
    assert info.value.reason == reason
    assert [c["device"] for c in fake_nras["calls"]] == ["gpu"]  # a redirect is not followed


async def test_nothing_secret_reaches_any_log(caplog, fake_nras, api_key_file, jwks_server, clock, db_url, minter, key):
    """Run successes and failures of every kind with all logging on; no token, nonce or key appears."""
    caplog.set_level(logging.DEBUG)
    service = make_service(jwks_server, clock, db_url, nras=nras_client(fake_nras, api_key_file))
    eats, nonces = [], []
    for changes in (
        {},
        {"device": {"dbgstat": "enabled"}},
        {"overall_sign": {"alg": "HS256"}},
        {"overall": {"iss": "https://evil.example"}},
    ):
        nonce = service.issue_nonce(**WHO).value
        nonces.append(nonce)
        eats.append(minter.mint(nonce, **changes))
        try:
            await service.verify(eats[-1], nonce=nonce, **WHO)
        except AttestationError as e:
            assert e.fingerprint and str(e) and e.detail
    nonce = service.issue_nonce(**WHO).value
    nonces.append(nonce)
    await service.attest_evidence(EVIDENCE, nonce=nonce, **WHO)
    audit_lines = _audit_lines(caplog)
    assert {line["result"] for line in audit_lines} >= {"ok", "policy_violation", "alg_not_allowed", "wrong_issuer"}
    assert all(line["fingerprint"] for line in audit_lines if line["event"] == "attestation.verify")
    secrets_ = [fake_nras["key"], key.pem.decode().splitlines()[1], *nonces]
    from cryptography.hazmat.primitives import serialization

    private = key.private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    secrets_.append(private.splitlines()[1])
    for eat in eats:
        doc = json.loads(eat)
        for token in [doc[0][1], *doc[1].values()]:
            secrets_.extend(token.split(".")[1:])  # every payload and signature segment
    logged = caplog.text + "\n".join(r.getMessage() for r in caplog.records)
    leaks = [s[:12] for s in secrets_ if s and s in logged]
    assert not leaks, f"secret material in logs: {leaks}"
