"""Triton replicas behind the gateway: health checks, a circuit breaker each, least-outstanding-requests.

Requests travel as serialized bytes (identity serializers on gRPC, bodies as they came on HTTP): tensors are
never decoded or re-encoded.
"""

import asyncio
import math
from collections.abc import Awaitable, Callable, Mapping
from typing import NamedTuple

import aiohttp
import grpc
import yarl
from tritonclient.grpc import service_pb2

from ...resilience import OPEN, CircuitBreaker, CircuitOpenError, is_outage, retrying

SERVICE = "/inference.GRPCInferenceService/"
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    # reconnect soon after a replica comes back (gRPC's default backoff grows to 120 s)
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
_TRANSPORT = (
    "failed to connect",
    "connection refused",
    "socket closed",
    "connection reset",
    "broken pipe",
    "goaway",
    "endpoint read failed",
    "keepalive watchdog",
)


def is_transport_error(exc: BaseException) -> bool:
    """The replica was unreachable or dropped the call; not an answer from Triton (which also uses UNAVAILABLE)."""
    if isinstance(exc, grpc.aio.AioRpcError):
        details = (exc.details() or "").lower()
        return exc.code() == grpc.StatusCode.UNAVAILABLE and any(p in details for p in _TRANSPORT)
    return isinstance(exc, aiohttp.ClientError) or is_outage(exc)  # aiohttp: no (whole) answer


def not_sent(exc: BaseException) -> bool:
    """The request never reached the replica, so it may go to another one."""
    if isinstance(exc, grpc.aio.AioRpcError):
        details = (exc.details() or "").lower()
        return exc.code() == grpc.StatusCode.UNAVAILABLE and (
            "failed to connect" in details or "connection refused" in details
        )
    return isinstance(exc, ConnectionRefusedError | aiohttp.ClientConnectorError)


class NoReplicaError(Exception):
    """No replica can take the request; the message says why for each one."""


class HTTPAnswer(NamedTuple):
    """Triton's answer on its HTTP endpoint, whatever its status."""

    status: int
    headers: Mapping[str, str]
    body: bytes


class Replica:
    """One Triton server: its gRPC endpoint and, where configured, its HTTP one (``host:port`` or, as the embedded
    Triton's are, ``unix:<path>``)."""

    def __init__(self, address: str, failure_threshold: int, recovery_timeout: float, http_address: str = ""):
        self.address = address
        self.http_address = http_address
        self._session: aiohttp.ClientSession | None = None
        self.channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.breaker = CircuitBreaker(
            f"Triton replica {address}", failure_threshold, recovery_timeout, is_failure=is_transport_error
        )
        # its HTTP endpoint fails on its own (a wrong port, HTTP turned off) without taking gRPC calls away
        self.http_breaker = CircuitBreaker(
            f"Triton replica {address}'s HTTP endpoint {http_address}",
            failure_threshold,
            recovery_timeout,
            is_failure=is_transport_error,
        )
        self.healthy = True  # until a check or a call says otherwise
        self.outstanding = 0
        self.requests = 0
        self.last_error = ""
        self._methods: dict[str, grpc.aio.UnaryUnaryMultiCallable] = {}

    def method(self, name: str):
        if name not in self._methods:
            self._methods[name] = self.channel.unary_unary(SERVICE + name)
        return self._methods[name]

    def stream(self, metadata) -> grpc.aio.StreamStreamCall:
        return self.channel.stream_stream(SERVICE + "ModelStreamInfer")(metadata=metadata)

    @property
    def available(self) -> bool:
        """Healthy, and its breaker lets calls through."""
        return self.healthy and self.breaker.state != OPEN

    def serves(self, http: bool) -> bool:
        """Available, and for HTTP calls its HTTP endpoint's breaker lets them through too."""
        return self.available and not (http and self.http_breaker.state == OPEN)

    def status(self) -> str:
        for breaker in (self.breaker, self.http_breaker):
            if breaker.state == OPEN:
                retry_in = math.ceil(breaker.snapshot()["retry_in"])
                return f"{breaker.name} is unavailable (circuit open, retry in {retry_in} s; {self.last_error})"
        return f"{self.breaker.name} is {'up' if self.healthy else 'down'}" + (
            "" if self.healthy else f" ({self.last_error or 'not checked yet'})"
        )

    def _failed(self, exc: BaseException, down: bool = True) -> None:
        if down:
            self.healthy = False
        self.last_error = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else f"{type(exc).__name__}: {exc}"

    async def call(self, name: str, request: bytes, metadata, timeout: float | None) -> bytes:
        return await self._counted(lambda: self.method(name)(request, metadata=metadata, timeout=timeout))

    @property
    def session(self) -> aiohttp.ClientSession:
        """The client of its HTTP endpoint: kept-alive connections, bodies passed as they are."""
        if self._session is None:
            socket_path = self.http_address.removeprefix("unix:")
            options = {"limit": 0, "keepalive_timeout": 60}
            self._session = aiohttp.ClientSession(
                connector=(
                    aiohttp.UnixConnector(socket_path, **options)
                    if socket_path != self.http_address
                    else aiohttp.TCPConnector(**options)
                ),
                auto_decompress=False,
                timeout=aiohttp.ClientTimeout(total=None, connect=5, sock_read=3600),  # as nginx's proxy_read_timeout
                skip_auto_headers=("User-Agent", "Accept-Encoding"),
            )
        return self._session

    async def close(self) -> None:
        await self.channel.close()
        if self._session is not None:
            await self._session.close()

    async def fetch(self, method: str, path: str, body: bytes, headers: dict) -> HTTPAnswer:
        """``method path`` on the replica's HTTP endpoint, the path sent exactly as given (yarl would resolve dot
        segments); transport failures raise, answers return."""
        host = "localhost" if self.http_address.startswith("unix:") else self.http_address
        url = yarl.URL(f"http://{host}{path}", encoded=True)

        async def send() -> HTTPAnswer:
            async with self.session.request(method, url, data=body, headers=headers, allow_redirects=False) as response:
                return HTTPAnswer(response.status, response.headers, await response.read())

        return await self._counted(send, http=True)

    async def _counted(self, send: Callable[[], Awaitable], http: bool = False):
        """``send()`` through the gRPC or HTTP breaker, counted as in flight; a transport failure on gRPC marks the
        replica down (on HTTP only its HTTP endpoint's breaker counts it)."""
        self.outstanding += 1
        self.requests += 1
        try:
            async with self.http_breaker if http else self.breaker:
                return await send()
        except Exception as exc:
            if is_transport_error(exc):
                self._failed(exc, down=not http)
            raise
        finally:
            self.outstanding -= 1

    async def check(self, metadata, timeout: float) -> None:
        """ServerLive through the breaker (the probe when half-open); skipped while open. Not ServerReady: with
        Triton's default strict readiness it is false while any model loads, which would drain every replica
        on each deploy."""
        try:
            async with self.breaker:
                reply = await asyncio.wait_for(self.method("ServerLive")(b"", metadata=metadata), timeout)
        except CircuitOpenError:
            return
        except Exception as exc:  # noqa: BLE001 - any failure makes the replica unhealthy
            self._failed(exc)
            return
        self.healthy = service_pb2.ServerLiveResponse.FromString(reply).live
        self.last_error = "" if self.healthy else "server not live"


class ReplicaPool:
    """Picks the healthy replica with the fewest outstanding requests (round robin among equals).

    ``metadata``: gRPC metadata every call carries (the platform key); ``http_addresses``: each replica's HTTP
    endpoint, in the order of ``addresses`` (none: no HTTP forwarding), whose calls carry ``http_headers``."""

    def __init__(
        self,
        addresses: list[str],
        metadata,
        failure_threshold: int = 3,
        recovery_timeout: float = 5.0,
        health_interval: float = 2.0,
        http_addresses: list[str] = (),
        http_headers: dict | None = None,
    ):
        http = list(http_addresses) or [""] * len(addresses)
        self.replicas = [Replica(a, failure_threshold, recovery_timeout, h) for a, h in zip(addresses, http)]
        self.metadata = metadata
        self.http = bool(http_addresses)  # the replicas' HTTP endpoints are known
        self.http_headers = http_headers or {}
        self.health_interval = health_interval
        self._next = 0
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._health_loop())

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
        for replica in self.replicas:
            await replica.close()

    async def _health_loop(self) -> None:
        while True:
            await asyncio.gather(*(r.check(self.metadata, self.health_interval) for r in self.replicas))
            await asyncio.sleep(self.health_interval)

    def ready(self) -> bool:
        return any(r.available for r in self.replicas)

    def describe(self) -> str:
        return "; ".join(r.status() for r in self.replicas) or "no Triton replicas configured"

    def pick(self, exclude=(), http: bool = False) -> Replica:
        count = len(self.replicas)
        start, best = self._next, None
        self._next = (start + 1) % max(count, 1)
        for i in range(count):
            replica = self.replicas[(start + i) % count]
            if (
                replica.serves(http)
                and replica not in exclude
                and (best is None or replica.outstanding < best.outstanding)
            ):
                best = replica
        if best is None:
            raise NoReplicaError(f"no Triton replica available: {self.describe()}")
        return best

    async def forward(self, send: Callable[[Replica], Awaitable], idempotent: bool, http: bool = False):
        """``send(replica)`` to one replica (``http``: one whose HTTP endpoint serves); on failure try others only
        where safe: any transport failure for idempotent calls, and for the rest only a request that was never
        sent (connection refused)."""
        replica = self.pick(http=http)
        retry_on = is_transport_error if idempotent else not_sent
        try:
            return await send(replica)
        except Exception as exc:
            if not retry_on(exc) or len(self.replicas) < 2:
                raise
        tried = {replica}
        async for attempt in retrying(attempts=len(self.replicas) - 1, initial=0.005, maximum=0.05, retry_on=retry_on):
            with attempt:
                replica = self.pick(exclude=tried, http=http)
                tried.add(replica)
                return await send(replica)

    async def broadcast(self, name: str, request: bytes, metadata, timeout: float | None) -> bytes:
        """Send to every healthy replica (model control); Triton's own errors win, unreachable replicas are
        skipped (they load the repository's models when they start)."""
        targets = [r for r in self.replicas if r.available]
        if not targets:
            raise NoReplicaError(f"no Triton replica available: {self.describe()}")
        results = await asyncio.gather(
            *(r.call(name, request, metadata, timeout) for r in targets), return_exceptions=True
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        answered = [e for e in errors if not is_transport_error(e)]
        if answered or len(errors) == len(results):
            raise (answered or errors)[0]
        return next(r for r in results if not isinstance(r, BaseException))
