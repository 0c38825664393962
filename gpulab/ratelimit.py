"""Token buckets per caller: how often each one may do something, in bounded memory.

Used wherever a caller's rate is capped: attestation nonces and verifications, job submissions.
Keys are callers' identities (hub user names, node credentials), never client addresses, which a
user's code on the platform's own loopback can forge.
"""

import math
import time
from collections import OrderedDict
from collections.abc import Callable


class LRUDict(OrderedDict):
    """A dict of at most ``max_keys`` entries: storing a key makes it the most recent, and past the cap the least
    recently stored is forgotten (per-caller state in bounded memory)."""

    def __init__(self, max_keys: int):
        super().__init__()
        self.max_keys = max_keys

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self.move_to_end(key)
        if len(self) > self.max_keys:
            self.popitem(last=False)


class TokenBuckets:
    """``rate`` tokens a second, at most ``burst``, one bucket per key; :meth:`take` spends one.

    At most ``max_keys`` buckets are kept, the least recently used forgotten first (a forgotten key
    starts full again, so the cap bounds memory, not callers)."""

    def __init__(self, rate: float, burst: float, max_keys: int = 10_000, clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst, self.max_keys, self.clock = rate, burst, max_keys, clock
        self._buckets: LRUDict = LRUDict(max_keys)  # key -> (tokens, when counted)

    def take(self, key: str) -> float:
        """0 when ``key`` had a token (now spent); else the seconds until it has one (inf at rate 0)."""
        now = self.clock()
        tokens, counted = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - counted) * self.rate)
        wait = 0.0
        if tokens >= 1:
            tokens -= 1
        else:
            wait = (1 - tokens) / self.rate if self.rate else math.inf
        self._buckets[key] = (tokens, now)
        return wait
