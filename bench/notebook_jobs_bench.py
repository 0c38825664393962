#!/usr/bin/env python
"""Benchmark of notebook jobs and schedules against real parts (hub + proxy + gpulab-jobs, papermill, a kernel).

    python bench/notebook_jobs_bench.py [--rounds N] [--schedules N] [--only latency,schedules] [--json out.json]

Sections (goals from issue 16, "Benchmarks"), each with its baseline measured in the same run:

1. latency: submit -> the notebook's first cell executing, for a notebook job through the platform (POST /jobs
   through the hub's proxy, the queue, the local executor, the runner, papermill, a new kernel) against papermill
   run directly on the same notebook with the same parameters (its own kernel start included), alternating,
   ``--rounds`` each. "Executing" is when the cell itself wrote ``time.time()``. Goal: <= 1.3x.
2. schedules: ``--schedules`` schedules of one user, every minute ("* * * * *"), made just after a minute began;
   each run's created_at against its due time (the next minute), for the first minute. Their jobs go to a pool
   no executor offers, so that the runs stay queued and only the scheduler is measured. Goal: every run within 2 s.

The machine may be shared: compare within one run. Everything started is stopped by PID at the end.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from jobs_bench import HOSTS, Bench, Tracker, epoch, log, pct  # noqa: E402 (the bench's own platform plumbing)

from gpulab.kernels.client import notebook_spec  # noqa: E402

NOTEBOOK = {
    "nbformat": 4,
    "nbformat_minor": 5,
    "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
    "cells": [
        {
            "id": "p",
            "cell_type": "code",
            "source": "mark = ''",
            "metadata": {"tags": ["parameters"]},
            "outputs": [],
            "execution_count": None,
        },
        {
            "id": "first",
            "cell_type": "code",
            "source": "import time\nopen(mark, 'w').write(repr(time.time()))",
            "metadata": {},
            "outputs": [],
            "execution_count": None,
        },
        {
            "id": "work",
            "cell_type": "code",
            "source": "sum(range(1000))",
            "metadata": {},
            "outputs": [],
            "execution_count": None,
        },
    ],
}


def wait_for(path: Path, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while not path.exists() or not path.read_text():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} was not written in {timeout:g} s")
        time.sleep(0.01)
    return float(path.read_text())


def papermill_once(work: Path, i: int) -> float:
    source, mark = work / f"direct-{i}.ipynb", work / f"direct-{i}.mark"
    source.write_text(json.dumps(NOTEBOOK))
    started = time.time()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "papermill",
            "--no-progress-bar",
            "-p",
            "mark",
            str(mark),
            str(source),
            str(work / f"direct-{i}.out.ipynb"),
        ],
        check=True,
        capture_output=True,
        cwd=work,
    )
    return float(mark.read_text()) - started


def gpulab_once(bench: Bench, session: requests.Session, work: Path, i: int) -> float:
    source, mark = work / f"job-{i}.ipynb", work / f"job-{i}.mark"
    source.write_text(json.dumps(NOTEBOOK))
    spec = notebook_spec(source, {"mark": str(mark)}, name=f"bench-{i}")
    started = time.time()
    r = session.post(bench.base + "/jobs", json=spec, timeout=30)
    r.raise_for_status()
    return wait_for(mark, 120) - started


def latency(bench: Bench, rounds: int, work: Path) -> dict:
    session = bench.session()
    direct, platform = [], []
    gpulab_once(bench, session, work, -1)  # warm: the first kernel start of each path reads more from disk
    papermill_once(work, -1)
    for i in range(rounds):
        log(f"latency round {i + 1}/{rounds}")
        platform.append(gpulab_once(bench, session, work, i))
        direct.append(papermill_once(work, i))
    return {"gpulab": platform, "papermill": direct}


def schedules(bench: Bench, n: int) -> dict:
    session = bench.session()
    while datetime.now().second > 5:  # make them early in a minute, so that all are in before the next
        time.sleep(0.5)
    job = {"name": "tick", "entrypoint": ["true"], "resources": {"pool": "parked"}}
    made = []
    for i in range(n):
        body = {"name": f"every-minute-{i}", "cron": "* * * * *", "job": job}
        r = session.post(bench.base + "/schedules", json=body, timeout=30)
        r.raise_for_status()
        made.append(r.json())
    due = {s["id"]: epoch(s["next_run_at"]) for s in made}
    log(f"{n} schedules made; waiting for {made[0]['next_run_at']}")
    time.sleep(max(0.0, max(due.values()) - time.time()) + 5)
    runs = session.get(bench.base + "/jobs", params={"limit": 500}, timeout=30).json()["jobs"]
    lags = [epoch(j["created_at"]) - due[j["schedule_id"]] for j in runs if j.get("schedule_id") in due]
    return {"made": n, "runs": len(lags), "lags": lags}


def report(res: dict) -> str:
    lines = [f"notebook jobs benchmark {res['date']} on {os.cpu_count()} cores", ""]
    if "latency" in res:
        g, p = res["latency"]["gpulab"], res["latency"]["papermill"]
        gm, pm = statistics.median(g), statistics.median(p)
        lines += [
            "## 1. Submit -> first cell executing",
            "",
            "| path | n | median s | p90 s | vs papermill |",
            "| --- | ---: | ---: | ---: | ---: |",
            f"| papermill run directly | {len(p)} | {pm:.2f} | {pct(p, 90):.2f} | 1.00x |",
            f"| notebook job through the platform | {len(g)} | {gm:.2f} | {pct(g, 90):.2f} | {gm / pm:.2f}x |",
            "",
            f"goal <= 1.3x: {'met' if gm / pm <= 1.3 else 'not met'}",
            "",
        ]
    if "schedules" in res:
        s = res["schedules"]
        lags = s["lags"] or [float("nan")]
        lines += [
            "## 2. Schedules due in the same minute",
            "",
            f"{s['made']} schedules, {s['runs']} runs started; created_at - due time: median {statistics.median(lags):.2f} s,"
            f" max {max(lags):.2f} s",
            "",
            f"goal every run within 2 s: {'met' if s['runs'] == s['made'] and max(lags) <= 2 else 'not met'}",
        ]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--schedules", type=int, default=100)
    ap.add_argument("--only", default="latency,schedules")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    only = set(args.only.split(","))
    work = Path(tempfile.mkdtemp(prefix="gpulab-notebook-bench-"))
    tracker = Tracker()
    res: dict = {"date": datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")}
    extra = f"c.Scheduler.max_per_user = {args.schedules}\n"
    try:
        bench = Bench(tracker, work, HOSTS[0], f"sqlite:///{work / 'jobs' / 'jobs.sqlite'}", extra)
        if "latency" in only:
            res["latency"] = latency(bench, args.rounds, work)
        if "schedules" in only:
            res["schedules"] = schedules(bench, args.schedules)
    finally:
        tracker.stop_all()
    print(report(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
