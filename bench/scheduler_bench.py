#!/usr/bin/env python
"""Benchmark of gpulab-jobs' scheduling policy, modelled on Kueue's scheduler performance test (issue 17).

    python bench/scheduler_bench.py [--quick] [--only sim,pass,real] [--json out.json]

Sections, each comparing in the same run the policy of today (cohorts, backfill, preemption, fair share from
history) with the one before issue 17 (best-effort FIFO over instantaneous fair share: whatever fits starts, the
owner with the fewest running GPUs first):

1. sim: a generated workload of 5 cohorts x 6 groups on a simulated 240-GPU cluster. The real JobQueue and
   JobStore (SQLite) schedule it; the executor "runs" each job for its runtime on a virtual clock, without
   processes, so the policy, not the machine, is measured. Classes: small (1 GPU, 5-15 min, preemptible),
   medium (4 GPUs, 20-60 min, admin priority 50), large (16 GPUs, 1-2 h, admin priority 100); each job's
   max_runtime is 1.2x its runtime; groups of a cohort differ in load (two of six nearly idle, so that the others
   borrow), cohorts carry the same load (a cohort does not lend to another, as in Kueue). A preempted
   job checkpoints every 5 simulated minutes: its wasted GPU-seconds are those since its last checkpoint.
   Reported per class: time to admission (mean, p95); the cluster's GPU utilisation while work is pending (and,
   as Kueue sees it, each cohort's use of its own share, the sum of its groups' quotas, while it has work); the
   largest wait of a large job against its fair-share expectation (the mean GPU-weighted job runtime: the time
   the cluster takes to turn over once); preemptions, their wasted GPU-seconds, and preemption loops.
2. pass: one scheduling pass (``JobQueue._dispatch_queued``) with 10,000 and 100,000 jobs queued in a full
   cluster, median of a few passes; baseline: the same pass with the previous policy's settings.
3. real: a small workload on the local executor with real processes (pretend GPUs), admission time per class.

Goals (issue 17): utilisation >= 95 % of capacity while work is pending, no large job waiting longer than 2x
its fair-share expectation, 0 preemption loops, a scheduling pass <= 50 ms at 100,000 queued jobs.
"""

import argparse
import asyncio
import json
import math
import random
import re
import statistics
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from datetime import datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from jobs_bench import log, pct  # noqa: E402 (the benches' own helpers)
from sqlalchemy import insert  # noqa: E402
from traitlets.config import Config  # noqa: E402

from gpulab.services.jobs import queue as queue_module  # noqa: E402
from gpulab.services.jobs import store as store_module  # noqa: E402
from gpulab.services.jobs.executors.base import Executor, Handle, Launch, Outcome, PoolCapacity  # noqa: E402
from gpulab.services.jobs.models import JobSpec  # noqa: E402
from gpulab.services.jobs.queue import JobQueue  # noqa: E402
from gpulab.services.jobs.store import JobRow, JobStore  # noqa: E402

COHORTS, GROUPS_PER_COHORT, NOMINAL = 5, 6, 8  # 240 GPUs
CAPACITY = COHORTS * GROUPS_PER_COHORT * NOMINAL
COHORT_GPUS = GROUPS_PER_COHORT * NOMINAL  # a cohort's share: the sum of its groups' nominal quotas
CLASSES = {  # gpus, runtime range (s), admin priority, share of submissions
    "small": (1, (300, 900), 0, 0.6),
    "medium": (4, (1200, 3600), 50, 0.3),
    "large": (16, (3600, 7200), 100, 0.1),
}
CHECKPOINT_EVERY = 300.0
STEP = 30.0  # simulated seconds between scheduling passes
PREEMPTED = re.compile(r"preempted by job ([0-9a-f]{32})")
WALL_CLOCK = store_module.utcnow  # the queue's and store's own, restored for the real run


def at(iso: str) -> datetime:
    return datetime.fromisoformat(iso.removesuffix("Z"))


class Clock:
    """The virtual time the queue and the store read (their ``utcnow``)."""

    def __init__(self):
        self.now = datetime(2026, 12, 7, 8, 0)

    def __call__(self) -> datetime:
        return self.now


class SimExecutor(Executor):
    """Runs nothing: an attempt "runs" for its job's remaining runtime on the clock; a cancel is a preemption,
    which keeps the work up to the last checkpoint."""

    name = "sim"
    owns_gpu_ids = False

    def __init__(self, clock: Clock, remaining: dict[str, float], **kwargs):
        super().__init__(**kwargs)
        self.clock, self.remaining = clock, remaining
        self.started: dict[str, datetime] = {}
        self.wasted = 0.0  # GPU-seconds lost to preemptions
        self.gpus: dict[str, int] = {}

    async def capacity(self):
        return {"default": PoolCapacity(gpus=CAPACITY, cpus=100_000.0)}

    async def start(self, launch: Launch) -> Handle:
        self.started[launch.job_id], self.gpus[launch.job_id] = self.clock.now, launch.gpus
        return Handle(executor=self.name, ref=launch.job_id)

    async def poll(self, handle: Handle) -> Outcome:
        elapsed = (self.clock.now - self.started[handle.ref]).total_seconds()
        return Outcome("succeeded", 0) if elapsed >= self.remaining[handle.ref] else Outcome("running")

    async def cancel(self, handle: Handle, grace: float) -> None:
        elapsed = (self.clock.now - self.started[handle.ref]).total_seconds()
        kept = math.floor(elapsed / CHECKPOINT_EVERY) * CHECKPOINT_EVERY
        self.remaining[handle.ref] -= kept
        self.wasted += (elapsed - kept) * self.gpus[handle.ref]

    async def read_logs(self, handle, log_path, offset, limit) -> bytes:
        return b""


def workload(hours: float, seed: int = 7) -> list[dict]:
    """Submissions over ``hours``: groups' loads differ (a third nearly idle), cohorts' do not; about 1.3x the
    cluster while they arrive."""
    rng = random.Random(seed)
    groups = [f"c{c}g{g}" for c in range(COHORTS) for g in range(GROUPS_PER_COHORT)]
    load = {}
    for c in range(COHORTS):  # within a cohort, groups differ (two nearly idle); each cohort's total is the same
        shares = [0.1, 0.1, 1.0, 1.5, 2.0, 2.5]
        rng.shuffle(shares)
        load.update({f"c{c}g{g}": share for g, share in enumerate(shares)})
    mean_gpu_seconds = sum(share * gpus * sum(rt) / 2 for gpus, rt, _, share in CLASSES.values())
    rate = 1.3 * CAPACITY / mean_gpu_seconds  # submissions a second over the whole cluster
    jobs, t = [], 0.0
    weights = [load[g] for g in groups]
    while t < hours * 3600:
        t += rng.expovariate(rate)
        name = rng.choices(list(CLASSES), [c[3] for c in CLASSES.values()])[0]
        gpus, (lo, hi), priority, _ = CLASSES[name]
        group = rng.choices(groups, weights)[0]
        runtime = rng.uniform(lo, hi)
        jobs.append(
            {
                "at": t,
                "cls": name,
                "owner": f"{group}-u{rng.randint(0, 3)}",
                "group": group,
                "gpus": gpus,
                "priority": priority,
                "runtime": runtime,
            }
        )
    return jobs


def policy_config(name: str) -> dict:
    """The queue settings of a policy: ``new`` (this issue's, cohorts lending to one another), ``strict`` (the
    same, each cohort a slice of its own) or ``old`` (before it)."""
    common = {"user_quota": {"max_jobs": None, "max_gpus": None}, "max_queued": 1_000_000, "submit_burst": 10**9}
    if name == "old":  # FIFO over instantaneous fair share (fewest running GPUs), whatever fits starts
        return {
            **common,
            "backfill": False,
            "usage_weights": {"gpus": 0.0, "cpus": 0.0, "memory": 0.0},
        }
    cohorts = {
        f"c{c}": {f"c{c}g{g}": {"default": {"gpus": NOMINAL}} for g in range(GROUPS_PER_COHORT)} for c in range(COHORTS)
    }
    return {
        **common,
        "cohorts": cohorts,
        "lend_between_cohorts": name == "new",
        "preemption_grace": 0.0,
        "usage_half_life": 24 * 3600.0,
    }


def make_queue(work: Path, policy: str, clock: Clock, remaining: dict) -> JobQueue:
    store = JobStore(url=f"sqlite:///{work / 'jobs.sqlite'}")
    cfg = Config({"JobQueue": policy_config(policy)})
    queue = JobQueue(config=cfg, store=store, data_dir=str(work), wrap_with_runner=False, submit_rate=1e9)
    queue.executor = SimExecutor(clock, remaining, parent=queue)
    return queue


async def simulate(policy: str, jobs: list[dict], work: Path) -> dict:
    """Run ``jobs`` through the queue under ``policy`` until all have ended."""
    clock, remaining = Clock(), {}
    queue_module.utcnow = store_module.utcnow = clock
    queue = make_queue(work, policy, clock, remaining)
    store, start = queue.store, clock.now
    classes, submitted, pending = {}, 0, list(jobs)
    busy_gpu_seconds = pending_seconds = cohort_busy = cohort_pending = 0.0
    passes = []
    while pending or submitted == 0 or store.active_jobs() or store.any_queued():
        clock.now += timedelta(seconds=STEP)
        elapsed = (clock.now - start).total_seconds()
        while pending and pending[0]["at"] <= elapsed:
            j = pending.pop(0)
            spec = JobSpec(
                name=j["cls"],
                entrypoint=["true"],
                resources={"gpus": j["gpus"], "cpus": 1.0},
                priority=j["priority"],
                max_runtime=int(j["runtime"] * 1.2) + 1,
                preemptible=j["cls"] == "small" and policy != "old",
                labels={"class": j["cls"]},
            )
            row, _ = store.create_job(j["owner"], [j["group"]], spec, admin=True)
            remaining[row.id], classes[row.id] = j["runtime"], j["cls"]
            submitted += 1
        t0 = time.perf_counter()
        await queue.tick()
        passes.append(time.perf_counter() - t0)
        for _ in range(3):  # preemptions' stops
            await asyncio.sleep(0)
        active = store.active_jobs()
        if store.any_queued():
            busy_gpu_seconds += sum(r.gpus for r in active) * STEP
            pending_seconds += STEP
        for cohort in {r.groups[0][:2] for r in store.queued_jobs()}:  # each cohort with work pending
            cohort_busy += sum(r.gpus for r in active if r.groups[0].startswith(cohort)) * STEP
            cohort_pending += STEP
        if elapsed > 48 * 3600:
            raise RuntimeError(f"{policy}: not done after 48 simulated hours")
    waits, preemptions, pairs = defaultdict(list), 0, set()
    for job_id, cls in classes.items():
        events = store.events(job_id)
        first = next(e.at for e in events if e.to_state == "running")
        waits[cls].append((at(first) - at(events[0].at)).total_seconds())
        for e in events:
            if m := PREEMPTED.search(e.reason or ""):
                preemptions += 1
                pairs.add((m[1], job_id))
    loops = sum(1 for a, b in pairs if (b, a) in pairs) // 2
    gpu_weighted = sum(j["gpus"] * j["runtime"] for j in jobs) / sum(j["gpus"] for j in jobs)
    await queue.stop()
    store.engine.dispose()
    return {
        "jobs": submitted,
        "admission": {
            c: {"mean_min": statistics.mean(w) / 60, "p95_min": pct(w, 95) / 60, "n": len(w)} for c, w in waits.items()
        },
        "utilisation": busy_gpu_seconds / (pending_seconds * CAPACITY) if pending_seconds else math.nan,
        "cohort_utilisation": cohort_busy / (cohort_pending * COHORT_GPUS) if cohort_pending else math.nan,
        "largest_large_wait_min": max(waits["large"]) / 60,
        "fair_share_expectation_min": gpu_weighted / 60,
        "preemptions": preemptions,
        "wasted_gpu_hours": queue.executor.wasted / 3600,
        "preemption_loops": loops,
        "simulated_hours": (clock.now - start).total_seconds() / 3600,
        "pass_ms_median": statistics.median(passes) * 1000,
    }


def pass_time(policy: str, depth: int, work: Path, reps: int) -> float:
    """Median ms of one scheduling pass with ``depth`` jobs queued and the cluster full (running jobs)."""
    clock, remaining = Clock(), {}
    queue_module.utcnow = store_module.utcnow = clock
    queue = make_queue(work, policy, clock, remaining)
    rng = random.Random(3)
    groups = [f"c{c}g{g}" for c in range(COHORTS) for g in range(GROUPS_PER_COHORT)]
    spec = JobSpec(name="bench", entrypoint=["true"], resources={"gpus": 1}).model_dump(mode="json")
    now = clock.now
    running, queued = [], []
    for i in range(CAPACITY):  # one GPU each: the cluster is full
        group = groups[i % len(groups)]
        job_id = uuid.uuid4().hex
        remaining[job_id] = 1e9
        queue.executor.started[job_id], queue.executor.gpus[job_id] = now, 1
        running.append(row_values(job_id, f"{group}-u0", group, 1, now, "running", {"executor": "sim", "ref": job_id}))
    for i in range(depth):
        group = rng.choice(groups)
        gpus = rng.choice([1, 1, 1, 4, 16])
        values = row_values(uuid.uuid4().hex, f"{group}-u{rng.randint(0, 9)}", group, gpus, now, "queued", None)
        values["created_at"] = now - timedelta(seconds=depth - i)
        queued.append(values)
    for values in (*running, *queued):
        values["spec"] = spec
    with queue.store.engine.begin() as conn:
        conn.execute(insert(JobRow.__table__), running)
        for i in range(0, len(queued), 20_000):
            conn.execute(insert(JobRow.__table__), queued[i : i + 20_000])

    async def passes() -> list[float]:
        await queue._dispatch_queued()  # the first records every waiting reason
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            await queue._dispatch_queued()
            times.append(time.perf_counter() - t0)
        return times

    times = asyncio.run(passes())
    queue.store.engine.dispose()
    return statistics.median(times) * 1000


def row_values(job_id, owner, group, gpus, now, state, handle) -> dict:
    return {
        "id": job_id,
        "owner": owner,
        "groups": [group],
        "name": "bench",
        "kind": "train",
        "state": state,
        "state_reason": "submitted",
        "priority": 0,
        "pool": "default",
        "gpus": gpus,
        "cpus": 1.0,
        "memory": None,
        "attempt": 1 if state == "running" else 0,
        "max_retries": 0,
        "not_before": None,
        "idempotency_key": None,
        "labels": {},
        "created_at": now,
        "updated_at": now,
        "started_at": now if state == "running" else None,
        "handle": handle,
        "max_runtime": 3600,
    }


async def real_run(policy: str, work: Path) -> dict:
    """A small workload on the local executor: real processes (``sleep``) on 4 pretend GPUs, 2 groups."""
    store = JobStore(url=f"sqlite:///{work / 'jobs.sqlite'}")
    cohorts = {"c": {"a": {"default": {"gpus": 2}}, "b": {"default": {"gpus": 2}}}}
    settings = {"cohorts": cohorts}
    if policy == "old":
        settings = {"backfill": False, "usage_weights": {"gpus": 0.0, "cpus": 0.0, "memory": 0.0}}
    cfg = Config(
        {
            "JobQueue": {"tick_interval": 0.1, "user_quota": {"max_jobs": None, "max_gpus": None}, **settings},
            "LocalExecutor": {"gpus": 4, "cpus": 64.0},
        }
    )
    queue = JobQueue(config=cfg, store=store, data_dir=str(work), wrap_with_runner=False)
    await queue.start()
    rng, ids = random.Random(5), {}
    for i in range(24):
        cls = "large" if i % 6 == 5 else "small"
        gpus, seconds = (4, 1.5) if cls == "large" else (1, rng.uniform(0.3, 1.2))
        group = "a" if i % 3 else "b"
        spec = JobSpec(
            name=cls,
            entrypoint=["sleep", f"{seconds:.2f}"],
            resources={"gpus": gpus, "cpus": 0.1},
            max_runtime=int(seconds) + 2,
            priority=100 if cls == "large" else 0,
        )
        row, _ = await queue.submit(f"{group}-user", [group], spec, admin=True)
        ids[row.id] = cls
        await asyncio.sleep(0.1)
    deadline = time.monotonic() + 120
    while any(store.get_job(i).state in ("queued", "dispatching", "running") for i in ids):
        assert time.monotonic() < deadline, "the real run did not finish in 120 s"
        await asyncio.sleep(0.2)
    await queue.stop()
    waits = defaultdict(list)
    for job_id, cls in ids.items():
        row = store.get_job(job_id)
        assert row.state == "succeeded", (row.state, row.state_reason)
        waits[cls].append((row.started_at - row.created_at).total_seconds())
    store.engine.dispose()
    return {c: {"mean_s": statistics.mean(w), "max_s": max(w)} for c, w in waits.items()}


def report(res: dict) -> str:
    out = []
    if "sim" in res:
        runs = [res["sim"][p] for p in ("new", "strict", "old")]
        new = runs[0]
        out += [
            f"### Simulated cluster ({CAPACITY} GPUs, {COHORTS} cohorts x {GROUPS_PER_COHORT} groups, "
            f"{new['jobs']} jobs over {res['sim']['hours']} h of arrivals)",
            "",
            "| | new policy | new, cohorts not lending to each other | before issue 17 | goal |",
            "| --- | ---: | ---: | ---: | --- |",
        ]

        def row(label, cell, goal=""):
            out.append(f"| {label} | " + " | ".join(cell(r) for r in runs) + f" | {goal} |")

        for cls in CLASSES:
            row(
                f"{cls}: admission mean / p95 (min)",
                lambda r, c=cls: f"{r['admission'][c]['mean_min']:.1f} / {r['admission'][c]['p95_min']:.1f}",
            )
        row("GPU utilisation while work is pending", lambda r: f"{r['utilisation']:.1%}", ">= 95%")
        row("a cohort's use of its share while it has work pending", lambda r: f"{r['cohort_utilisation']:.1%}")
        row(
            "largest wait of a large job (min)",
            lambda r: (
                f"{r['largest_large_wait_min']:.1f} "
                f"({r['largest_large_wait_min'] / r['fair_share_expectation_min']:.2f}x)"
            ),
            f"<= 2x the expectation, {new['fair_share_expectation_min']:.1f} min",
        )
        row("preemptions / wasted GPU-hours", lambda r: f"{r['preemptions']} / {r['wasted_gpu_hours']:.1f}")
        row("preemption loops", lambda r: str(r["preemption_loops"]), "0")
        row("scheduling pass, median over the run (ms)", lambda r: f"{r['pass_ms_median']:.1f}")
        out.append("")
    if "pass" in res:
        out += ["### One scheduling pass, cluster full", "", "| jobs queued | new policy (ms) | before (ms) | ratio |"]
        out.append("| ---: | ---: | ---: | ---: |")
        for depth, (a, b) in res["pass"].items():
            out.append(f"| {int(depth):,} | {a:.1f} | {b:.1f} | {a / b:.2f}x |")
        out.append("")
    if "real" in res:
        out += ["### Local executor, real processes (4 pretend GPUs)", "", "| class | new: mean / max (s) | before |"]
        out.append("| --- | ---: | ---: |")
        for cls in res["real"]["new"]:
            a, b = res["real"]["new"][cls], res["real"]["old"][cls]
            out.append(f"| {cls} | {a['mean_s']:.2f} / {a['max_s']:.2f} | {b['mean_s']:.2f} / {b['max_s']:.2f} |")
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 h of arrivals, 10,000 queued at most")
    parser.add_argument("--only", default="sim,pass,real")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    only = set(args.only.split(","))
    res: dict = {}
    with tempfile.TemporaryDirectory(prefix="gpulab-scheduler-bench-") as tmp:
        work = Path(tmp)
        if "sim" in only:
            hours = 1.0 if args.quick else 4.0
            jobs = workload(hours)
            res["sim"] = {"hours": hours}
            for policy in ("new", "strict", "old"):
                log(f"sim: {policy} policy, {len(jobs)} jobs")
                (work / f"sim-{policy}").mkdir()
                res["sim"][policy] = asyncio.run(simulate(policy, jobs, work / f"sim-{policy}"))
        if "pass" in only:
            res["pass"] = {}
            for depth in (10_000,) if args.quick else (10_000, 100_000):
                times = []
                for policy in ("new", "old"):
                    log(f"pass: {policy} policy, {depth} queued")
                    (work / f"pass-{policy}-{depth}").mkdir()
                    times.append(pass_time(policy, depth, work / f"pass-{policy}-{depth}", 5))
                res["pass"][depth] = times
        if "real" in only:
            queue_module.utcnow = store_module.utcnow = WALL_CLOCK
            res["real"] = {}
            for policy in ("new", "old"):
                log(f"real: {policy} policy")
                (work / f"real-{policy}").mkdir()
                res["real"][policy] = asyncio.run(real_run(policy, work / f"real-{policy}"))
    print(report(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
