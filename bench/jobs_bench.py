#!/usr/bin/env python
"""Benchmark of the gpulab-jobs service against real parts (hub + proxy + service, PostgreSQL, Ray).

    python bench/jobs_bench.py [--quick] [--only throughput,latency,list,ray,tick,lag] [--ray-body]
                               [--json out.json] [--profile DIR] [--keep]

Sections (goals from issue 3, "Benchmark"), each with a baseline measured in the same run:

1. throughput: POST /jobs through the hub proxy with a user token, N threads each with its own
   ``requests.Session``; SQLite and PostgreSQL. Jobs go to pool "parked", which no executor
   offers, so they stay queued and nothing runs. Baselines: the same load on GET openapi.json
   (no auth, no DB: the framework + proxy ceiling; also straight to the service port), GET /quota
   (auth + 2 small queries), and the store alone (``JobStore.create_job`` in this process).
   Goal: >= 200 submissions/s on SQLite.
2. latency: submit -> running with the local executor, sequential trivial jobs (``sleep 0.2``).
   "running" = the job's stored ``started_at`` (the service sets it once ``Popen`` returned);
   "exec" = when the user's command itself began (it writes its start time). Baseline: a bare
   ``subprocess.Popen`` of the same runner command, measured the same way. Goal: p50 <= 100 ms.
3. list: GET /jobs?limit=50 (first page, a deep cursor page 5,000 rows in, and two filters) with
   10,000 jobs stored, vs GET openapi.json and GET /quota on the same server; repeated once the
   throughput run has left ~1,000 jobs queued. Goal: p95 <= 50 ms.
4. ray: submit -> RUNNING (as Ray reports it) for the raw Ray Jobs API vs gpulab-on-Ray, same
   trivial entrypoint, rotating, sequential; Ray's own job ``start_time`` splits gpulab's time
   before Ray has the job from Ray's time to start it. ``--ray-body`` adds a third variant: raw
   Ray with the exact request body gpulab's RayExecutor sends. Goal: gpulab adds <= 10%.
5. tick (diagnostic): one scheduling pass in-process vs the number of queued jobs; baseline:
   the same pass with an empty queue.
6. lag: the service's event-loop lag (its own histogram: a timer every 50 ms) while 20 clients follow a
   running job's log (SSE), idle for 10 s (the baseline) and during a burst of 1,000 submissions.
   Goal (issue 15): max lag <= 20 ms.

The machine may be shared: compare ratios within one run, not absolute numbers across runs.
Everything started here is stopped by PID at the end (also on error or Ctrl-C).
"""

import argparse
import base64
import json
import math
import os
import platform as pyplatform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil
import psycopg
import requests

from gpulab.job_states import TERMINAL_STATES
from tests.support.gpulab_up import Platform
from tests.support.processes import alive, terminate
from tests.support.ray_cluster import RayCluster

PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/{db}"
USER = "bench"
TICK = 1.0  # c.JobQueue.tick_interval on every platform here (the default); submits kick the queue
PARKED = {"name": "bench", "entrypoint": ["true"], "resources": {"pool": "parked"}}
# the user's command records when it actually began, then does the trivial work
EXEC_MARK = ".bench-exec"
TRIVIAL = ["sh", "-c", f"date +%s.%N > {EXEC_MARK}; exec sleep 0.2"]
RAY_SLEEP = 0.5
# loopback hosts of the three platforms (ports are free ones); others' suites use the low 127.0.0.x
HOSTS = ("127.0.0.120", "127.0.0.121", "127.0.0.122")

SIZES = {
    "full": {
        "threads": 4,
        "per_thread": 250,
        "store_n": 1000,
        "latency_n": 50,
        "list_rounds": 300,
        "ray_n": 10,
        "ray_variants": ["raw", "gpulab"],
        "tick_depths": [0, 1000, 10000],
        "lag_burst": 1000,
    },
    "quick": {
        "threads": 4,
        "per_thread": 40,
        "store_n": 200,
        "latency_n": 8,
        "list_rounds": 30,
        "ray_n": 2,
        "ray_variants": ["raw", "gpulab"],
        "tick_depths": [0, 1000],
        "lag_burst": 200,
    },
}


# --------------------------------------------------------------------------- helpers


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pct(values: list[float], p: float) -> float:
    """Percentile with linear interpolation (numpy's default)."""
    if not values:
        return math.nan
    xs = sorted(values)
    k = (len(xs) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def epoch(iso: str) -> float:
    return datetime.strptime(iso, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


class Tracker:
    """Everything this run starts, so that it can all be stopped by PID (never by name)."""

    def __init__(self):
        self.platforms: list[Platform] = []
        self.clusters: list[RayCluster] = []
        self.procs: dict[int, dict[int, psutil.Process]] = {}  # id(platform) -> pid -> process
        self.databases: list[str] = []
        self.starters: list[threading.Thread] = []

    def record(self) -> None:
        """Remember every process of each platform's tree (psutil keeps the create time with the PID)."""
        for p in self.platforms:
            if p.proc is None:
                continue
            try:
                root = psutil.Process(p.proc.pid)
                for proc in [root, *root.children(recursive=True)]:
                    self.procs.setdefault(id(p), {}).setdefault(proc.pid, proc)
            except psutil.NoSuchProcess:
                pass

    def stop_platform(self, p: Platform) -> None:
        """``Platform.stop()``, then whatever of its tree is left: the hub first, so that it cannot restart
        the proxy meanwhile, then the rest, then a proxy the hub did restart while stopping (it runs in a
        session of its own: found through the hub's pid file, checked against this platform's address)."""
        self.record()
        started = time.monotonic()
        try:
            p.stop()
        except Exception as e:  # noqa: BLE001
            log(f"stopping platform {p.url}: {e}")
        if (took := time.monotonic() - started) > 10:
            log(f"platform {p.url} took {took:.0f}s to stop")
        procs = list(self.procs.get(id(p), {}).values())
        hubs = [x for x in procs if "jupyterhub" in cmdline(x)]
        terminate([x for x in hubs if alive(x)], 10)
        terminate([x for x in procs if alive(x)], 5)
        pid_file = p.data_dir / "hub" / "jupyterhub-proxy.pid"
        try:
            proxy = psutil.Process(int(pid_file.read_text().strip()))
        except (OSError, ValueError, psutil.NoSuchProcess):
            return
        cmd = cmdline(proxy)
        if f"--ip {p.host} " in cmd and f"--port {p.port} " in cmd + " ":
            log(f"stopping a proxy the hub restarted while stopping (pid {proxy.pid})")
            terminate([proxy], 5)

    def stop_all(self) -> None:
        for starter in self.starters:  # a platform or cluster still starting is stopped once it is up
            starter.join(180)
        for p in reversed(self.platforms):
            self.stop_platform(p)
        for c in reversed(self.clusters):
            try:
                c.stop()
            except Exception as e:  # noqa: BLE001
                log(f"stopping ray cluster: {e}")
        for db in self.databases:
            try:
                with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
                    conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
            except Exception as e:  # noqa: BLE001
                log(f"dropping database {db}: {e}")


def cmdline(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:
        return ""


class Starter(threading.Thread):
    """Run a start-up function in the background; ``result()`` joins and re-raises its error."""

    def __init__(self, tracker: Tracker, fn):
        super().__init__(daemon=True)
        self.fn, self.value, self.error = fn, None, None
        tracker.starters.append(self)
        self.start()

    def run(self):
        try:
            self.value = self.fn()
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            self.error = e

    def result(self):
        self.join()
        if self.error is not None:
            raise self.error
        return self.value


class Profiler:
    """``py-spy record`` of the service for the duration of a ``with`` block (no-op without a dir).

    Sampling costs the service a little: do not quote numbers from a profiled run.
    """

    def __init__(self, out_dir: Path | None, phase: str, pid: int | None):
        self.out_dir, self.phase, self.pid, self.procs = out_dir, phase, pid, []

    def __enter__(self):
        if self.out_dir is None or self.pid is None:
            return self
        spy = os.environ.get("PY_SPY") or shutil.which("py-spy")
        if not spy:
            raise SystemExit("--profile needs py-spy (pip install py-spy; or set PY_SPY=/path/to/py-spy)")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for fmt, ext in (("flamegraph", "svg"), ("raw", "folded")):
            self.procs.append(
                subprocess.Popen(
                    [
                        spy,
                        "record",
                        "--pid",
                        str(self.pid),
                        "--rate",
                        "200",
                        "--nonblocking",
                        "--format",
                        fmt,
                        "--output",
                        str(self.out_dir / f"{self.phase}.{ext}"),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        time.sleep(1.5)  # let py-spy attach
        return self

    def __exit__(self, *exc):
        for proc in self.procs:
            proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        if self.procs:
            folded = self.out_dir / f"{self.phase}.folded"
            if folded.exists():
                log(f"py-spy {self.phase}: {self.out_dir / (self.phase + '.svg')}\n" + hot_frames(folded))


def hot_frames(folded: Path, top: int = 20) -> str:
    """Inclusive share of the samples per function (file:function), from py-spy's folded stacks."""
    incl, total = {}, 0
    for line in folded.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        total += int(n)
        names = set()
        for frame in stack.split(";"):
            fn, _, where = frame.partition(" (")
            names.add(f"{where.split(':')[0].rsplit('/', 2)[-1] if where else ''}:{fn}")
        for name in names:
            incl[name] = incl.get(name, 0) + int(n)
    rows = sorted(incl.items(), key=lambda kv: -kv[1])[:top]
    return "\n".join(f"  {100 * n / max(total, 1):5.1f}%  {name}" for name, n in rows)


def stop_platform(tracker: Tracker, bench: "Bench") -> None:
    tracker.stop_platform(bench.platform)


def create_database(tracker: Tracker) -> str:
    db = f"gpulab_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    tracker.databases.append(db)
    return PG_URL.format(db=db)


CHP = ROOT / "node_modules" / ".bin" / "configurable-http-proxy"


def platform_config(store_url: str, extra: str = "") -> str:
    proxy = f"c.Platform.proxy_command = {[str(CHP)]!r}" if CHP.exists() else ""  # else npm installs one
    return f"""
{proxy}
c.Platform.mlflow_service = False
c.Platform.isolation = "none"  # the service alone is measured, on a store this process preloads
c.Roles.extra_roles = c.Roles.extra_roles + [  # the lag section scrapes the service's metrics
    {{"name": "bench-metrics", "scopes": ["read:metrics", "access:services!service=gpulab-jobs"],
      "services": ["test-admin"]}}]
c.Roles.everyone = ["gpulab-user"]
c.JobQueue.tick_interval = {TICK}
# the service's capacity is measured, not one user's allowance (#14's rate limit and queue cap)
c.JobQueue.submit_rate = 1e6
c.JobQueue.submit_burst = 1_000_000
c.JobQueue.max_queued = 1_000_000
c.JobStore.url = {store_url!r}
{extra}
"""


class Bench:
    """A started platform with the bench user and a token; the API base through the proxy."""

    def __init__(self, tracker: Tracker, work: Path, host: str, store_url: str, extra: str = ""):
        self.data_dir = work / f"platform-{host}"
        self.platform = Platform(self.data_dir, host=host)
        tracker.platforms.append(self.platform)
        started = time.monotonic()
        self.platform.start(platform_config(store_url, extra), timeout=120)
        tracker.record()
        self.base = f"{self.platform.url}/services/gpulab-jobs/api/v1"
        deadline = time.monotonic() + 60
        while True:  # the hub routes the service before it necessarily listens
            try:
                if requests.get(self.base + "/openapi.json", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"gpulab-jobs never answered at {self.base}:\n{self.platform.log_tail()}")
            time.sleep(0.2)
        self.platform.create_user(USER)
        self.token = self.platform.token(USER)
        self.headers = {"Authorization": f"token {self.token}"}
        tracker.record()
        log(f"platform {host} up in {time.monotonic() - started:.1f}s ({store_url.split(':')[0]})")

    def session(self) -> requests.Session:
        s = requests.Session()
        s.headers.update(self.headers)
        return s

    def service_pid(self) -> int | None:
        for p in self.platform.descendants():
            try:
                if p.cmdline()[-2:] == ["-m", "gpulab.services.jobs"]:  # not its jobs' supervisors
                    return p.pid
            except psutil.Error:
                pass
        return None

    def direct_base(self) -> str | None:
        """The service's own address (bypassing the proxy), from its listening socket."""
        pid = self.service_pid()
        if pid is None:
            return None
        proc = psutil.Process(pid)
        conns = proc.net_connections("tcp") if hasattr(proc, "net_connections") else proc.connections("tcp")
        for c in conns:
            if c.status == psutil.CONN_LISTEN:
                return f"http://{c.laddr.ip}:{c.laddr.port}/services/gpulab-jobs/api/v1"
        return None


# --------------------------------------------------------------------------- 1. throughput


def hammer(make_session, method: str, url: str, body: dict | None, threads: int, per_thread: int, expect: int) -> dict:
    """``threads`` clients, each ``per_thread`` sequential requests; the rate over the whole burst."""
    sessions = [make_session() for _ in range(threads)]
    for s in sessions:  # connect and warm the service's token cache outside the timed part
        for _ in range(3):
            s.request(method, url, json=body, timeout=30)
    barrier = threading.Barrier(threads + 1)
    lat: list[list[float]] = [[] for _ in range(threads)]
    done_at: list[list[float]] = [[] for _ in range(threads)]
    errors: list[str] = []

    def client(i: int) -> None:
        s = sessions[i]
        barrier.wait()
        for _ in range(per_thread):
            t0 = time.perf_counter()
            try:
                r = s.request(method, url, json=body, timeout=60)
                ok = r.status_code == expect
                if not ok:
                    errors.append(f"{r.status_code} {r.text[:200]}")
            except requests.RequestException as e:
                ok = False
                errors.append(repr(e))
            t1 = time.perf_counter()
            if ok:
                lat[i].append(t1 - t0)
                done_at[i].append(t1)

    workers = [threading.Thread(target=client, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    barrier.wait()
    start = time.perf_counter()
    for w in workers:
        w.join()
    wall = time.perf_counter() - start
    for s in sessions:
        s.close()
    all_lat = [x for xs in lat for x in xs]
    ends = sorted(x for xs in done_at for x in xs)
    half = len(ends) // 2
    first_half = half / (ends[half - 1] - start) if half else math.nan
    second_half = (len(ends) - half) / (ends[-1] - ends[half - 1]) if half and len(ends) > half else math.nan
    return {
        "n": len(all_lat),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "rate": len(all_lat) / wall,
        "wall_s": wall,
        "p50_ms": ms(pct(all_lat, 50)),
        "p99_ms": ms(pct(all_lat, 99)),
        "rate_first_half": first_half,
        "rate_second_half": second_half,
    }


def store_only_rate(url: str, n: int) -> dict:
    """``JobStore.create_job`` in this process, one thread (the service is one thread too)."""
    from gpulab.services.jobs.models import JobSpec
    from gpulab.services.jobs.store import JobStore

    store = JobStore(url=url)
    spec = JobSpec.model_validate(PARKED)
    for _ in range(20):
        store.create_job("warmup", [], spec)
    t0 = time.perf_counter()
    for _ in range(n):
        store.create_job(USER, [], spec)
    wall = time.perf_counter() - t0
    store.engine.dispose()
    return {"n": n, "rate": n / wall, "wall_s": wall, "p50_ms": ms(wall / n)}


def throughput(bench: Bench, size: dict, label: str, store_url: str, direct: bool, profile: Path | None = None) -> dict:
    t, k = size["threads"], size["per_thread"]
    out = {}
    log(f"[{label}] store-only baseline ({size['store_n']} create_job)")
    out["store_only"] = store_only_rate(store_url, size["store_n"])
    log(f"[{label}] GET openapi.json x {t}x{k}")
    out["openapi"] = hammer(bench.session, "GET", bench.base + "/openapi.json", None, t, k, 200)
    if direct and (base := bench.direct_base()):
        log(f"[{label}] GET openapi.json direct to the service (no proxy) x {t}x{k}")
        out["openapi_direct"] = hammer(bench.session, "GET", base + "/openapi.json", None, t, k, 200)
    log(f"[{label}] GET /quota x {t}x{k}")
    out["quota"] = hammer(bench.session, "GET", bench.base + "/quota", None, t, k, 200)
    log(f"[{label}] POST /jobs x {t}x{k}")
    with Profiler(profile, f"submit-{label}", bench.service_pid()):
        out["submit"] = hammer(bench.session, "POST", bench.base + "/jobs", PARKED, t, k, 201)
    return out


# --------------------------------------------------------------------------- 6. loop lag

FOLLOWED = {
    "name": "followed",
    "entrypoint": ["python", "-c", "import time\nfor i in range(3000):\n    print(i, flush=True)\n    time.sleep(0.1)"],
}


def lag_buckets(bench: Bench) -> dict[float, float]:
    """The service's event-loop lag histogram: cumulative count per upper bound (s)."""
    text = requests.get(
        f"{bench.platform.url}/services/gpulab-jobs/metrics",
        headers={"Authorization": f"token {bench.platform.admin_token}"},
        timeout=30,
    ).text
    out = {}
    for match in re.finditer(r'^gpulab_jobs_event_loop_lag_seconds_bucket\{le="([^"]+)"\} (\S+)$', text, re.M):
        out[float(match[1])] = float(match[2])
    if not out:
        raise RuntimeError(f"no event-loop lag histogram in gpulab-jobs' metrics: {text[:300]}")
    return out


def lag_between(before: dict, after: dict) -> dict:
    """Timer wake-ups between two scrapes, and the bucket bounds under which the largest and 99% of them fell."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0) for b in bounds]
    total = counts[-1]
    largest = next((b for b, c in zip(bounds, counts) if c == total), math.inf)
    p99 = next((b for b, c in zip(bounds, counts) if c >= 0.99 * total), math.inf)
    return {"samples": int(total), "max_le_ms": ms(largest), "p99_le_ms": ms(p99)}


def loop_lag(bench: Bench, burst: int, followers: int, threads: int) -> dict:
    """Max event-loop lag of gpulab-jobs while ``followers`` SSE streams follow a running job's log, idle (the
    baseline) and during a burst of ``burst`` submissions."""
    with bench.session() as s:
        job = s.post(bench.base + "/jobs", json=FOLLOWED, timeout=30).json()["id"]
        deadline = time.monotonic() + 60
        while s.get(f"{bench.base}/jobs/{job}", timeout=30).json()["state"] != "running":
            assert time.monotonic() < deadline, "the followed job never ran"
            time.sleep(0.1)
    stop = threading.Event()

    def follow() -> None:
        with bench.session() as s, s.get(f"{bench.base}/jobs/{job}/logs?follow=true", stream=True, timeout=60) as r:
            for _ in r.iter_lines():
                if stop.is_set():
                    return

    streams = [threading.Thread(target=follow, daemon=True) for _ in range(followers)]
    for t in streams:
        t.start()
    time.sleep(2)
    out = {}
    before = lag_buckets(bench)
    time.sleep(10)
    out["idle"] = lag_between(before, lag_buckets(bench))
    before = lag_buckets(bench)
    out["burst_submit"] = hammer(bench.session, "POST", bench.base + "/jobs", PARKED, threads, burst // threads, 201)
    out["burst"] = lag_between(before, lag_buckets(bench))
    stop.set()
    with bench.session() as s:
        s.post(f"{bench.base}/jobs/{job}/cancel", timeout=60)
    for t in streams:
        t.join(timeout=30)
    out["followers"], out["burst_n"] = followers, burst
    return out


# --------------------------------------------------------------------------- 2. latency


def latency_local(bench: Bench, n: int) -> dict:
    jobs_dir = bench.data_dir / "jobs" / USER
    s = bench.session()
    rows = []
    for i in range(n + 2):  # 2 warm-ups
        t_send = time.time()
        r = s.post(bench.base + "/jobs", json={"name": "lat", "entrypoint": TRIVIAL}, timeout=30)
        t_ret = time.time()
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        deadline = time.monotonic() + 60
        while True:
            job = s.get(f"{bench.base}/jobs/{job_id}", timeout=30).json()
            if job["state"] in TERMINAL_STATES:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"job {job_id} stuck: {job}")
            time.sleep(0.05)
        assert job["state"] == "succeeded", job
        started = epoch(job["started_at"])
        exec_at = float((jobs_dir / job_id / EXEC_MARK).read_text())
        if i >= 2:
            rows.append(
                {
                    "send_to_running": started - t_send,
                    "return_to_running": started - t_ret,
                    "post_rtt": t_ret - t_send,
                    "send_to_exec": exec_at - t_send,
                }
            )
    s.close()
    return summarize(rows)


def latency_popen(workdir: Path, n: int) -> dict:
    """The same runner command started by a bare ``Popen``: time to Popen's return and to exec."""
    workdir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "gpulab.runner", "--", *TRIVIAL]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPULAB_", "JUPYTERHUB_"))}
    env["PYTHONPATH"] = str(ROOT)
    rows = []
    for i in range(n + 2):
        mark = workdir / EXEC_MARK
        mark.unlink(missing_ok=True)
        t0 = time.time()
        proc = subprocess.Popen(
            argv,
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        t1 = time.time()
        proc.wait(60)
        if i >= 2:
            rows.append({"send_to_running": t1 - t0, "send_to_exec": float(mark.read_text()) - t0})
    return summarize(rows)


def summarize(rows: list[dict]) -> dict:
    out = {"n": len(rows)}
    for key in rows[0]:
        xs = [r[key] for r in rows if r[key] is not None]
        if not xs:
            continue
        out[key] = {
            "p50_ms": ms(pct(xs, 50)),
            "p95_ms": ms(pct(xs, 95)),
            "p99_ms": ms(pct(xs, 99)),
            "mean_ms": ms(statistics.fmean(xs)),
        }
    return out


# --------------------------------------------------------------------------- 3. list


def preload_jobs(store_url: str, n: int) -> list[tuple[datetime, str]]:
    """``n`` finished jobs of the bench user straight into the service's DB (before it starts).

    Most succeeded; 1% failed (the ``state=failed`` filter) and 1% carry label team=rare.
    Returns (created_at, id) newest first, the API's order.
    """
    from sqlalchemy import insert

    from gpulab.services.jobs.models import JobSpec
    from gpulab.services.jobs.store import JobRow, JobStore

    store = JobStore(url=store_url)
    spec = JobSpec.model_validate({"name": "history", "entrypoint": ["python", "train.py"]}).model_dump(mode="json")
    now = datetime.now(UTC).replace(tzinfo=None)
    rows, keys = [], []
    for i in range(n):
        created = now - timedelta(days=10) + timedelta(seconds=i * 80, microseconds=i)
        job_id = uuid.uuid4().hex
        state = "failed" if i % 100 == 7 else "succeeded"
        labels = {"team": "rare" if i % 100 == 3 else "common"}
        rows.append(
            {
                "id": job_id,
                "owner": USER,
                "groups": [],
                "name": "history",
                "kind": "train",
                "spec": spec,
                "state": state,
                "state_reason": "exit code 0" if state == "succeeded" else "exit code 1",
                "priority": 0,
                "pool": "default",
                "gpus": 0,
                "cpus": 1.0,
                "memory": None,
                "attempt": 1,
                "max_retries": 0,
                "not_before": None,
                "idempotency_key": None,
                "labels": labels,
                "created_at": created,
                "updated_at": created + timedelta(seconds=30),
                "started_at": created + timedelta(seconds=1),
                "finished_at": created + timedelta(seconds=30),
                "exit_code": 0 if state == "succeeded" else 1,
                "executor": "local",
                "handle": {"executor": "local", "ref": f"{1000 + i}:1.00", "gpu_ids": []},
                "heartbeat_at": None,
                "progress": {"step": 10, "total": 10, "metrics": {"loss": 0.1}},
            }
        )
        keys.append((created, job_id))
    with store.engine.begin() as conn:
        conn.execute(insert(JobRow.__table__), rows)
    store.engine.dispose()
    keys.sort(reverse=True)
    return keys


def cursor_after(created: datetime, job_id: str) -> str:
    """The API's cursor (store._encode_cursor) pointing just past this row."""
    return base64.urlsafe_b64encode(json.dumps([created.isoformat(), job_id]).encode()).decode()


def list_latency(bench: Bench, keys: list[tuple[datetime, str]], rounds: int) -> dict:
    deep = len(keys) // 2
    endpoints = {
        "openapi": (bench.base + "/openapi.json", {}),
        "quota": (bench.base + "/quota", {}),
        "list_first": (bench.base + "/jobs", {"limit": 50}),
        "list_deep": (bench.base + "/jobs", {"limit": 50, "cursor": cursor_after(*keys[deep - 1])}),
        "list_state_failed": (bench.base + "/jobs", {"limit": 50, "state": "failed"}),
        "list_label_rare": (bench.base + "/jobs", {"limit": 50, "label": "team=rare"}),
    }
    s = bench.session()
    # sanity: the deep page starts where it should and pages are full
    page = s.get(endpoints["list_deep"][0], params=endpoints["list_deep"][1], timeout=30).json()
    assert page["jobs"][0]["id"] == keys[deep][1] and len(page["jobs"]) == 50, page.get("jobs", [])[:1]
    first = s.get(endpoints["list_first"][0], params=endpoints["list_first"][1], timeout=30).json()
    assert len(first["jobs"]) == 50 and first["next_cursor"]
    lat = {name: [] for name in endpoints}
    for r in range(rounds + 5):  # interleaved so that background noise hits every endpoint alike
        for name, (url, params) in endpoints.items():
            t0 = time.perf_counter()
            resp = s.get(url, params=params, timeout=30)
            dt = time.perf_counter() - t0
            assert resp.status_code == 200, (name, resp.status_code, resp.text[:200])
            if r >= 5:
                lat[name].append(dt)
    s.close()
    return {
        name: {
            "n": len(xs),
            "p50_ms": ms(pct(xs, 50)),
            "p95_ms": ms(pct(xs, 95)),
            "p99_ms": ms(pct(xs, 99)),
            "max_ms": ms(max(xs)),
        }
        for name, xs in lat.items()
    }


# --------------------------------------------------------------------------- 4. ray


def ray_job(address: str, submission_id: str) -> dict | None:
    r = requests.get(f"{address}/api/jobs/{submission_id}", timeout=10)
    return None if r.status_code == 404 else r.json()


DONE = {"SUCCEEDED", "FAILED", "STOPPED"}


def wait_ray(address: str, submission_id: str, want: set[str], t0: float, timeout: float = 120) -> tuple[float, dict]:
    """Poll every 20 ms until the job's status is in ``want``; (seconds since t0, job info)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = ray_job(address, submission_id)
        if job and job["status"] in want:
            return time.time() - t0, job
        time.sleep(0.02)
    raise RuntimeError(f"ray job {submission_id} not {want} in {timeout}s")


def ray_measure(address: str, sid: str, t0: float, rtt: float) -> dict:
    running, job = wait_ray(address, sid, {"RUNNING"} | DONE, t0)
    _, final = wait_ray(address, sid, DONE, t0)
    assert final["status"] == "SUCCEEDED", final
    accepted = job["start_time"] / 1000 - t0  # Ray's own record of when it took the submission
    return {
        "send_to_ray_running": running,
        "send_to_ray_accepted": accepted,
        "ray_accepted_to_running": running - accepted,
        "post_rtt": rtt,
        "saw_running": job["status"] == "RUNNING",
    }


def gpulab_like_env(job_id: str, job_dir: Path) -> dict:
    """The kind of runtime_env env_vars RayExecutor sends: inherited vars plus per-job values."""
    job_dir.mkdir(parents=True, exist_ok=True)
    env = {
        k: os.environ[k]
        for k in ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "TZ", "TMPDIR", "LD_LIBRARY_PATH", "CUDA_HOME")
        if k in os.environ
    }
    env.update(
        PYTHONUNBUFFERED="1",
        WANDB_MODE="offline",
        WANDB_DIR=str(job_dir),
        MLFLOW_EXPERIMENT_NAME="ray-lat",
        GPULAB_JOB_ID=job_id,
        GPULAB_JOB_OWNER=USER,
        GPULAB_JOB_TOKEN=base64.urlsafe_b64encode(os.urandom(32)).decode(),
        TRACEPARENT=f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01",
        CUDA_VISIBLE_DEVICES="",
        GPULAB_WORKING_DIR=str(job_dir),
    )
    return env


def ray_raw_once(address: str, gpulab_shape: bool, work: Path) -> dict:
    """Straight to Ray: the plain trivial job, or the same request body gpulab's RayExecutor sends."""
    job_id = uuid.uuid4().hex
    sid = f"raw-{job_id[:12]}"
    body = {"submission_id": sid, "entrypoint": f"sleep {RAY_SLEEP}", "entrypoint_num_cpus": 1}
    if gpulab_shape:
        body.update(
            entrypoint=f"{sys.executable} -m gpulab.runner -- sleep {RAY_SLEEP}",
            entrypoint_num_gpus=0,
            runtime_env={"env_vars": gpulab_like_env(job_id, work / job_id)},
            metadata={"gpulab_job_id": job_id, "gpulab_owner": USER, "gpulab_attempt": "1"},
        )
    t0 = time.time()
    r = requests.post(f"{address}/api/jobs/", json=body, timeout=30)
    rtt = time.time() - t0
    assert r.status_code == 200, r.text
    return ray_measure(address, sid, t0, rtt)


def ray_gpulab_once(bench: Bench, session: requests.Session, address: str) -> dict:
    t0 = time.time()
    r = session.post(
        bench.base + "/jobs", json={"name": "ray-lat", "entrypoint": ["sleep", str(RAY_SLEEP)]}, timeout=30
    )
    rtt = time.time() - t0
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    out = ray_measure(address, f"gpulab-{job_id}-1", t0, rtt)
    deadline = time.monotonic() + 60
    while (job := session.get(f"{bench.base}/jobs/{job_id}", timeout=30).json())["state"] not in TERMINAL_STATES:
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    assert job["state"] == "succeeded", job
    # None: the job ended before a scheduling pass saw Ray's RUNNING (gpulab records `running` only then)
    out["send_to_gpulab_running"] = epoch(job["started_at"]) - t0 if job["started_at"] else None
    return out


def ray_compare(bench: Bench, address: str, n: int, variants: list[str], work: Path) -> dict:
    s = bench.session()
    every = {
        "raw": lambda: ray_raw_once(address, False, work),
        "raw_gpulab_body": lambda: ray_raw_once(address, True, work),
        "gpulab": lambda: ray_gpulab_once(bench, s, address),
    }
    one = {name: every[name] for name in variants}
    runs = {name: [] for name in one}
    # warm-up, one job of each variant: the first job on a fresh cluster is slow, and gpulab's first
    # submission pays for the cold token cache, its first Ray connection and capacity query
    for run_one in one.values():
        run_one()
    k = len(one)
    for i in range(n):  # rotate the order so that noise hits every variant alike
        for name in list(one)[i % k :] + list(one)[: i % k]:
            runs[name].append(one[name]())
    s.close()
    out = {}
    for name, xs in runs.items():
        out[name] = summarize([{k: v for k, v in x.items() if k != "saw_running"} for x in xs])
        out[name]["saw_running"] = sum(x["saw_running"] for x in xs)
    return out


# --------------------------------------------------------------------------- 5. scheduling pass (diagnostic)


def tick_cost(work: Path, depths: list[int], reps: int) -> dict:
    """In-process: one ``JobQueue.tick()`` with N jobs queued in a pool nobody offers (as in section 1).

    The service runs this pass (its database work in a thread) after a burst of submissions and every
    tick_interval. Baseline: the same pass with nothing queued.
    """
    import asyncio

    from sqlalchemy import insert

    from gpulab.services.jobs.models import JobSpec
    from gpulab.services.jobs.queue import JobQueue
    from gpulab.services.jobs.store import JobRow, JobStore

    spec = JobSpec.model_validate(PARKED).model_dump(mode="json")
    # what the queue records for them (stored up front: the first pass would otherwise update every row)
    reason = "waiting: no pool 'parked' (pools: default)"

    async def one(depth: int) -> float:
        d = work / f"tick-{depth}"
        store = JobStore(url=f"sqlite:///{d / 'jobs.sqlite'}")
        now = datetime.now(UTC).replace(tzinfo=None)
        rows = [
            {
                "id": uuid.uuid4().hex,
                "owner": f"user{i % 4}",
                "groups": [],
                "name": "bench",
                "kind": "train",
                "spec": spec,
                "state": "queued",
                "state_reason": reason,
                "priority": 0,
                "pool": "parked",
                "gpus": 0,
                "cpus": 1.0,
                "memory": None,
                "attempt": 0,
                "max_retries": 0,
                "not_before": None,
                "idempotency_key": None,
                "labels": {},
                "created_at": now - timedelta(seconds=depth - i),
                "updated_at": now,
            }
            for i in range(depth)
        ]
        if rows:
            with store.engine.begin() as conn:
                conn.execute(insert(JobRow.__table__), rows)
        queue = JobQueue(store=store, data_dir=str(d))
        await queue.tick()
        times = []
        for _ in range(reps if depth < 5000 else 3):
            t0 = time.perf_counter()
            await queue.tick()
            times.append(time.perf_counter() - t0)
        await queue.executor.close()
        store.engine.dispose()
        return statistics.median(times)

    return {depth: ms(asyncio.run(one(depth))) for depth in depths}


# --------------------------------------------------------------------------- report


def ratio(a: float, b: float) -> str:
    return "n/a" if not b or math.isnan(a) or math.isnan(b) else f"{a / b:.2f}x"


def report(res: dict) -> str:
    lines = [
        f"gpulab-jobs benchmark ({res['mode']}) {res['date']} on {res['machine']}",
        f"load average at start: {res['loadavg_start']}, at end: {res.get('loadavg_end')}",
        f"c.JobQueue.tick_interval = {TICK} s",
        "",
    ]
    goals = []
    if "throughput" in res:
        lines += [
            (
                "## 1. Submission throughput (through the hub proxy, "
                f"{res['size']['threads']} clients x {res['size']['per_thread']} requests)"
            ),
            "",
            "| backend | request | req/s | p50 ms | p99 ms | errors | vs openapi.json | vs store-only |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for backend, t in res["throughput"].items():
            base, store = t["openapi"]["rate"], t["store_only"]["rate"]
            lines.append(
                f"| {backend} | store-only `JobStore.create_job` (1 thread, in-process) | {store:.0f} | "
                f"{t['store_only']['p50_ms']} | | 0 | {ratio(store, base)} | 1.00x |"
            )
            for key, what in (
                ("openapi", "GET openapi.json (no auth, no DB)"),
                ("openapi_direct", "GET openapi.json straight to the service port (no proxy)"),
                ("quota", "GET /quota"),
                ("submit", "POST /jobs"),
            ):
                if key in t:
                    x = t[key]
                    lines.append(
                        f"| {backend} | {what} | {x['rate']:.0f} | {x['p50_ms']} | {x['p99_ms']} | "
                        f"{x['errors']} | {ratio(x['rate'], base)} | {ratio(x['rate'], store)} |"
                    )
            sub = t["submit"]
            lines.append(
                f"| {backend} | POST /jobs rate, first vs second half of the burst | "
                f"{sub['rate_first_half']:.0f} / {sub['rate_second_half']:.0f} | | | | | |"
            )
        sq = res["throughput"].get("sqlite")
        if sq:
            goals.append(("SQLite submissions/s >= 200", f"{sq['submit']['rate']:.0f}/s", sq["submit"]["rate"] >= 200))
        lines.append("")
    if "latency" in res:
        lat, base = res["latency"]["gpulab"], res["latency"]["popen"]
        lines += [
            f"## 2. Submit -> running, local executor ({lat['n']} sequential jobs `sleep 0.2`)",
            "",
            "| measure | gpulab p50 | p95 | p99 | bare Popen p50 | p99 | ratio p50 |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for key, what in (
            ("send_to_running", "POST sent -> started_at (Popen returned)"),
            ("return_to_running", "POST returned -> started_at"),
            ("send_to_exec", "POST sent -> user command executing"),
            ("post_rtt", "POST round trip"),
        ):
            g = lat[key]
            b = base.get(key)
            lines.append(
                f"| {what} | {g['p50_ms']} | {g['p95_ms']} | {g['p99_ms']} | "
                f"{b['p50_ms'] if b else ''} | {b['p99_ms'] if b else ''} | "
                f"{ratio(g['p50_ms'], b['p50_ms']) if b else ''} |"
            )
        p50 = lat["send_to_running"]["p50_ms"]
        goals.append(
            ("local submit->running p50 <= 100 ms", f"{p50} ms (exec {lat['send_to_exec']['p50_ms']} ms)", p50 <= 100)
        )
        lines.append("")
    if "list" in res:
        li = res["list"]
        lines += [
            (
                f"## 3. List latency with {res['list_jobs']} jobs stored (sequential, interleaved, "
                f"{li['openapi']['n']} rounds)"
            ),
            "",
            "| request | p50 ms | p95 ms | p99 ms | max ms | p95 vs openapi.json | p95 vs /quota |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for name, what in (
            ("openapi", "GET openapi.json"),
            ("quota", "GET /quota"),
            ("list_first", "GET /jobs?limit=50 (first page)"),
            ("list_deep", "GET /jobs?limit=50&cursor=<row 5,000>"),
            ("list_state_failed", "GET /jobs?limit=50&state=failed (1%)"),
            ("list_label_rare", "GET /jobs?limit=50&label=team=rare (1%)"),
        ):
            x = li[name]
            lines.append(
                f"| {what} | {x['p50_ms']} | {x['p95_ms']} | {x['p99_ms']} | {x['max_ms']} | "
                f"{ratio(x['p95_ms'], li['openapi']['p95_ms'])} | "
                f"{ratio(x['p95_ms'], li['quota']['p95_ms'])} |"
            )
        if "list_queued" in res:
            lq = res["list_queued"]
            lines += [
                "",
                (
                    f"Same requests ({lq['openapi']['n']} rounds) after the throughput run left "
                    f"~{res['list_queued_n']} jobs queued (each scheduling pass records their waiting "
                    "reasons):"
                ),
                "",
                "| request | p50 ms | p95 ms | p99 ms | max ms | p99 vs the run above |",
                "| --- | ---: | ---: | ---: | ---: | ---: |",
            ]
            for name in ("openapi", "quota", "list_first", "list_deep"):
                x = lq[name]
                lines.append(
                    f"| {name} | {x['p50_ms']} | {x['p95_ms']} | {x['p99_ms']} | {x['max_ms']} | "
                    f"{ratio(x['p99_ms'], li[name]['p99_ms'])} |"
                )
        worst = max(li["list_first"]["p95_ms"], li["list_deep"]["p95_ms"])
        goals.append(("list p95 <= 50 ms at 10,000 jobs (first and deep page)", f"{worst} ms", worst <= 50))
        lines.append("")
    if "ray" in res:
        ray = res["ray"]
        names = [n for n in ("raw", "raw_gpulab_body", "gpulab") if n in ray]
        titles = {"raw": "raw", "raw_gpulab_body": "raw+body", "gpulab": "gpulab"}
        raw, gl = ray["raw"], ray["gpulab"]
        extra = (
            "raw+body = the same POST with the body gpulab's RayExecutor sends (runner-wrapped entrypoint, "
            "per-job runtime_env env_vars, metadata); "
            if "raw_gpulab_body" in ray
            else ""
        )
        lines += [
            f"## 4. Ray: submit -> RUNNING ({raw['n']} jobs per variant, rotating, `sleep {RAY_SLEEP:g}`)",
            "",
            (
                f"raw = POST /api/jobs/ with the trivial entrypoint; {extra}gpulab = POST /jobs to gpulab-jobs "
                "(which then makes that POST to Ray)."
            ),
            "",
            f"| measure (p50 / p99 ms) | {' | '.join(titles[n] for n in names)} | gpulab / raw |",
            "| --- |" + " ---: |" * (len(names) + 1),
        ]
        for key, what in (
            ("send_to_ray_running", "POST sent -> Ray says RUNNING"),
            ("send_to_ray_accepted", "POST sent -> Ray job created (its start_time)"),
            ("ray_accepted_to_running", "Ray job created -> RUNNING"),
            ("post_rtt", "POST round trip"),
        ):
            cells = [f"{ray[n][key]['p50_ms']} / {ray[n][key]['p99_ms']}" for n in names]
            lines.append(f"| {what} | {' | '.join(cells)} | {ratio(gl[key]['p50_ms'], raw[key]['p50_ms'])} |")
        if g := gl.get("send_to_gpulab_running"):  # seen by a pass (every tick_interval) after Ray's RUNNING
            lines.append(
                f"| POST sent -> gpulab `started_at` (state running) |{' |' * (len(names) - 1)} "
                f"{g['p50_ms']} / {g['p99_ms']} | |"
            )
        seen = ", ".join(f"{titles[n]} {ray[n]['saw_running']}/{ray[n]['n']}" for n in names)
        own = gl["send_to_ray_accepted"]["p50_ms"] - raw["send_to_ray_accepted"]["p50_ms"]
        total = raw["send_to_ray_running"]["p50_ms"]
        lines.append(
            f"\nRUNNING seen (not only a final state) by 20 ms polls: {seen}.  \n"
            f"gpulab's own time before Ray has the job (p50 of POST sent -> Ray job created, gpulab minus "
            f"raw): {own:.1f} ms = {100 * own / total:.1f}% of raw Ray's submit -> RUNNING p50."
        )
        over = gl["send_to_ray_running"]["p50_ms"] / total - 1
        goals.append(
            (
                "gpulab-on-Ray adds <= 10% to Ray's submit->RUNNING",
                f"{over * 100:+.0f}% end to end (p50); gpulab's own part {100 * own / total:.1f}%",
                over <= 0.10,
            )
        )
        lines.append("")
    if "tick" in res:
        t = res["tick"]
        base = t.get(0) or t.get("0")
        lines += [
            "## 5. One scheduling pass (`JobQueue.tick()`) vs queued jobs (diagnostic, in-process, SQLite)",
            "",
            "The service runs it after a burst of submissions and every tick_interval.",
            "",
            "| jobs queued | median ms | vs 0 queued |",
            "| ---: | ---: | ---: |",
        ]
        lines += [f"| {depth} | {v} | {ratio(v, base)} |" for depth, v in t.items()]
        lines.append("")
    if "lag" in res:
        lag = res["lag"]
        lines += [
            (
                f"## 6. gpulab-jobs event-loop lag ({lag['followers']} SSE followers of a running job's log; "
                "timer every 50 ms, from the service's histogram)"
            ),
            "",
            "| phase | wake-ups | max lag <= ms | p99 <= ms | submissions/s | errors |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
            f"| idle (baseline), 10 s | {lag['idle']['samples']} | {lag['idle']['max_le_ms']} | "
            f"{lag['idle']['p99_le_ms']} | | |",
            f"| burst of {lag['burst_n']} submissions | {lag['burst']['samples']} | {lag['burst']['max_le_ms']} | "
            f"{lag['burst']['p99_le_ms']} | {lag['burst_submit']['rate']:.0f} | {lag['burst_submit']['errors']} |",
            "",
        ]
        goals.append(
            (
                f"max loop lag during a {lag['burst_n']}-job burst with {lag['followers']} followers <= 20 ms",
                f"<= {lag['burst']['max_le_ms']} ms (idle <= {lag['idle']['max_le_ms']} ms)",
                lag["burst"]["max_le_ms"] <= 20,
            )
        )
    if goals:
        lines += ["## Goals", "", "| goal | measured | met |", "| --- | --- | --- |"]
        lines += [f"| {g} | {m} | {'yes' if ok else 'NO'} |" for g, m, ok in goals]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (well under 90 s)")
    ap.add_argument(
        "--only",
        default="throughput,latency,list,ray,tick,lag",
        help="comma-separated sections: throughput, latency, list, ray, tick, lag",
    )
    ap.add_argument(
        "--ray-body",
        action="store_true",
        help="ray: also time raw Ray with the exact request body gpulab sends (a third variant)",
    )
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, databases)")
    ap.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="record the service with py-spy (on PATH, or $PY_SPY) during the SQLite POST /jobs burst "
        "and the list run; writes DIR/<phase>.svg and .folded and prints the hottest frames",
    )
    args = ap.parse_args()
    only = set(args.only.split(","))
    mode = "quick" if args.quick else "full"
    size = dict(SIZES[mode])
    if args.ray_body:
        size["ray_variants"] = ["raw", "raw_gpulab_body", "gpulab"]
    res: dict = {
        "mode": mode,
        "size": size,
        "date": datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "machine": f"{os.cpu_count()} cores, {pyplatform.processor() or pyplatform.machine()}, "
        f"Python {pyplatform.python_version()}",
        "loadavg_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
    work = Path(tempfile.mkdtemp(prefix="gpulab-jobs-bench-"))
    tracker = Tracker()
    started = time.monotonic()

    def on_term(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        sqlite_part = bool(only & {"throughput", "latency", "list", "lag"})
        sqlite_url = f"sqlite:///{work / 'sqlite-service' / 'jobs.sqlite'}"
        keys = None
        if "list" in only:
            log("preloading 10,000 jobs into the SQLite store")
            keys = preload_jobs(sqlite_url, 10_000)
            res["list_jobs"] = len(keys)
        pg_url = pg_store_url = cluster = None
        if "throughput" in only:
            pg_url, pg_store_url = create_database(tracker), create_database(tracker)

        def start_pg():
            return Bench(tracker, work, HOSTS[1], pg_url)

        def start_ray():
            nonlocal cluster
            for attempt in (1, 2):  # a loaded machine can make the head node miss Ray's own start timeout
                # what RayCluster.start() does, but tracked from the start so that it is always stopped
                cluster = RayCluster(work / f"ray-{attempt}", gpu_node=False)
                tracker.clusters.append(cluster)
                log(f"starting a Ray cluster (head node only), attempt {attempt}")
                try:
                    cluster._start(150)
                    break
                except RuntimeError as e:
                    cluster.stop()
                    if attempt == 2:
                        raise
                    log(f"ray did not start ({str(e).splitlines()[0]}); retrying")
            log(f"ray up in {cluster.startup_seconds:.1f}s at {cluster.address}")
            ray_url = f"sqlite:///{work / 'ray-service' / 'jobs.sqlite'}"
            return Bench(
                tracker,
                work,
                HOSTS[2],
                ray_url,
                f'c.JobQueue.executor_class = "ray"\nc.RayExecutor.address = {cluster.address!r}',
            )

        # Start-ups run side by side, but never while something is measured: full mode starts the
        # PostgreSQL and Ray platforms after the SQLite part, quick mode starts everything up front
        # (the idle platforms and Ray then sit beside the SQLite measurements).
        def start_others() -> dict:
            return {
                name: Starter(tracker, fn)
                for name, fn in (("pg", start_pg), ("ray", start_ray))
                if name == "ray" and "ray" in only or name == "pg" and "throughput" in only
            }

        sq = Starter(tracker, lambda: Bench(tracker, work, HOSTS[0], sqlite_url)) if sqlite_part else None
        others = start_others() if args.quick else {}
        bench = sq.result() if sq else None
        for st in others.values():
            st.join()

        # SQLite platform: list (10k finished jobs preloaded), then latency, then throughput last
        # (the throughput run leaves ~1000 parked jobs queued, which every later tick scans).
        if bench is not None:
            if keys:
                log(f"list latency ({size['list_rounds']} rounds)")
                with Profiler(args.profile, "list-sqlite", bench.service_pid()):
                    res["list"] = list_latency(bench, keys, size["list_rounds"])
            if "latency" in only:
                log(f"local submit->running ({size['latency_n']} jobs) and bare Popen baseline")
                res["latency"] = {
                    "popen": latency_popen(work / "popen", size["latency_n"]),
                    "gpulab": latency_local(bench, size["latency_n"]),
                }
            if "throughput" in only:
                res["throughput"] = {
                    "sqlite": throughput(
                        bench,
                        size,
                        "sqlite",
                        f"sqlite:///{work / 'store-only' / 'jobs.sqlite'}",
                        direct=True,
                        profile=args.profile,
                    )
                }
                if keys:  # the same list run again, now that the parked jobs wait in the queue
                    log("list latency again, with the parked jobs queued")
                    res["list_queued"] = list_latency(bench, keys, max(20, size["list_rounds"] // 3))
                    res["list_queued_n"] = res["throughput"]["sqlite"]["submit"]["n"] + 3 * size["threads"]
            if "lag" in only:  # last: its burst adds to the queue, as the throughput run's does
                log(f"event-loop lag: {size['lag_burst']} submissions with 20 log followers")
                res["lag"] = loop_lag(bench, size["lag_burst"], 20, size["threads"])
            stop_platform(tracker, bench)

        if not args.quick:
            others = start_others()
        if "ray" in others:  # Ray is measured and stopped before the PostgreSQL throughput run
            rb = others["ray"].result()
            log(f"ray submit->running ({size['ray_n']} per variant)")
            res["ray"] = ray_compare(rb, cluster.address, size["ray_n"], size["ray_variants"], work / "ray-raw-jobs")
            stop_platform(tracker, rb)
            cluster.stop()
        if "tick" in only:
            log("scheduling pass cost vs queue depth (in-process)")
            res["tick"] = tick_cost(work, size["tick_depths"], 5)
        if "pg" in others:
            pg = others["pg"].result()
            res.setdefault("throughput", {})["postgresql"] = throughput(
                pg, size, "postgresql", pg_store_url, direct=False, profile=args.profile
            )
    except KeyboardInterrupt:
        log("interrupted; stopping everything")
        raise
    finally:
        res["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
        tracker.stop_all()
        if args.keep:
            log(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    res["elapsed_s"] = round(time.monotonic() - started, 1)
    text = report(res)
    print(text)
    print(f"\n(total run time {res['elapsed_s']} s)")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
