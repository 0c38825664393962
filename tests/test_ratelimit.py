"""TokenBuckets: the per-caller rate limit under attestation and job submission."""

import math

from gpulab.ratelimit import TokenBuckets


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
