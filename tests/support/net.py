"""Loopback addresses for the servers tests start: each call a new one, from 127.0.1.1 on, so that two tests (or
two modules' platforms) never meet on one address, and no address is written by hand."""

import itertools

_next = itertools.count()


def next_loopback() -> str:
    n = next(_next)
    return f"127.0.{1 + n // 254}.{1 + n % 254}"
