"""``gpulab attest collect``: attest this GPU node to the platform, from the node (e.g. from a systemd timer).

1. ``POST <url>/attestation/nonce {"node"}`` with the node's own credential (``gpulab nodes enroll``
   printed it: ``node:<name>:<secret>``), or an admin's hub token: nobody else may attest a node;
2. NVIDIA's collector (``c.Attestation.collector_command``, default ``nvattest collect-evidence``) runs
   in its own short-lived process: no stdin, stderr discarded, a minimal environment (``PATH``,
   ``LD_LIBRARY_PATH``; ``HOME`` and ``TMPDIR`` = its working directory), a private (0700) temporary
   working directory deleted afterwards (NVIDIA's SDKs write DEBUG logs into the cwd), its own
   process group, killed after ``c.Attestation.collector_timeout``. No NVIDIA code runs in this process;
3. the evidence list it prints goes to ``POST <url>/attestation/evidence``: gpulab-jobs relays it to
   NRAS with the platform's API key (which never reaches GPU nodes) and verifies NRAS's EAT. With
   ``--direct-token`` the command (``direct_collector_command``, default ``nvattest attest --verifier
   remote``) gets the EAT from NRAS itself, and the EAT goes to ``POST <url>/attestation/verify``.

Prints one line, the verdict. Exit 0: the node is valid; 1: refused (with the reason code), the
collector failed, or the platform could not be reached; 2: usage or configuration (``gpulab: error:``).
The token, the evidence and the EAT are never printed, nor is anything the collector writes.
"""

import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from urllib.parse import urlsplit

import requests

from ..config import instances, load_config
from ..errors import ConfigError
from ..secrets import Secret, read_secret_file
from .service import NODE_NAME

NVATTEST_DEVICE = {"gpu": "gpu", "switch": "nvswitch"}  # what {device} becomes in the collector's argv
DEFAULT_ARCH = {"gpu": "HOPPER", "switch": "LS10"}
MAX_OUTPUT = 4 * 1024 * 1024
NONCE = re.compile("[0-9a-f]{64}")
HTTP_TIMEOUT = 90.0  # the platform may ask NRAS (30 s) and fetch its signing keys


class Failed(Exception):
    """This attestation did not succeed (exit 1); the message ends the one line printed."""


def collect(args) -> int:
    """Run ``gpulab attest collect`` for ``args`` (argparse namespace); return the exit code."""
    settings = instances(load_config())["Attestation"]
    if not NODE_NAME.fullmatch(args.node):
        raise ConfigError(f"--node: {args.node!r} must match {NODE_NAME.pattern}")
    token = hub_token(args.token_file)
    check_credential(token, args.node)
    platform = Platform(platform_url(args.url), token)
    command = args.collector or (settings.direct_collector_command if args.direct_token else settings.collector_command)
    try:
        nonce = platform.post("/attestation/nonce", {"node": args.node}).get("nonce")
        if not isinstance(nonce, str) or not NONCE.fullmatch(nonce):  # it goes into the collector's argv
            raise Failed("not attested: the platform's nonce is not 64 hex digits")
        doc, returncode = run_collector(command, nonce=nonce, device=args.device, timeout=settings.collector_timeout)
        if args.direct_token:
            result = platform.post(
                "/attestation/verify", {"node": args.node, "nonce": nonce, "token": eat_from(doc, returncode)}
            )
        else:
            evidence_list, arch = evidence_from(doc, returncode, args.device)
            result = platform.post(
                "/attestation/evidence",
                {
                    "node": args.node,
                    "nonce": nonce,
                    "device": args.device,
                    "arch": arch,
                    "evidence_list": evidence_list,
                },
            )
    except Failed as e:
        print(f"gpulab: attest: node {args.node} {e}", file=sys.stderr)
        return 1
    devices = ", ".join(sorted(result["devices"])) or "none"
    print(
        f"gpulab: attest: node {args.node} valid: fingerprint {result['fingerprint']}, devices {devices}, "
        f"token expires {result['expires_at']}"
    )
    return 0


def platform_url(url: str | None) -> str:
    """The platform's API base (``--url``, else ``$GPULAB_JOBS_URL``): https, or http to this machine only."""
    url = (url or os.environ.get("GPULAB_JOBS_URL") or "").rstrip("/")
    if not url:
        raise ConfigError("no platform URL: pass --url (the job service's .../api/v1) or set GPULAB_JOBS_URL")
    parts = urlsplit(url)
    if parts.scheme == "https" or (parts.scheme == "http" and _is_loopback(parts.hostname or "")):
        return url
    raise ConfigError(f"--url: {url!r} must be https (plain http only to this machine): it carries your token")


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def hub_token(token_file: str | None) -> Secret:
    """The hub token: from ``--token-file`` (owner-only) or ``$JUPYTERHUB_API_TOKEN``."""
    if token_file:
        return read_secret_file(token_file, "--token-file")
    value = os.environ.get("JUPYTERHUB_API_TOKEN")
    if not value:
        raise ConfigError(
            "no hub token: pass --token-file (mode 0600, the node's credential from gpulab nodes "
            "enroll) or set JUPYTERHUB_API_TOKEN"
        )
    return Secret(value, source="$JUPYTERHUB_API_TOKEN")


def check_credential(token: Secret, node: str) -> None:
    """A node credential speaks for its own node only: say so before the platform refuses it."""
    value = token.reveal()
    if value.startswith("node:") and value.removeprefix("node:").rpartition(":")[0] != node:
        raise ConfigError(f"--node: the credential in use was enrolled for another node than {node!r}")


class Platform:
    """The platform's attestation API (``<url>/attestation/...``) called with a hub token."""

    def __init__(self, url: str, token: Secret):
        self.url = url
        self.token = token

    def post(self, path: str, body: dict) -> dict:
        """The JSON answer; ``ConfigError`` if the token is refused (401/403), else ``Failed`` on any error."""
        try:
            response = requests.post(
                self.url + path,
                json=body,
                timeout=HTTP_TIMEOUT,
                allow_redirects=False,
                headers={"Authorization": f"token {self.token.reveal()}"},
            )
        except requests.RequestException as e:
            raise Failed(f"not attested: cannot reach the platform at {self.url} ({type(e).__name__})") from None
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if response.status_code == 200 and isinstance(answer, dict):
            return answer
        error = answer.get("error") if isinstance(answer, dict) else None
        error = error if isinstance(error, dict) else {}
        code = _one_line(error.get("code") or f"HTTP {response.status_code}")
        message = _one_line(error.get("message") or "no error message")
        if response.status_code in (401, 403):
            raise ConfigError(f"the platform refused the token at {self.url}{path} ({code}: {message})")
        raise Failed(f"refused: {code}: {message}")


def run_collector(argv: list[str], *, nonce: str, device: str, timeout: float) -> tuple[object, int]:
    """Run the collector as the module docstring says; the JSON document it printed and its exit status."""
    argv = [arg.replace("{nonce}", nonce).replace("{device}", NVATTEST_DEVICE[device]) for arg in argv]
    with tempfile.TemporaryDirectory(prefix="gpulab-attest-") as workdir:
        env = {"PATH": os.environ.get("PATH", os.defpath), "HOME": workdir, "TMPDIR": workdir}
        if os.environ.get("LD_LIBRARY_PATH"):
            env["LD_LIBRARY_PATH"] = os.environ["LD_LIBRARY_PATH"]
        try:
            proc = subprocess.Popen(
                argv,
                cwd=workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError as e:
            raise ConfigError(
                f"collector {argv[0]!r} cannot be started ({e.strerror}): install NVIDIA's nvattest "
                "or set c.Attestation.collector_command / --collector"
            ) from None
        try:
            stdout, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            proc.communicate()
            raise Failed(f"not attested: the collector did not finish in {timeout:g}s and was killed") from None
        _kill_group(proc.pid)  # nothing it started outlives it
    if len(stdout) > MAX_OUTPUT:
        raise Failed(f"not attested: the collector printed more than {MAX_OUTPUT} bytes")
    return _json_document(stdout.decode(errors="replace")), proc.returncode


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _json_document(text: str):
    """The first JSON document that starts a line (log lines before it are skipped), or None."""
    decoder = json.JSONDecoder()
    for start in re.finditer(r"^[\[{]", text, re.MULTILINE):
        try:
            return decoder.raw_decode(text, start.start())[0]
        except ValueError:
            continue
    return None


def evidence_from(doc, returncode: int, device: str) -> tuple[list[dict], str]:
    """The evidence list and architecture (the first device's) from nvattest's ``{"evidences": [...],
    "result_code": 0, ...}`` or a bare list, as the Python SDK's ``get_evidence()`` returns; else ``Failed``."""
    items = doc.get("evidences") if isinstance(doc, dict) else doc
    sdk_failed = isinstance(doc, dict) and doc.get("result_code", 0) != 0
    if returncode or sdk_failed or not isinstance(items, list) or not items or not all(map(_is_evidence, items)):
        raise _collector_failed(doc, returncode)
    evidence_list = [{"evidence": e["evidence"], "certificate": e["certificate"]} for e in items]
    return evidence_list, items[0].get("arch") or DEFAULT_ARCH[device]  # the platform checks it


def _is_evidence(item) -> bool:
    return isinstance(item, dict) and all(isinstance(item.get(k), str) and item[k] for k in ("evidence", "certificate"))


def eat_from(doc, returncode: int):
    """NRAS's detached EAT from nvattest attest's ``{"detached_eat": [...], ...}`` or the bare EAT.

    Posted whatever the collector's exit status (nvattest also prints the EAT of a failed
    attestation): the platform's own verdict then records the failure against the node.
    """
    eat = doc.get("detached_eat") if isinstance(doc, dict) else doc
    if not (isinstance(eat, (list, str)) and eat):
        raise _collector_failed(doc, returncode)
    return eat


def _collector_failed(doc, returncode: int) -> Failed:
    detail = f"exited with status {returncode}" if returncode else "printed no usable JSON"
    if isinstance(doc, dict) and "result_code" in doc:
        detail += f" (nvattest result {_one_line(doc['result_code'])}: {_one_line(doc.get('result_message'))})"
    return Failed(f"not attested: the collector failed: {detail}")


def _one_line(value, limit: int = 200) -> str:
    """``value`` as printable text on one line, at most ``limit`` characters (it came from elsewhere)."""
    text = " ".join("".join(c if c.isprintable() else " " for c in str(value)).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
