#!/usr/bin/env python
"""Benchmark of notebook jobs and schedules against real parts (hub + proxy + gpulab-jobs, papermill, a kernel).

    python bench/notebook_jobs_bench.py [--rounds N] [--schedules N] [--only latency,schedules,jupyter-scheduler]
                                        [--scheduler-venv DIR] [--json out.json]

Sections (goals from issue 16, "Benchmarks"), each with its baseline measured in the same run:

1. latency: submit -> the notebook's first cell executing, for a notebook job through the platform (POST /jobs
   through the hub's proxy, the queue, the local executor, the runner, papermill, a new kernel) against papermill
   run directly on the same notebook with the same parameters (its own kernel start included), alternating,
   ``--rounds`` each. "Executing" is when the cell itself wrote ``time.time()``. Goal: <= 1.3x.
2. schedules: ``--schedules`` schedules of one user, every minute ("* * * * *"), made just after a minute began;
   each run's created_at against its due time (the next minute), for the first minute. Their jobs go to a pool
   no executor offers, so that the runs stay queued and only the scheduler is measured. Goal: every run within 2 s.
3. jupyter-scheduler: submit -> first cell executing for jupyter-scheduler's own notebook jobs (POST /scheduler/jobs
   to a jupyter server of its own venv, ``--scheduler-venv``, made here with pip on first use so that its pins stay
   out of the project's), with the same notebook and the same definition of "executing", ``--rounds`` times. With
   ``latency`` in the same invocation its rounds alternate with that section's two paths, so that all three share
   one machine state; alone, they alternate with papermill run directly, and no platform runs. The issue's
   anchor: 5.1-5.5 s from submit to running on this machine.

The machine may be shared: compare within one run. Everything started is stopped by PID at the end.
"""

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import psutil
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from jobs_bench import HOSTS, Bench, Tracker, cmdline, epoch, log, pct  # noqa: E402 (the bench's own platform plumbing)

from gpulab.kernels.client import notebook_spec  # noqa: E402
from gpulab.net import free_port  # noqa: E402
from tests.support.processes import alive, terminate  # noqa: E402

SECTIONS = ("latency", "schedules", "jupyter-scheduler")
SCHEDULER_PIN = "jupyter-scheduler==2.12.1"
ROUND_TIMEOUT = 120  # s from a submission to its first cell; a job that never gets there fails its round

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


def latency(bench: Bench, rounds: int, work: Path, scheduler: "SchedulerRounds | None" = None) -> dict:
    """With ``scheduler``, jupyter-scheduler's rounds join the alternation: the three paths share whatever load
    the machine has, and section 3 sets them against the same papermill runs."""
    session = bench.session()
    direct, platform = [], []
    gpulab_once(bench, session, work, -1)  # warm: the first kernel start of each path reads more from disk
    papermill_once(work, -1)
    if scheduler:
        scheduler.round(-1)
        scheduler.res.update(papermill=direct, papermill_runs="section 1's, alternating with gpulab and it")
    for i in range(rounds):
        log(f"latency round {i + 1}/{rounds}")
        platform.append(gpulab_once(bench, session, work, i))
        direct.append(papermill_once(work, i))
        if scheduler:
            scheduler.round(i)
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


class SchedulerUnavailable(Exception):
    """jupyter-scheduler could not be installed or started: the section reports why instead of a figure."""


def scheduler_venv(path: Path) -> Path:
    """The python of a venv holding ``SCHEDULER_PIN`` and ipykernel, made (or completed) with pip unless it already
    does: jupyter-scheduler pins SQLAlchemy 2, pytz <= 2024.2 and croniter ~= 1.4, and brings a jupyter_server
    extension of its own, none of which belongs in the project's .venv."""
    python = path / "bin" / "python"
    probe = "import ipykernel, jupyter_scheduler; print(jupyter_scheduler.__version__)"
    want = SCHEDULER_PIN.split("==")[1]
    if python.exists():
        got = subprocess.run([str(python), "-c", probe], capture_output=True, text=True)
        if got.returncode == 0 and got.stdout.strip() == want:
            return python
    log(f"installing {SCHEDULER_PIN} and ipykernel into {path} (about a minute)")
    steps = [
        [sys.executable, "-m", "venv", str(path)],
        [str(python), "-m", "pip", "install", "--quiet", SCHEDULER_PIN, "ipykernel"],
    ]
    for cmd in steps:
        try:
            subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
        except subprocess.CalledProcessError as e:
            tail = (e.stderr or e.stdout or "").strip().splitlines()[-3:]
            raise SchedulerUnavailable(
                f"{' '.join(cmd)} failed ({' / '.join(tail)}); fix that, or give --scheduler-venv a venv that has"
                f" {SCHEDULER_PIN} and ipykernel"
            ) from e
        except subprocess.TimeoutExpired as e:
            raise SchedulerUnavailable(f"{' '.join(cmd)} took over 600 s; is PyPI reachable from here?") from e
    return python


class SchedulerServer:
    """That venv's ``jupyter server`` on 127.0.0.1, with jupyter-scheduler (its wheel enables the extension in the
    venv's etc/jupyter/jupyter_server_config.d), a random token, and a temporary root dir. Jupyter's config, data
    and runtime dirs are temporary too: the scheduler keeps its database and its jobs' staging area in the data dir
    (``SchedulerApp.db_url``, ``Scheduler.staging_path``), and no user config may change what is measured."""

    def __init__(self, python: Path, work: Path):
        self.root, jupyter_dirs = work / "root", work / "home"
        self.root.mkdir()
        env = dict(os.environ)
        for var in ("JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR"):
            env[var] = str(jupyter_dirs / var.split("_")[1].lower())
            Path(env[var]).mkdir(parents=True)  # the scheduler's SQLite file cannot be opened in a missing dir
        port, token = free_port("127.0.0.1"), secrets.token_hex(24)
        self.url = f"http://127.0.0.1:{port}"
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"token {token}"
        self.log_path = work / "server.log"
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen(
                [
                    str(python.parent / "jupyter-server"),
                    "--no-browser",
                    "--allow-root",
                    "--ServerApp.ip=127.0.0.1",
                    f"--ServerApp.port={port}",
                    "--ServerApp.port_retries=0",
                    f"--IdentityProvider.token={token}",
                    f"--ServerApp.root_dir={self.root}",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.root,
            )
        self.server = psutil.Process(self.proc.pid)
        self.children: dict[int, psutil.Process] = {}
        try:
            self.environment = self._wait_up(60)
        except BaseException:
            self.stop()
            raise

    def _wait_up(self, timeout: float) -> str:
        """Wait for the scheduler's API to answer; the name of its runtime environment, which a job must give
        (without conda, its CondaEnvironmentManager offers only the server's own python, named after it)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise SchedulerUnavailable(f"jupyter server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                r = self.session.get(self.url + "/scheduler/runtime_environments", timeout=5)
            except requests.RequestException:
                r = None
            if r is not None and r.status_code == 200:
                return r.json()[0]["name"]
            if r is not None and r.status_code == 404:  # the server loads its extensions before it listens
                said = [x for x in self.log_path.read_text(errors="replace").splitlines() if "jupyter_scheduler" in x]
                raise SchedulerUnavailable("the jupyter server runs without jupyter_scheduler:\n" + "\n".join(said))
            if time.monotonic() > deadline:
                raise SchedulerUnavailable(f"jupyter-scheduler did not answer in {timeout:g} s:\n{self.log_tail()}")
            time.sleep(0.2)

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def record(self) -> None:
        """Remember the server's descendants (each job runs in a spawned process that starts the kernel), so that
        ``stop`` can end those that outlive the server."""
        try:
            for p in self.server.children(recursive=True):
                self.children.setdefault(p.pid, p)
        except psutil.NoSuchProcess:
            pass

    def wait_idle(self, timeout: float) -> None:
        """Wait until the server's job processes have ended: one goes on for about half a second of CPU after it
        has set its job COMPLETED, which would otherwise slow the next round. multiprocessing's resource tracker
        stays for the server's life."""
        deadline = time.monotonic() + timeout
        while busy := [
            p for p in self.server.children(recursive=True) if alive(p) and "resource_tracker" not in cmdline(p)
        ]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"job processes {[p.pid for p in busy]} still run {timeout:g} s after completing")
            time.sleep(0.05)

    def job(self, job_id: str) -> dict:
        r = self.session.get(f"{self.url}/scheduler/jobs/{job_id}", timeout=30)
        r.raise_for_status()
        return r.json()

    def stop(self) -> None:
        """Idempotent: ``main`` stops the server once its rounds are done, and again on the way out."""
        self.record()
        terminate([self.server], 10)
        self.proc.wait()
        terminate([p for p in self.children.values() if alive(p)], 5)


def wait_job(server: SchedulerServer, job_id: str, mark: Path, timeout: float) -> tuple[float, dict]:
    """The time the first cell wrote into ``mark``, then the job's record once it is done: the next round must not
    share the CPUs with this job's kernel. The record is read every 0.5 s only, as the server that spawns the job
    is on the path being measured; a failed job ends the wait at once, with its status message. (STOPPED is no
    failure here: a job reads STOPPED, the ORM's default status in orm.py, until its process sets IN_PROGRESS.)"""
    deadline = time.monotonic() + timeout
    first, job, polled = None, {}, 0.0
    while True:
        if first is None and mark.exists() and mark.read_text():
            first = float(mark.read_text())
        if time.monotonic() - polled > 0.5 or first is not None:
            server.record()
            job, polled = server.job(job_id), time.monotonic()
            if job["status"] == "FAILED":
                raise RuntimeError(f"job {job_id} {job['status']}: {job.get('status_message')}")
            if first is not None and job["status"] == "COMPLETED":
                return first, job
        if time.monotonic() > deadline:
            where = "its first cell did not run" if first is None else "it did not complete"
            raise TimeoutError(f"job {job_id} is {job.get('status')} after {timeout:g} s: {where}")
        time.sleep(0.01 if first is None else 0.1)


def scheduler_once(server: SchedulerServer, work: Path, i: int) -> dict:
    """One notebook job through jupyter-scheduler's REST API (the body is models.py's CreateJob; input_uri is
    relative to the server's root dir). Its parameters are written into the notebook as ``key = value`` lines
    (parameterize.py), so a string goes in as a Python literal."""
    name, mark = f"scheduler-{i}.ipynb", work / f"scheduler-{i}.mark"
    (server.root / name).write_text(json.dumps(NOTEBOOK))
    body = {
        "name": f"bench-{i}",
        "input_uri": name,
        "input_filename": name,
        "runtime_environment_name": server.environment,
        "output_formats": ["ipynb"],
        "parameters": {"mark": repr(str(mark))},
    }
    started = time.time()
    r = server.session.post(server.url + "/scheduler/jobs", json=body, timeout=30)
    if r.status_code != 200:
        raise RuntimeError(f"POST /scheduler/jobs: {r.status_code} {r.text[:300]}")
    first, job = wait_job(server, r.json()["job_id"], mark, ROUND_TIMEOUT)
    server.wait_idle(30)
    return {"first_cell": first - started, "in_progress": job["start_time"] / 1000 - started}


class SchedulerRounds:
    """jupyter-scheduler's side of the comparison: its server, and what its rounds measured. A failed round is
    recorded with its error, and the other rounds still run."""

    def __init__(self, venv: Path, work: Path, rounds: int):
        work.mkdir()  # apart from the other sections' notebooks and marks
        self.work, self.rounds = work, rounds
        self.server = SchedulerServer(scheduler_venv(venv), work)
        self.res: dict = {
            "pin": SCHEDULER_PIN,
            "venv": str(venv),
            "first_cell": [],
            "in_progress": [],
            "papermill": [],
            "papermill_runs": "alternating with jupyter-scheduler",
            "failures": [],
        }

    def round(self, i: int) -> None:
        label = f"round {i + 1}/{self.rounds}" if i >= 0 else "warm-up"
        log(f"jupyter-scheduler {label}")
        try:
            one = scheduler_once(self.server, self.work, i)
        except Exception as e:  # noqa: BLE001 (the round's failure is the result)
            self.res["failures"].append(f"{label}: {e}")
            log(f"jupyter-scheduler {label} failed: {e}\n{self.server.log_tail(5)}")
            return
        if i >= 0:
            self.res["first_cell"].append(one["first_cell"])
            self.res["in_progress"].append(one["in_progress"])

    def with_papermill(self) -> None:
        """The rounds alternating with papermill's alone, when the latency section does not run."""
        for i in range(-1, self.rounds):  # -1 warms both paths: their first kernel start reads more from disk
            self.round(i)
            direct = papermill_once(self.work, i)
            if i >= 0:
                self.res["papermill"].append(direct)


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
            "",
        ]
    if "jupyter-scheduler" in res:
        lines += ["## 3. Submit -> first cell executing, jupyter-scheduler's notebook jobs", ""]
        js = res["jupyter-scheduler"]
        if "not_measured" in js:
            lines += [f"not measured: {js['not_measured']}"]
        else:
            lines += scheduler_report(js, res.get("latency"))
    return "\n".join(lines)


def scheduler_report(js: dict, latency: dict | None) -> list[str]:
    p, f, run = js["papermill"], js["first_cell"], js["in_progress"]
    pm = statistics.median(p)
    rows = [
        (f"papermill run directly ({js['papermill_runs']})", p),
        (f"{js['pin']} job (POST /scheduler/jobs to the first cell executing)", f),
        (f"{js['pin']} job, POST to IN_PROGRESS (its start_time)", run),
    ]
    if latency:
        rows.append(("gpulab notebook job (section 1's rounds)", latency["gpulab"]))
    lines = ["| path | n | median s | p90 s | vs papermill |", "| --- | ---: | ---: | ---: | ---: |"]
    for label, xs in rows:
        if xs:
            m = statistics.median(xs)
            lines.append(f"| {label} | {len(xs)} | {m:.2f} | {pct(xs, 90):.2f} | {m / pm:.2f}x |")
    lines.append("")
    if latency and f:
        ratio = statistics.median(latency["gpulab"]) / statistics.median(f)
        lines += [f"gpulab vs jupyter-scheduler, submit -> first cell (medians, same rounds): {ratio:.2f}x", ""]
    lines += [f"failed round: {x}" for x in js["failures"]]
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--schedules", type=int, default=100)
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    ap.add_argument(
        "--scheduler-venv",
        type=Path,
        default=Path(tempfile.gettempdir()) / "gpulab-bench-jupyter-scheduler-venv",
        help=f"venv for {SCHEDULER_PIN}, made with pip unless it has it",
    )
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    only = set(args.only.split(","))
    if unknown := only - set(SECTIONS):
        ap.error(f"--only: no section {', '.join(sorted(unknown))}; the sections are {', '.join(SECTIONS)}")
    work = Path(tempfile.mkdtemp(prefix="gpulab-notebook-bench-"))
    tracker = Tracker()
    res: dict = {"date": datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")}
    extra = f"c.Scheduler.max_per_user = {args.schedules}\n"
    scheduler = None
    try:
        if "jupyter-scheduler" in only:
            try:
                scheduler = SchedulerRounds(args.scheduler_venv.absolute(), work / "jupyter-scheduler", args.rounds)
            except SchedulerUnavailable as e:
                log(f"jupyter-scheduler not measured: {e}")
                res["jupyter-scheduler"] = {"not_measured": str(e)}
            else:
                res["jupyter-scheduler"] = scheduler.res
        if scheduler and "latency" not in only:
            scheduler.with_papermill()  # before any platform starts, which would share the CPUs
        if only & {"latency", "schedules"}:
            bench = Bench(tracker, work, HOSTS[0], f"sqlite:///{work / 'jobs' / 'jobs.sqlite'}", extra)
        if "latency" in only:
            res["latency"] = latency(bench, args.rounds, work, scheduler)
        if scheduler:
            scheduler.server.stop()  # the schedules section has no use for it
        if "schedules" in only:
            res["schedules"] = schedules(bench, args.schedules)
    finally:
        if scheduler:
            scheduler.server.stop()
        tracker.stop_all()
    print(report(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
