"""The ``Attestation`` section of ``gpulab_config.py`` and the URL allow-list check."""

from urllib.parse import urlsplit

from traitlets import Bool, Float, Integer, List, Set, Unicode, default
from traitlets.config import Configurable

from ..data_dir import configured_data_dir
from ..errors import ConfigError

NRAS_URL = "https://nras.attestation.nvidia.com"
LOOPBACK = "127.0.0.1"


class Attestation(Configurable):
    """Verification of NVIDIA Remote Attestation Service (NRAS) tokens for GPU nodes."""

    nras_url = Unicode(NRAS_URL, help="NRAS base URL; evidence is posted to <nras_url>/v4/attest/<device>.").tag(
        config=True
    )
    jwks_url = Unicode(help="JWKS with NRAS's signing keys (default <nras_url>/.well-known/jwks.json).").tag(
        config=True
    )
    allowed_hosts = Set(
        Unicode(), {"nras.attestation.nvidia.com"}, help="The only hosts (https) jwks_url and nras_url may name."
    ).tag(config=True)
    allow_insecure_localhost = Bool(
        False, help="Tests and development only: also allow http://127.0.0.1 for jwks_url and nras_url."
    ).tag(config=True)
    issuer = Unicode(NRAS_URL, help="Required 'iss' of every token.").tag(config=True)
    leeway = Float(30.0, help="Seconds of clock skew tolerated on iat/nbf/exp.").tag(config=True)
    max_age = Float(600.0, help="Reject tokens issued longer ago than this many seconds.").tag(config=True)
    max_eat_bytes = Integer(131072, help="Largest detached EAT (JSON text) accepted.").tag(config=True)
    max_devices = Integer(16, help="Most device tokens (GPUs, NVSwitches) in one EAT.").tag(config=True)
    jwks_ttl = Float(900.0, help="Seconds a fetched JWKS is trusted.").tag(config=True)
    jwks_refresh_cooldown = Float(30.0, help="Least seconds between JWKS refreshes forced by an unknown kid.").tag(
        config=True
    )
    http_timeout = Float(10.0, help="Timeout (s) of JWKS fetches; NRAS calls get three times this.").tag(config=True)
    jti_cache_size = Integer(100_000, help="Token ids remembered (for max_age) to refuse replays.").tag(config=True)
    nonce_ttl = Float(300.0, help="Seconds an issued nonce stays usable.").tag(config=True)
    db_url = Unicode(
        help="SQLAlchemy URL of the nonce and node-state tables (default SQLite in the data dir's "
        "jobs/, which the job service owns)."
    ).tag(config=True)
    policy_file = Unicode(help="GPU appraisal policy (NVIDIA policy JSON); default: the built-in strict one.").tag(
        config=True
    )
    switch_policy_file = Unicode(help="NVSwitch appraisal policy (NVIDIA policy JSON); default: built-in.").tag(
        config=True
    )
    hwmodel_allowlist = Set(
        Unicode(),
        help="If set, the only accepted 'hwmodel' values or chips, e.g. "
        "{'GH100', 'GB100'} (a chip admits 'GH100 A01 GSP BROM' and 'GH100').",
    ).tag(config=True)
    min_driver_version = Unicode(help="Lowest accepted GPU driver version, e.g. '550.90.07'.").tag(config=True)
    min_vbios_version = Unicode(help="Lowest accepted GPU VBIOS version, e.g. '96.00.9F.00.01'.").tag(config=True)
    ueid_denylist = Set(Unicode(), help="Device UEIDs that are refused ('device_denied').").tag(config=True)
    api_key_file = Unicode(help="0600 file with the NRAS API key (else $GPULAB_NRAS_API_KEY, removed on read).").tag(
        config=True
    )
    nonce_rate = Float(0.5, help="Nonces per second each client may request (sustained).").tag(config=True)
    nonce_burst = Integer(10, help="Nonce requests a client may make at once.").tag(config=True)
    verify_rate = Float(0.5, help="Verifications per second each client may request (sustained).").tag(config=True)
    verify_burst = Integer(10, help="Verification requests a client may make at once.").tag(config=True)
    max_failures = Integer(5, help="Consecutive failed verifications before a client is locked out.").tag(config=True)
    lockout_seconds = Float(300.0, help="How long a locked-out client is refused.").tag(config=True)
    audit_log_file = Unicode(help="If set, audit JSON lines go to this (0600) file instead of the app log.").tag(
        config=True
    )
    audit_burst = Integer(20, help="Audit records per (reason, client) per audit_window; the rest are counted.").tag(
        config=True
    )
    audit_window = Float(60.0, help="Seconds of the audit rate-limit window.").tag(config=True)
    collector_command = List(
        Unicode(),
        ["nvattest", "collect-evidence", "--device", "{device}", "--nonce", "{nonce}", "--format", "json"],
        help="`gpulab attest collect` on a GPU node: the evidence collector's argv; {nonce} and {device} "
        "(nvattest's name: gpu or nvswitch) are filled in. It prints nvattest's JSON evidence document.",
    ).tag(config=True)
    direct_collector_command = List(
        Unicode(),
        [
            "nvattest",
            "attest",
            "--device",
            "{device}",
            "--verifier",
            "remote",
            "--nonce",
            "{nonce}",
            "--format",
            "json",
        ],
        help="`gpulab attest collect --direct-token`: a command that gets NRAS's detached EAT itself (a node "
        "with its own NRAS access) and prints nvattest's attest JSON (or the bare EAT).",
    ).tag(config=True)
    collector_timeout = Float(120.0, help="Seconds the collector may run before it is killed.").tag(config=True)

    @default("jwks_url")
    def _default_jwks_url(self):
        return self.nras_url.rstrip("/") + "/.well-known/jwks.json"

    @default("db_url")
    def _default_db_url(self):
        return f"sqlite:///{configured_data_dir(self.config) / 'jobs' / 'attestation.sqlite'}"

    def check(self) -> None:
        """Raise ``ConfigError`` unless the service URLs pass the host allow-list."""
        for name in ("jwks_url", "nras_url"):
            check_url(getattr(self, name), self.allowed_hosts, self.allow_insecure_localhost, f"Attestation.{name}")


def check_url(url: str, allowed_hosts: set[str], allow_insecure_localhost: bool, setting: str) -> str:
    """``url`` if it is https to an allowed host (or http://127.0.0.1 when allowed); else ``ConfigError``."""
    if any(c in url for c in "\\ \t\r\n"):
        raise ConfigError(f"{setting}: {url!r} contains a backslash or whitespace")
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ConfigError(f"{setting}: {url!r} must not carry credentials, a query or a fragment")
    if parts.scheme == "https" and host in {h.lower() for h in allowed_hosts}:
        return url
    if allow_insecure_localhost and parts.scheme in ("http", "https") and host == LOOPBACK:
        return url
    raise ConfigError(
        f"{setting}: {url!r} is not https to one of Attestation.allowed_hosts ({', '.join(sorted(allowed_hosts))})"
    )
