"""A route's admission limits made live: rate limits and ``max_inflight``.

What outlives a reload is kept in :class:`EdgeState`, which each snapshot
carries over from the one before (as it carries unchanged upstream groups):
the memory store of rate limits, the Redis store while ``[server] redis`` is
unchanged, and each route's counters by route name (in flight, rejected), so
that a reload neither forgives a client its debt nor lets a route's in-flight
cap be exceeded by requests of two generations.

Admission order, in :meth:`RouteLimits.admit`: take an in-flight place (503
if the route is full), then check the rate limits (429 over one; the place is
given back). Taking the place first means the Redis round trip cannot let
more requests than the cap through.
"""

from __future__ import annotations

from typing import Any, NoReturn

import attrs
import trio

from trioproxy.config.model import RedisSettings, RouteSettings, ServerSettings
from trioproxy.edge.ratelimit import (
    DEFAULT_MAX_KEYS,
    Limit,
    MemoryStore,
    Verdict,
    admit_memory,
    check_memory,
    compile_limits,
    request_key,
)
from trioproxy.edge.redis_store import RedisStore
from trioproxy.errors import RateLimited, RateLimitStoreUnavailable, RouteBusy
from trioproxy.http.protocol import Headers


@attrs.define
class RouteCounters:
    """One route's counts, kept across reloads by route name."""

    #: Requests and tunnels open now.
    inflight: int = 0
    #: Requests refused with 429 (``trioproxy_ratelimit_rejected_total{route}``).
    rejected: int = 0
    #: Requests refused with 503 for ``max_inflight``.
    busy: int = 0


@attrs.define(eq=False)
class RouteLimits:
    """A route's limits; ``admit`` before the exchange, ``leave`` after it."""

    route: str
    memory_limits: tuple[Limit, ...]
    redis_limits: tuple[Limit, ...]
    max_inflight: int | None
    counters: RouteCounters
    memory: MemoryStore
    redis: RedisStore | None

    async def admit(self, headers: Headers, client_addr: str, now: float) -> None:
        """Count the request in; on success the caller must call :meth:`leave` when
        the exchange (or tunnel) ends.

        Raises:
            RouteBusy: ``max_inflight`` requests are open (503).
            RateLimited: over a rate limit (429 with its headers).
            RateLimitStoreUnavailable: Redis failed and ``on_store_error = "deny"``.
        """
        counters = self.counters
        if self.max_inflight is not None and counters.inflight >= self.max_inflight:
            counters.busy += 1
            raise RouteBusy(f"route {self.route}: {self.max_inflight} requests in flight")
        counters.inflight += 1
        if not self.memory_limits and not self.redis_limits:
            return
        try:
            if self.redis_limits:
                await self._check_rates(headers, client_addr, now)
            elif not admit_memory(self.memory, self.memory_limits, headers, client_addr, now):
                keys = [request_key(limit, headers, client_addr) for limit in self.memory_limits]
                self._reject(check_memory(self.memory, self.memory_limits, keys, now, commit=False))
        except BaseException:
            counters.inflight -= 1
            raise

    def leave(self) -> None:
        self.counters.inflight -= 1

    async def _check_rates(self, headers: Headers, client_addr: str, now: float) -> None:
        """A route with Redis limits (and maybe memory ones): raise to refuse."""
        memory_keys = [request_key(limit, headers, client_addr) for limit in self.memory_limits]
        # Memory limits are asked first and counted last: a refusal by Redis costs
        # no memory quota. (Asked again at the end, since Redis took a while.)
        verdict = check_memory(self.memory, self.memory_limits, memory_keys, now, commit=False)
        if not verdict.passed:
            self._reject(verdict)
        assert self.redis is not None
        redis_keys = [request_key(limit, headers, client_addr) for limit in self.redis_limits]
        shared = await self.redis.check(self.redis_limits, redis_keys)
        if shared is None:
            if self.redis.deny_on_error:
                raise RateLimitStoreUnavailable(f"route {self.route}: rate limit store failed")
        elif not shared.passed:
            self._reject(
                Verdict(
                    verdict.limits + shared.limits,
                    verdict.allowed + shared.allowed,
                    verdict.debts + shared.debts,
                )
            )
        if self.memory_limits:
            verdict = check_memory(self.memory, self.memory_limits, memory_keys, now)
            if not verdict.passed:
                self._reject(verdict)

    def _reject(self, verdict: Verdict) -> NoReturn:
        self.counters.rejected += 1
        raise RateLimited(f"route {self.route}: over its rate limit", tuple(verdict.headers()))


@attrs.define(eq=False)
class EdgeState:
    """What the limits keep across reloads (see the module's docstring).

    Building one changes nothing in the state it carries from (a reload that is
    then refused leaves the one in use as it was); :meth:`EdgeService.activate`
    applies what must change in shared objects (the memory store's bound).
    """

    memory: MemoryStore = attrs.field(factory=MemoryStore)
    redis: RedisStore | None = None
    #: Each route's counters, by route name (the routes of this snapshot only).
    counters: dict[str, RouteCounters] = attrs.field(factory=dict)
    #: ``[server] rate_limit_max_keys`` of this snapshot.
    max_keys: int = DEFAULT_MAX_KEYS
    _carried: dict[str, RouteCounters] = attrs.field(factory=dict)

    @classmethod
    def carry(cls, server: ServerSettings, previous: EdgeState | None) -> EdgeState:
        """The state for a new snapshot of ``server``, carried from ``previous``."""
        max_keys = server.rate_limit_max_keys
        if previous is None:
            return cls(
                memory=MemoryStore(max_keys),
                redis=RedisStore(server.redis) if server.redis is not None else None,
                max_keys=max_keys,
            )
        redis = previous.redis
        if redis is None or redis.settings != server.redis:
            redis = RedisStore(server.redis) if server.redis is not None else None
        return cls(
            memory=previous.memory, redis=redis, max_keys=max_keys, carried=previous.counters
        )

    def route_limits(self, settings: RouteSettings) -> RouteLimits | None:
        """The live limits of a route; None when it has none."""
        if not settings.rate_limit and settings.max_inflight is None:
            return None
        auth = settings.auth
        key_header = auth.header.encode("ascii") if auth is not None and auth.header else None
        limits = compile_limits(settings.rate_limit, settings.name, key_header)
        name = settings.name
        counters = self.counters[name] = self._carried.get(name) or RouteCounters()
        return RouteLimits(
            route=name,
            memory_limits=tuple(limit for limit in limits if limit.spec.store == "memory"),
            redis_limits=tuple(limit for limit in limits if limit.spec.store == "redis"),
            max_inflight=settings.max_inflight,
            counters=counters,
            memory=self.memory,
            redis=self.redis,
        )

    def status(self) -> dict[str, Any]:
        """For the admin ``/status``: each route's counts and the stores'."""
        result: dict[str, Any] = {
            "routes": {name: attrs.asdict(c) for name, c in self.counters.items()},
            "memory": {
                "keys": len(self.memory),
                "max_keys": self.memory.max_keys,
                "evicted": self.memory.evicted,
            },
        }
        if self.redis is not None:
            result["redis"] = {
                "url": _redacted(self.redis.settings),
                "healthy": self.redis.healthy,
                "store_errors": self.redis.errors,
            }
        return result


def _redacted(settings: RedisSettings) -> str:
    """The URL without its password."""
    scheme, sep, rest = settings.url.partition("://")
    _credentials, at, host = rest.rpartition("@")
    return f"{scheme}{sep}{'***@' if at else ''}{host}"


@attrs.define
class EdgeService:
    """Runs the Redis store of the snapshot in use: ``await nursery.start(edge.run)``,
    then ``await edge.activate(state)`` before each snapshot serves."""

    _nursery: trio.Nursery | None = None
    _running: list[RedisStore] = attrs.field(factory=list)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    async def activate(self, state: EdgeState) -> None:
        """Start ``state``'s Redis store if it is new; stop the ones it replaced."""
        nursery = self._nursery
        assert nursery is not None, "EdgeService.run is not running"
        state.memory.max_keys = state.max_keys
        store = state.redis
        for old in self._running:
            if old is not store:
                old.stop()
        self._running = [s for s in self._running if s is store]
        if store is not None and not self._running:
            await nursery.start(store.run)
            self._running.append(store)
