"""A route's limits made live (admission order, in-flight places, the store error
choice) and what a reload carries over; no sockets (a Redis store that never started
is an outage)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from trioproxy.config.model import RateLimitSpec, RedisSettings, RouteSettings, ServerSettings
from trioproxy.edge.limits import EdgeService, EdgeState
from trioproxy.errors import RateLimited, RateLimitStoreUnavailable, RouteBusy

pytestmark = pytest.mark.timeout(10)


def route(name: str = "r", *specs: RateLimitSpec, max_inflight: int | None = None) -> RouteSettings:
    return RouteSettings(name=name, upstream="g", rate_limit=specs, max_inflight=max_inflight)


async def test_max_inflight_places_are_taken_and_given_back() -> None:
    limits = EdgeState().route_limits(route(max_inflight=2))
    assert limits is not None
    await limits.admit([], "1.1.1.1", 0.0)
    await limits.admit([], "1.1.1.1", 0.0)
    with pytest.raises(RouteBusy) as info:
        await limits.admit([], "1.1.1.1", 0.0)
    assert info.value.status == 503 and dict(info.value.headers) == {b"retry-after": b"1"}
    assert (limits.counters.inflight, limits.counters.busy) == (2, 1)
    limits.leave()
    await limits.admit([], "1.1.1.1", 0.0)
    assert limits.counters.inflight == 2


async def test_a_rate_limited_request_gives_its_place_back() -> None:
    spec = RateLimitSpec(average=1, period=60.0, burst=1, key="route")
    limits = EdgeState().route_limits(route("r", spec, max_inflight=5))
    assert limits is not None
    await limits.admit([], "a", 0.0)
    with pytest.raises(RateLimited) as info:
        await limits.admit([], "b", 1.0)
    assert info.value.status == 429
    assert dict(info.value.headers)[b"retry-after"] == b"59"
    assert (limits.counters.inflight, limits.counters.rejected) == (1, 1)


async def test_store_errors_allow_or_deny() -> None:
    shared = RateLimitSpec(average=1, key="route", store="redis")
    for choice, refused in (("allow", False), ("deny", True)):
        server = ServerSettings(
            redis=RedisSettings(url="redis://127.0.0.1:1/0", on_store_error=choice)
        )
        state = EdgeState.carry(server, None)
        limits = state.route_limits(route("r", shared))
        assert limits is not None and state.redis is not None
        for _ in range(3):  # over the limit of 1, but nobody can count
            if refused:
                with pytest.raises(RateLimitStoreUnavailable):
                    await limits.admit([], "a", 0.0)
            else:
                await limits.admit([], "a", 0.0)
                limits.leave()
        assert state.redis.errors == 3
        assert limits.counters.inflight == 0


async def test_a_memory_limit_refuses_before_redis_is_asked() -> None:
    local = RateLimitSpec(average=1, period=60.0, burst=1, key="ip")
    shared = RateLimitSpec(average=100, key="route", store="redis")
    server = ServerSettings(redis=RedisSettings(url="redis://127.0.0.1:1/0"))
    state = EdgeState.carry(server, None)
    limits = state.route_limits(route("r", local, shared))
    assert limits is not None and state.redis is not None
    await limits.admit([], "a", 0.0)  # Redis fails (allowed); memory counts it
    with pytest.raises(RateLimited):
        await limits.admit([], "a", 0.0)
    assert state.redis.errors == 1


def test_a_reload_carries_stores_and_counters() -> None:
    server = ServerSettings(redis=RedisSettings(url="redis://127.0.0.1:1/0"))
    first = EdgeState.carry(server, None)
    counters = first.route_limits(route("a", max_inflight=1))
    assert counters is not None
    same = EdgeState.carry(server, first)
    again = same.route_limits(route("a", max_inflight=3))
    assert again is not None and again.counters is counters.counters
    assert same.memory is first.memory and same.redis is first.redis
    moved = ServerSettings(redis=RedisSettings(url="redis://127.0.0.1:2/0"))
    assert EdgeState.carry(moved, first).redis is not first.redis
    assert EdgeState.carry(ServerSettings(), first).redis is None
    # A route that is gone is not carried further.
    later = EdgeState.carry(server, same)
    fresh = later.route_limits(route("b", max_inflight=1))
    assert fresh is not None and "a" not in later.counters


async def test_the_memory_bound_changes_only_when_a_snapshot_serves() -> None:
    first = EdgeState.carry(ServerSettings(rate_limit_max_keys=10), None)
    refused = EdgeState.carry(ServerSettings(rate_limit_max_keys=3), first)
    assert first.memory.max_keys == 10  # building the next state changed nothing
    service = EdgeService()
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        await service.activate(refused)
        assert first.memory.max_keys == 3
        nursery.cancel_scope.cancel()


def test_no_limits_no_object() -> None:
    assert EdgeState().route_limits(route()) is None


async def test_a_reload_that_changes_redis_swaps_the_store() -> None:
    def at(port: int) -> ServerSettings:
        return ServerSettings(redis=RedisSettings(url=f"redis://127.0.0.1:{port}/0"))

    first = EdgeState.carry(at(1), None)
    second = EdgeState.carry(at(2), first)
    same = EdgeState.carry(at(2), second)
    none = EdgeState.carry(ServerSettings(), same)
    assert first.redis is not None and second.redis is not None
    assert same.redis is second.redis
    service = EdgeService()
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        await service.activate(first)
        assert first.redis.connected
        await service.activate(second)
        await trio.testing.wait_all_tasks_blocked()
        assert not first.redis.connected and second.redis.connected
        await service.activate(same)
        assert second.redis.connected
        await service.activate(none)
        await trio.testing.wait_all_tasks_blocked()
        assert not second.redis.connected
        nursery.cancel_scope.cancel()
