"""TokenBuckets and LRUDict: per-caller rate limits and lockouts (attestation, job submission) in bounded
memory."""

import math

import pytest

from gpulab.attestation.abuse import AbuseGuard
from gpulab.attestation.reasons import AttestationError, Reason
from gpulab.ratelimit import LRUDict, TokenBuckets


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_a_burst_then_one_token_per_interval_per_key():
    clock = Clock()
    buckets = TokenBuckets(rate=2.0, burst=3, clock=clock)
    assert [buckets.take("alice") for _ in range(3)] == [0, 0, 0]
    assert buckets.take("alice") == 0.5  # empty: the next token is 1/rate away
    assert buckets.take("bob") == 0  # each key has its own bucket
    clock.now += 0.5
    assert buckets.take("alice") == 0
    assert buckets.take("alice") == 0.5
    clock.now += 60  # refills up to the burst, not beyond
    assert [buckets.take("alice") for _ in range(4)] == [0, 0, 0, 0.5]


def test_rate_zero_never_refills_and_memory_is_bounded():
    clock = Clock()
    buckets = TokenBuckets(rate=0.0, burst=1, max_keys=2, clock=clock)
    assert buckets.take("a") == 0 and math.isinf(buckets.take("a"))
    buckets.take("b")
    buckets.take("c")  # a, the least recently used, is forgotten
    assert buckets.take("a") == 0  # ...and starts full again


def test_the_least_recently_stored_key_goes_first():
    seen = LRUDict(max_keys=2)
    seen["a"], seen["b"] = 1, 2
    seen["a"] = 3  # stored again: now the most recent
    seen["c"] = 4
    assert dict(seen) == {"a": 3, "c": 4}


def test_lockouts_are_kept_for_the_most_recent_callers_only():
    clock = Clock()
    guard = AbuseGuard(max_failures=1, lockout_seconds=60, max_clients=2, clock=clock)
    guard.failed("a")
    with pytest.raises(AttestationError) as locked:
        guard.check("a", "verify")
    assert locked.value.reason == Reason.LOCKED_OUT
    guard.failed("b")
    guard.check("c", "nonce")  # a bucket for c: the guard's buckets are bounded alike
    guard.failed("c")  # a, the least recently seen, is forgotten
    guard.check("a", "verify")
