"""Hub tokens from gRPC call metadata: who is calling and with which scopes.

A token is looked up with ``GET {hub api}/user`` (the token's owner and its scopes), through a
circuit breaker with retries; answers (valid or not) are cached for ``ttl`` seconds in a bounded
LRU, and concurrent lookups of one token share one request. A revoked token keeps working until
its cache entry expires; the nginx data plane caches its decisions only for what is left of that
(:meth:`HubTokenAuth.trusted_for`), so revocation reaches both planes within ``ttl``.
"""

import asyncio
import json
import time
from collections import OrderedDict
from dataclasses import dataclass

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from ...resilience import CircuitBreaker, retrying
from ...scopes import expand


@dataclass(frozen=True)
class Identity:
    name: str
    kind: str  # "user" or "service"
    scopes: frozenset
    groups: frozenset


class InvalidToken(Exception):
    """No token, or the hub does not know it."""


def token_from_metadata(metadata) -> str:
    """The token in ``authorization: token <t>`` or ``authorization: bearer <t>``."""
    for key, value in metadata:
        if key == "authorization":
            scheme, _, token = value.partition(" ")
            if scheme.lower() in ("token", "bearer") and token.strip():
                return token.strip()
            raise InvalidToken("authorization metadata must be 'token <hub token>' or 'bearer <hub token>'")
    raise InvalidToken("missing 'authorization: token <hub token>' metadata")


class HubTokenAuth:
    """Resolves hub tokens to :class:`Identity` via the hub API (``/user`` shows a token its owner's groups
    whatever its scopes)."""

    def __init__(self, api_url: str, ttl: float = 30.0, max_entries: int = 4096):
        self.api_url = api_url.rstrip("/")
        self.ttl = ttl
        self.max_entries = max_entries
        self.breaker = CircuitBreaker(f"JupyterHub API at {self.api_url}", failure_threshold=5, recovery_timeout=10)
        self._cache: OrderedDict[str, tuple[float, asyncio.Future]] = OrderedDict()
        self._http = AsyncHTTPClient()

    async def identify(self, token: str) -> Identity:
        """The token's identity; raises :class:`InvalidToken`, or :class:`~gpulab.resilience.CircuitOpenError`
        / ``OSError`` / ``HTTPClientError`` when the hub cannot answer."""
        now = time.monotonic()
        entry = self._cache.get(token)
        if entry is not None and entry[0] > now:
            self._cache.move_to_end(token)
            future = entry[1]
            return future.result() if future.done() else await asyncio.shield(future)
        future = asyncio.ensure_future(self._lookup(token))
        self._cache[token] = (now + self.ttl, future)
        if len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
        try:
            return await asyncio.shield(future)
        except InvalidToken:
            raise
        except BaseException:
            if self._cache.get(token, (0, None))[1] is future:  # outages are not cached
                del self._cache[token]
            raise

    def trusted_for(self, token: str) -> float:
        """Seconds the cached answer for ``token`` is still trusted (0 if there is none)."""
        entry = self._cache.get(token)
        return max(entry[0] - time.monotonic(), 0.0) if entry is not None else 0.0

    async def _lookup(self, token: str) -> Identity:
        request = HTTPRequest(
            self.api_url + "/user", headers={"Authorization": f"token {token}"}, request_timeout=5, connect_timeout=2
        )
        async for attempt in retrying(attempts=3, initial=0.1, maximum=1.0):
            with attempt:
                try:
                    response = await self.breaker.call(self._http.fetch, request)
                except HTTPClientError as e:
                    if e.code in (401, 403, 404):
                        raise InvalidToken("invalid or expired hub token") from None
                    raise
        model = json.loads(response.body)
        return Identity(
            model["name"],
            model.get("kind", "user"),
            frozenset(expand(model.get("scopes", ()))),
            frozenset(model.get("groups") or ()),
        )
