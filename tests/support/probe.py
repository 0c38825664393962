"""What a user's code can reach of others: run as a kernel cell or a job, it prints ``PROBE <json>``.

Sent as source text (see :func:`probe_source`), it takes its targets from the ``TARGETS`` it is given:
``files`` (paths to try to read, known or guessed), ``trees`` (directories to walk, reading what
it can), ``sockets`` (unix sockets to connect to) and ``urls`` (HTTP endpoints to call without a
credential). A finding is anything of another account that it could read or use: a process
environment, a file, a directory listing, a socket it could connect to, a URL that answered. Command lines are world-readable by design (``/proc/<pid>/cmdline``), so
they are returned for the test to search for the secrets it knows.
"""

import json
import os
import pwd
import socket
import urllib.error
import urllib.request
from pathlib import Path


def probe(targets: dict) -> dict:
    me = os.getuid()
    findings, cmdlines, probes = [], [], 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            owner = entry.stat().st_uid
            cmdline = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # gone meanwhile
        if owner == me:
            continue
        cmdlines.append(cmdline)
        probes += 1
        try:
            if Path(entry.path, "environ").read_bytes():
                findings.append(f"environ of pid {entry.name} ({cmdline[:60]}) of uid {owner}")
        except OSError:
            pass

    def try_read(path: str) -> None:
        nonlocal probes
        probes += 1
        try:
            st = os.lstat(path)
            if st.st_uid == me:
                return
            with open(path, "rb") as f:
                f.read(1)
            findings.append(f"read {path} of uid {st.st_uid}")
        except OSError:
            pass

    for path in targets.get("files", []):
        try_read(path)
    for tree in targets.get("trees", []):
        for root, _dirs, files in os.walk(tree):
            if os.lstat(root).st_uid != me:
                findings.append(f"listed {root}")
            for name in files:
                try_read(os.path.join(root, name))
        probes += 1
    for path in targets.get("sockets", []):
        probes += 1
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(path)
                findings.append(f"connected to {path}")
            except OSError:
                pass
    for url in targets.get("urls", []):
        probes += 1
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                findings.append(f"{url} answered {r.status} without a credential")
        except (urllib.error.URLError, OSError):  # refused (an HTTP error status) or unreachable
            pass
    return {"me": pwd.getpwuid(me).pw_name, "findings": findings, "cmdlines": cmdlines, "probes": probes}


def probe_source(targets: dict) -> str:
    """Python source that runs the probe on ``targets`` and prints its result on one ``PROBE`` line."""
    return f"{Path(__file__).read_text()}\nprint('PROBE ' + json.dumps(probe({json.dumps(targets)!s})))\n"


def parse(output: str) -> dict:
    """The probe's result from its output."""
    [line] = [line for line in output.splitlines() if line.startswith("PROBE ")]
    return json.loads(line[len("PROBE ") :])
