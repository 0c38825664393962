#!/usr/bin/env python
"""What one account per user costs: spawn and job-start latency with ``c.Platform.isolation = "accounts"``
against ``"none"`` (every user as the platform's own account, the way gpulab ran before), in the same run.

    sudo python bench/isolation_bench.py [--users 4] [--jobs 20] [--json out.json]

- spawn: POST /hub/api/users/<u>/server until the hub reports the server ready, for fresh users (so
  "accounts" includes making the account with useradd), then a second spawn of the same users.
- job start: sequential trivial jobs of one user (``python -c 'print(time.time())'``): submit -> the
  stored ``started_at`` ("running") and submit -> the time the job's own code printed ("exec").

Goal (issue 13): accounts / none <= 1.2x. Needs root (accounts). Compare ratios within one run.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.gpulab_up import Platform
from tests.support.jobs import Client

CONFIG = "c.Platform.isolation = {mode!r}\nc.Platform.mlflow_service = False\nc.JobQueue.tick_interval = 0.05\n"


def _ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def measure(mode: str, host: str, users: int, jobs: int, work: Path) -> dict:
    hub = Platform(work / mode / "data", host=host).start(CONFIG.format(mode=mode))
    try:
        names = [f"u{i}" for i in range(users)]
        for name in names:
            hub.create_user(name)
        first, second = [], []
        for rounds in (first, second):
            for name in names:
                t0 = time.monotonic()
                hub.spawn(name)
                rounds.append(time.monotonic() - t0)
                hub.stop_server(name)
        client = Client(hub, names[0])
        running, execs = [], []
        for _ in range(jobs):
            t0 = time.time()
            job = client.submit(entrypoint=["python", "-c", "import time; print(time.time())"])
            done = client.wait(job["id"])
            assert done["state"] == "succeeded", client.logs(job["id"])
            running.append(_ts(done["started_at"]) - t0)
            execs.append(float(client.logs(job["id"]).split()[0]) - t0)
        return {"first spawn": first, "second spawn": second, "job running": running, "job exec": execs}
    finally:
        hub.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("isolation_bench: needs root (isolation 'accounts' starts processes as other accounts)")
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        results = {
            mode: measure(mode, host, args.users, args.jobs, work)
            for mode, host in (("none", "127.0.0.41"), ("accounts", "127.0.0.42"))
        }
    rows = {}
    print(f"{'measure':<14} {'none p50':>10} {'accounts p50':>13} {'ratio':>7}")
    for name in results["none"]:
        base, iso = statistics.median(results["none"][name]), statistics.median(results["accounts"][name])
        rows[name] = {"none_p50_s": base, "accounts_p50_s": iso, "ratio": iso / base}
        print(f"{name:<14} {base * 1000:>8.0f}ms {iso * 1000:>11.0f}ms {iso / base:>6.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": rows, "samples": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
