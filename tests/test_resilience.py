"""The circuit breaker's state machine (injected clock) and the retry helper."""

import asyncio

import pytest
from tornado.httpclient import HTTPClientError

from gpulab.resilience import CircuitBreaker, CircuitOpenError, is_outage, retrying


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def fail():
    raise ConnectionRefusedError("refused")


async def ok():
    return "ok"


async def fail_times(breaker: CircuitBreaker, n: int) -> None:
    for _ in range(n):
        with pytest.raises(ConnectionRefusedError):
            await breaker.call(fail)


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def breaker(clock):
    return CircuitBreaker("ray at http://127.0.0.1:8265", failure_threshold=3, recovery_timeout=30, clock=clock)


async def test_opens_after_threshold_and_fails_fast(breaker, clock):
    await fail_times(breaker, 2)
    assert breaker.state == "closed"
    await fail_times(breaker, 1)
    assert breaker.state == "open"
    clock.now += 17.5
    calls = []

    async def counted():
        calls.append(1)

    with pytest.raises(CircuitOpenError) as err:
        await breaker.call(counted)
    assert calls == []
    assert str(err.value) == "ray at http://127.0.0.1:8265 is unavailable (circuit open, retry in 13 s)"
    assert err.value.retry_in == pytest.approx(12.5)
    assert breaker.snapshot() == {
        "name": "ray at http://127.0.0.1:8265",
        "state": "open",
        "failures": 3,
        "retry_in": 12.5,
        "last_error": "ConnectionRefusedError: refused",
    }


async def test_success_resets_the_count(breaker):
    await fail_times(breaker, 2)
    assert await breaker.call(ok) == "ok"
    await fail_times(breaker, 2)
    assert breaker.state == "closed" and breaker.failures == 2


async def test_other_exceptions_are_not_failures(breaker):
    for _ in range(5):
        with pytest.raises(ValueError):
            async with breaker:
                raise ValueError("the dependency answered; the caller did not like it")
    assert breaker.state == "closed" and breaker.failures == 0


async def test_half_open_lets_one_probe_through_and_success_closes(breaker, clock):
    await fail_times(breaker, 3)
    clock.now += 30
    assert breaker.state == "half_open"
    probe_started, release = asyncio.Event(), asyncio.Event()

    async def slow_ok():
        probe_started.set()
        await release.wait()
        return "ok"

    probe = asyncio.create_task(breaker.call(slow_ok))
    await probe_started.wait()
    with pytest.raises(CircuitOpenError):  # only one probe at a time
        await breaker.call(ok)
    release.set()
    assert await probe == "ok"
    assert breaker.state == "closed" and breaker.failures == 0
    assert await breaker.call(ok) == "ok"


async def test_failed_probe_opens_again_for_a_full_timeout(breaker, clock):
    await fail_times(breaker, 3)
    clock.now += 31
    await fail_times(breaker, 1)
    assert breaker.state == "open"
    assert breaker.snapshot()["retry_in"] == 30
    clock.now += 29.9
    with pytest.raises(CircuitOpenError):
        await breaker.call(ok)
    clock.now += 0.1
    assert await breaker.call(ok) == "ok"


async def test_cancelled_probe_frees_the_slot(breaker, clock):
    await fail_times(breaker, 3)
    clock.now += 30
    task = asyncio.create_task(breaker.call(asyncio.sleep, 10))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert breaker.state == "half_open"
    assert await breaker.call(ok) == "ok"
    assert breaker.state == "closed"


async def test_failure_test_is_configurable(clock):
    breaker = CircuitBreaker("mlflow", failure_threshold=1, clock=clock, is_failure=lambda e: isinstance(e, KeyError))
    with pytest.raises(ConnectionRefusedError):
        await breaker.call(fail)
    assert breaker.state == "closed"
    with pytest.raises(KeyError):
        async with breaker:
            raise KeyError("x")
    assert breaker.state == "open"


@pytest.mark.parametrize(
    "exc, outage",
    [
        (ConnectionRefusedError(), True),
        (OSError("no route"), True),
        (TimeoutError(), True),
        (HTTPClientError(599), True),
        (HTTPClientError(503), True),
        (HTTPClientError(404), False),
        (HTTPClientError(400), False),
        (ValueError(), False),
    ],
)
def test_is_outage(exc, outage):
    assert is_outage(exc) is outage


async def test_retrying_retries_outages_then_reraises():
    attempts = []
    with pytest.raises(ConnectionRefusedError):
        async for attempt in retrying(attempts=3, initial=0.001, maximum=0.01):
            with attempt:
                attempts.append(1)
                await fail()
    assert len(attempts) == 3


async def test_retrying_returns_the_first_success():
    results = iter([ConnectionResetError(), "ok"])

    async def flaky():
        result = next(results)
        if isinstance(result, Exception):
            raise result
        return result

    assert await retrying(initial=0.001)(flaky) == "ok"


@pytest.mark.parametrize("exc", [CircuitOpenError("ray", 3), ValueError("bad request")])
async def test_retrying_does_not_retry_open_circuits_or_other_errors(exc):
    attempts = []

    async def once():
        attempts.append(1)
        raise exc

    with pytest.raises(type(exc)):
        await retrying(initial=0.001)(once)
    assert attempts == [1]
