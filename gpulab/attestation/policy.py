"""Appraisal of verified claims: NVIDIA's appraisal-policy JSON plus gpulab's device allow-lists.

A policy file has NVIDIA's shape::

    {"version": "4.0", "authorization-rules": {"type": "JWT",
        "overall-claims": {"x-nvidia-overall-att-result": true, "x-nvidia-ver": "3.0"},
        "detached-claims": {"measres": "success", "secboot": true, "dbgstat": "disabled",
                            "x-nvidia-gpu-attestation-report-cert-chain": {"x-nvidia-cert-status": "valid"}, ...}}}

Every listed claim must be present and equal, type included (``true`` is not ``1`` nor ``"true"``);
a nested object lists the sub-claims that must match (claims 3.0 cert-chain objects). Without a
configured file the built-in policy for the token's claims version (2.0 or 3.0) applies; unlike
NVIDIA's examples it requires ``secboot: true`` and ``dbgstat: "disabled"``.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .reasons import AttestationError, Reason

CLAIMS_VERSIONS = ("2.0", "3.0")
GPU, SWITCH = "GPU", "SWITCH"
CERT_OK = {"x-nvidia-cert-status": "valid", "x-nvidia-cert-ocsp-status": "good"}
_STATE = {"measres": "success", "secboot": True, "dbgstat": "disabled"}
# The boolean checks NRAS reports per claims version (from NVIDIA's published claims and samples).
_CHECKS = {
    (GPU, "3.0"): "arch-check attestation-report-parsed attestation-report-nonce-match "
    "attestation-report-signature-verified attestation-report-cert-chain-fwid-match "
    "driver-rim-fetched driver-rim-schema-validated driver-rim-signature-verified "
    "driver-rim-version-match driver-rim-measurements-available vbios-rim-fetched "
    "vbios-rim-schema-validated vbios-rim-signature-verified vbios-rim-version-match "
    "vbios-rim-measurements-available vbios-index-no-conflict",
    (GPU, "2.0"): "arch-check attestation-report-parsed attestation-report-nonce-match "
    "attestation-report-signature-verified attestation-report-cert-chain-validated "
    "driver-rim-fetched driver-rim-schema-validated driver-rim-signature-verified "
    "driver-rim-cert-validated driver-rim-measurements-available vbios-rim-fetched "
    "vbios-rim-schema-validated vbios-rim-signature-verified vbios-rim-cert-validated "
    "vbios-rim-measurements-available vbios-index-no-conflict",
    (SWITCH, "3.0"): "arch-check attestation-report-parsed attestation-report-nonce-match "
    "attestation-report-signature-verified attestation-report-cert-chain-fwid-match "
    "bios-rim-fetched bios-rim-schema-validated bios-rim-signature-verified "
    "bios-rim-version-match bios-rim-measurements-available",
    (SWITCH, "2.0"): "arch-check attestation-report-parsed attestation-report-nonce-match "
    "attestation-report-signature-verified attestation-report-cert-chain-validated "
    "bios-rim-fetched bios-rim-schema-validated bios-rim-signature-verified "
    "bios-rim-cert-validated bios-rim-measurements-available",
}
# Claims 3.0 report each certificate chain as an object.
_CHAINS = {GPU: ("attestation-report", "driver-rim", "vbios-rim"), SWITCH: ("attestation-report", "bios-rim")}


def _builtin(kind: str, version: str) -> dict:
    prefix = f"x-nvidia-{kind.lower()}-"
    detached = {**_STATE, **{prefix + check: True for check in _CHECKS[(kind, version)].split()}}
    if version == "3.0":
        detached.update({f"{prefix}{chain}-cert-chain": CERT_OK for chain in _CHAINS[kind]})
    return {
        "version": "gpulab-builtin",
        "authorization-rules": {
            "type": "JWT",
            "overall-claims": {"x-nvidia-overall-att-result": True, "x-nvidia-ver": version},
            "detached-claims": detached,
        },
    }


@dataclass(frozen=True)
class Policy:
    """One appraisal policy in NVIDIA's format, flattened into (claim path, expected value) checks."""

    overall: tuple[tuple[tuple[str, ...], Any], ...]
    detached: tuple[tuple[tuple[str, ...], Any], ...]
    version: str = ""

    @classmethod
    def from_dict(cls, doc: Any, source: str = "policy") -> "Policy":
        rules = doc.get("authorization-rules") if isinstance(doc, dict) else None
        if not isinstance(rules, dict) or rules.get("type", "JWT") != "JWT":
            raise ConfigError(f"{source}: not an NVIDIA appraisal policy (no JWT 'authorization-rules')")
        overall, detached = rules.get("overall-claims", {}), rules.get("detached-claims", {})
        if not isinstance(overall, dict) or not isinstance(detached, dict) or not detached:
            raise ConfigError(f"{source}: 'overall-claims' must be an object and 'detached-claims' a non-empty one")
        try:
            return cls(_flatten(overall), _flatten(detached), str(doc.get("version", "")))
        except ValueError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def load(cls, path: str, setting: str) -> "Policy":
        try:
            doc = json.loads(Path(path).expanduser().read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"{setting}: cannot read policy {path}: {e}") from None
        return cls.from_dict(doc, f"{setting} ({path})")

    @classmethod
    def builtin(cls, kind: str, version: str) -> "Policy":
        return cls.from_dict(_builtin(kind, version), "built-in policy")

    def overall_violations(self, claims: dict) -> list[str]:
        return mismatches(self.overall, claims)

    def device_violations(self, claims: dict) -> list[str]:
        return mismatches(self.detached, claims)


_MISSING = object()


def _flatten(expected: dict, prefix: tuple[str, ...] = ()) -> tuple:
    out = []
    for name, want in expected.items():
        if isinstance(want, dict):
            if not want:
                raise ValueError(f"empty object for claim {'.'.join((*prefix, name))}")
            out.extend(_flatten(want, (*prefix, name)))
        else:
            out.append(((*prefix, name), want))
    return tuple(out)


def mismatches(checks: tuple, claims: dict) -> list[str]:
    """The checks ``claims`` fails: a claim missing, or not equal to the expected value and type
    (``true`` is neither ``1`` nor ``"true"``)."""
    out = []
    for path, want in checks:
        value = claims.get(path[0], _MISSING)
        for name in path[1:]:
            value = value.get(name, _MISSING) if isinstance(value, dict) else _MISSING
        if value is want or (type(value) is type(want) and value == want):
            continue
        if value is _MISSING:
            out.append(f"{'.'.join(path)} missing")
        else:
            out.append(f"{'.'.join(path)} != {json.dumps(want)}")
    return out


def parse_version(text: Any, base: int) -> tuple[int, ...] | None:
    """``'550.90.07'`` (base 10) or ``'96.00.9F.00.01'`` (base 16) as a comparable tuple; None if unparsable."""
    if not isinstance(text, str) or not text or len(text) > 64:
        return None
    try:
        return tuple(int(part, base) for part in text.split("."))
    except ValueError:
        return None


def device_kind(name: str) -> str | None:
    """``GPU`` or ``SWITCH`` from a detached-EAT key such as ``GPU-0`` / ``SWITCH-3``; None otherwise."""
    kind, _, index = name.partition("-")
    return kind if kind in (GPU, SWITCH) and index.isdigit() and len(index) <= 3 else None


@dataclass
class Appraiser:
    """Applies the policy for each device kind and the configured allow-lists."""

    gpu_policy: Policy | None = None
    switch_policy: Policy | None = None
    hwmodel_allowlist: frozenset[str] = frozenset()
    min_driver_version: str = ""
    min_vbios_version: str = ""
    ueid_denylist: frozenset[str] = frozenset()
    _builtins: dict = field(
        default_factory=lambda: {(k, v): Policy.builtin(k, v) for k in (GPU, SWITCH) for v in CLAIMS_VERSIONS}
    )

    def __post_init__(self):
        for setting in ("min_driver_version", "min_vbios_version"):
            value = getattr(self, setting)
            if value and parse_version(value, 10 if setting == "min_driver_version" else 16) is None:
                raise ConfigError(f"Attestation.{setting}: {value!r} is not a dotted version")

    def policy(self, kind: str, version: str) -> Policy:
        configured = self.gpu_policy if kind == GPU else self.switch_policy
        return configured or self._builtins[(kind, version)]

    def check_overall(self, kind: str, version: str, claims: dict) -> None:
        bad = self.policy(kind, version).overall_violations(claims)
        if bad:
            raise AttestationError(Reason.POLICY_VIOLATION, "overall: " + "; ".join(bad[:5]))

    def check_device(self, name: str, version: str, claims: dict) -> None:
        """Raise ``device_denied`` or ``policy_violation`` unless device ``name``'s claims pass."""
        kind = device_kind(name)
        if claims.get("ueid") in self.ueid_denylist:
            raise AttestationError(Reason.DEVICE_DENIED, f"{name}: ueid is on the deny-list")
        bad = self.policy(kind, version).device_violations(claims)
        if self.hwmodel_allowlist and not hwmodel_allowed(claims.get("hwmodel"), self.hwmodel_allowlist):
            bad.append("hwmodel not in the allow-list")
        if kind == GPU:
            bad += _below(claims, "x-nvidia-gpu-driver-version", self.min_driver_version, 10)
            bad += _below(claims, "x-nvidia-gpu-vbios-version", self.min_vbios_version, 16)
        if bad:
            raise AttestationError(Reason.POLICY_VIOLATION, f"{name}: " + "; ".join(bad[:5]))


def hwmodel_allowed(hwmodel: Any, allowlist: frozenset[str]) -> bool:
    """``hwmodel`` is listed, or its chip is: NVIDIA's published NRAS tokens say ``"GH100 A01 GSP BROM"``
    (chip, revision, signer) and others are reported to say just ``"GH100"``, so an entry ``"GH100"``
    admits both forms; a full entry admits exactly that one."""
    words = hwmodel.split() if isinstance(hwmodel, str) else []
    return bool(words) and (hwmodel in allowlist or words[0] in allowlist)


def _below(claims: dict, claim: str, minimum: str, base: int) -> list[str]:
    if not minimum:
        return []
    have = parse_version(claims.get(claim), base)
    if have is None or have < parse_version(minimum, base):
        return [f"{claim} below {minimum}"]
    return []
