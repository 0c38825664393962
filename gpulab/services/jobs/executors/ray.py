"""``RayExecutor``: runs attempts as Ray jobs through the dashboard's Jobs REST API (no ``ray`` import).

Pools map to Ray custom resources (``c.RayExecutor.pool_resources = {"gpu": "gpu_worker"}``): a job
of pool ``gpu`` asks for a sliver of ``gpu_worker``, so Ray places it on a node that has it. Pool
``default`` is made of the nodes without any pool resource and asks for nothing extra (map
``default`` too to pin its jobs). Ray sets ``CUDA_VISIBLE_DEVICES`` for the GPUs it assigns.
"""

import asyncio
import json
import re
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPResponse
from traitlets import Dict, Float, Integer, Unicode

from gpulab.resilience import CircuitBreaker, CircuitOpenError, is_outage, retrying

from .base import Executor, ExecutorUnavailable, Handle, Launch, Outcome, PoolCapacity, read_range

DEFAULT_POOL = "default"
POOL_SLIVER = 0.001  # pool resources are node markers: any number of jobs share them
# Failures of the platform (supervisor actor or its node died, never started), not of the job's code.
RETRYABLE_ERRORS = {"JOB_SUPERVISOR_ACTOR_DIED", "JOB_SUPERVISOR_ACTOR_START_TIMEOUT"}
DIED = re.compile(r"\b(died|node .*(dead|removed|failed))\b", re.I)


Benign = Callable[[HTTPResponse], bool]  # is this 5xx about one job rather than the cluster?


def _never(response: HTTPResponse) -> bool:
    return False


def _always(response: HTTPResponse) -> bool:
    return True


def _exists(response: HTTPResponse) -> bool:
    return b"already exists" in (response.body or b"")


class RayExecutor(Executor):
    """Attempts as Ray jobs, ``submission_id`` ``gpulab-<job id>-<attempt>``; Ray picks the GPUs."""

    name = "ray"
    owns_gpu_ids = False
    start_pending = True  # a submitted job is PENDING until Ray has started its driver
    env_is_private = False  # Ray's dashboard shows every job's runtime_env to whoever reaches it

    address = Unicode("http://127.0.0.1:8265", config=True, help="Ray dashboard URL.")
    pool_resources = Dict(
        key_trait=Unicode(),
        value_trait=Unicode(),
        config=True,
        help='Pool name -> Ray custom resource its nodes carry, e.g. {"gpu": "gpu_worker"}.',
    )
    request_timeout = Float(10.0, config=True, help="Seconds for one HTTP request to the dashboard.")
    failure_threshold = Integer(5, config=True, help="Consecutive failures that open the circuit.")
    recovery_timeout = Float(30.0, config=True, help="Seconds the circuit stays open before a probe.")

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.address = self.address.rstrip("/")
        self.breaker = CircuitBreaker(f"ray at {self.address}", self.failure_threshold, self.recovery_timeout)
        self._http: AsyncHTTPClient | None = None

    async def _fetch(self, method: str, path: str, body: dict | None, benign_5xx: Benign) -> HTTPResponse:
        """One request through the breaker; a 5xx answer counts as a failure of the cluster."""
        if self._http is None:
            self._http = AsyncHTTPClient(force_instance=True)
        async with self.breaker:
            response = await self._http.fetch(
                self.address + path,
                method=method,
                raise_error=False,
                body=None if method == "GET" else json.dumps(body or {}),
                headers={"Content-Type": "application/json"},
                connect_timeout=self.request_timeout,
                request_timeout=self.request_timeout,
            )
            if response.code >= 500 and not benign_5xx(response):
                raise HTTPClientError(response.code, _text(response)[-300:], response)
            return response

    async def _request(
        self, method: str, path: str, body: dict | None = None, benign_5xx: Benign = _never
    ) -> HTTPResponse:
        """``_fetch``, retried when idempotent (GET); an outage becomes ``ExecutorUnavailable``."""
        try:
            if method != "GET":
                return await self._fetch(method, path, body, benign_5xx)
            async for attempt in retrying():
                with attempt:
                    return await self._fetch(method, path, None, benign_5xx)
        except CircuitOpenError as e:
            raise ExecutorUnavailable(str(e)) from e
        except Exception as e:
            if is_outage(e):
                raise ExecutorUnavailable(f"{self.breaker.name} is unavailable: {e}") from e
            raise

    async def _get_json(self, path: str) -> dict | list | None:
        """The decoded body, or None for 404."""
        response = await self._request("GET", path)
        if response.code == 404:
            return None
        _check(response, path)
        return json.loads(response.body)

    async def capacity(self) -> dict[str, PoolCapacity]:
        data = await self._get_json("/api/v0/nodes?limit=10000")
        nodes = [n["resources_total"] for n in data["data"]["result"]["result"] if n["state"] == "ALIVE"]
        markers = set(self.pool_resources.values())
        pools = {DEFAULT_POOL: [r for r in nodes if not markers & r.keys()]}
        pools |= {pool: [r for r in nodes if resource in r] for pool, resource in self.pool_resources.items()}
        return {
            pool: PoolCapacity(
                gpus=int(sum(r.get("GPU", 0) for r in members)),
                cpus=sum(r.get("CPU", 0) for r in members),
                memory=int(sum(r.get("memory", 0) for r in members)),
            )
            for pool, members in pools.items()
        }

    async def start(self, launch: Launch) -> Handle:
        submission_id = f"gpulab-{launch.job_id}-{launch.attempt}"
        env = {k: v for k, v in launch.env.items() if k != "CUDA_VISIBLE_DEVICES"}
        if not launch.gpus:
            env["CUDA_VISIBLE_DEVICES"] = ""  # Ray leaves it unset for jobs without GPUs
        # Ray's working_dir must be a URI to a package; the gpulab runner changes into this one.
        env["GPULAB_WORKING_DIR"] = launch.working_dir
        body = {
            "submission_id": submission_id,
            "entrypoint": shlex.join(launch.argv),
            "entrypoint_num_cpus": launch.cpus,
            "entrypoint_num_gpus": launch.gpus,
            "runtime_env": {"env_vars": env},
            "metadata": {
                "gpulab_job_id": launch.job_id,
                "gpulab_owner": launch.owner,
                "gpulab_attempt": str(launch.attempt),
            },
        }
        if launch.memory:
            body["entrypoint_memory"] = launch.memory
        if resource := self.pool_resources.get(launch.pool):
            body["entrypoint_resources"] = {resource: POOL_SLIVER}
        elif launch.pool != DEFAULT_POOL:
            raise ValueError(f"pool {launch.pool!r} has no Ray resource in RayExecutor.pool_resources")
        response = await self._request("POST", "/api/jobs/", body, benign_5xx=_exists)
        if response.code != 200 and not _exists(response):  # exists: started before, same attempt
            _check(response, "submit")
        return Handle(executor=self.name, ref=submission_id)

    async def poll(self, handle: Handle) -> Outcome:
        job = await self._get_json(f"/api/jobs/{quote(handle.ref)}")
        if job is None:
            return Outcome("lost", reason=f"ray no longer knows job {handle.ref}")
        status, exit_code = job["status"], job.get("driver_exit_code")
        message = (job.get("message") or "").strip()
        if status == "PENDING":
            return Outcome("starting", reason="PENDING" + (f": {message.splitlines()[0]}" if message else ""))
        if status == "RUNNING":
            return Outcome("running")
        if status == "SUCCEEDED":
            return Outcome("succeeded", exit_code=exit_code)
        if status == "STOPPED":
            return Outcome("failed", exit_code=exit_code, reason="stopped")
        error_type = job.get("error_type") or ""
        retryable = error_type in RETRYABLE_ERRORS or (
            error_type != "JOB_ENTRYPOINT_COMMAND_ERROR" and bool(DIED.search(message))
        )
        reason = message.splitlines()[0].split(", last available logs")[0] if message else status
        return Outcome("failed", exit_code=exit_code, reason=reason, retryable=retryable)

    async def cancel(self, handle: Handle, grace: float) -> None:
        """Ray sends SIGTERM, then SIGKILL after the cluster's ``RAY_JOB_STOP_WAIT_TIME_S``; this waits up
        to ``grace`` s for the job to end, so that a log saved next is complete."""
        response = await self._request("POST", f"/api/jobs/{quote(handle.ref)}/stop")
        if response.code == 404:
            return
        _check(response, "stop")
        deadline = time.monotonic() + grace
        while (await self.poll(handle)).state in ("starting", "running") and time.monotonic() < deadline:
            await asyncio.sleep(0.2)

    async def read_logs(self, handle: Handle, log_path: Path, offset: int, limit: int) -> bytes:
        """From ``log_path`` once :meth:`save_logs` wrote it, else from Ray."""
        if (data := read_range(log_path, offset, limit)) is not None:
            return data
        return (await self._logs(handle) or b"")[offset : offset + limit]

    async def save_logs(self, handle: Handle, log_path: Path) -> None:
        """Write Ray's log of the attempt to ``log_path`` (nothing if Ray cannot give it)."""
        if (logs := await self._logs(handle)) is not None:
            tmp = log_path.with_name(log_path.name + ".tmp")
            tmp.write_bytes(logs)
            tmp.replace(log_path)

    async def _logs(self, handle: Handle) -> bytes | None:
        # A 5xx here means the logs are out of reach (their node died), not that the cluster is down.
        response = await self._request("GET", f"/api/jobs/{quote(handle.ref)}/logs", benign_5xx=_always)
        if response.code != 200:
            self.log.warning("ray logs of %s: HTTP %s", handle.ref, response.code)
            return None
        return json.loads(response.body)["logs"].encode()

    async def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None


def _text(response: HTTPResponse) -> str:
    return (response.body or b"").decode(errors="replace").strip()


def _check(response: HTTPResponse, what: str) -> None:
    if response.code >= 400:
        lines = _text(response).splitlines()
        raise RuntimeError(f"ray {what}: HTTP {response.code}: {lines[-1] if lines else response.reason}")
