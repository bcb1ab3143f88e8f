"""The Redis store against a real redis-server: its Lua script decides as the Python
GCRA does, and an outage (down, or stalled past the timeout) is counted, logged once,
and ended as soon as Redis answers again."""

from __future__ import annotations

import logging
import random
import uuid

import pytest
import trio
from redis_server import run_redis, shared_redis_url

from trioproxy.config.model import RateLimitSpec, RedisSettings
from trioproxy.edge import redis_store
from trioproxy.edge.ratelimit import MemoryStore, check_memory, compile_limits
from trioproxy.edge.redis_store import RedisStore

pytestmark = pytest.mark.timeout(60)


def limits(route: str) -> tuple:  # type: ignore[type-arg]
    return compile_limits(
        [
            RateLimitSpec(average=10, period=1.0, burst=5, key="ip"),
            RateLimitSpec(average=7, period=3.0, burst=3, key="route"),
        ],
        route,
    )


async def test_the_script_decides_as_the_python_algorithm(nursery: trio.Nursery) -> None:
    async with shared_redis_url() as url:
        store = RedisStore(RedisSettings(url=url, timeout=5.0))
        await nursery.start(store.run)
        route = f"conformance-{uuid.uuid4().hex}"
        both = limits(route)
        memory = MemoryStore()
        rng = random.Random(16)
        now = 1_700_000_000.0  # an epoch-sized clock, as Redis's TIME gives
        for step in range(300):
            now += rng.choice([0.0, 0.0, 0.001, 0.03, 0.1, 0.25, 0.5])
            keys = [f"{route}|{rng.choice('ab')}", f"{route}|route"]
            expected = check_memory(memory, both, keys, now)
            got = await store.check(both, keys, now=now)
            assert got is not None
            assert (got.allowed, got.debts) == (expected.allowed, expected.debts), step
        assert store.errors == 0
        store.stop()


async def test_an_outage_is_counted_logged_once_and_ends(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_store, "RETRY_INTERVAL", 0.05)
    caplog.set_level(logging.WARNING, logger="trioproxy.edge")
    (one,) = compile_limits([RateLimitSpec(average=100, key="route")], "outage")
    async with run_redis() as redis:
        store = RedisStore(RedisSettings(url=redis.url, timeout=1.0))
        await nursery.start(store.run)
        assert await store.check([one], ["k"]) is not None
        await redis.stop()
        for _ in range(5):
            assert await store.check([one], ["k"]) is None
            await trio.sleep(0.06)
        assert store.errors == 5
        assert not store.healthy
        failed = [r for r in caplog.records if "failed" in r.getMessage()]
        assert len(failed) == 1, caplog.text
        assert "allowing the requests" in failed[0].getMessage()
        await redis.start()
        with trio.fail_after(10):
            while await store.check([one], ["k"]) is None:  # noqa: ASYNC110 (another process)
                await trio.sleep(0.06)
        assert store.healthy
        back = [r for r in caplog.records if "recovered (" in r.getMessage()]
        assert len(back) == 1, caplog.text
        # The script is loaded again into the new server by itself (NOSCRIPT handled).
        assert await store.check([one], ["k"]) is not None
        store.stop()


async def test_steady_traffic_during_an_outage_still_finds_redis_back(
    nursery: trio.Nursery,
) -> None:
    (one,) = compile_limits([RateLimitSpec(average=100, key="route")], "steady")
    async with run_redis() as redis:
        store = RedisStore(RedisSettings(url=redis.url, timeout=1.0))
        await nursery.start(store.run)
        await redis.stop()
        await redis.start()
        # A request every 50 ms, less than RETRY_INTERVAL apart: one of them tries.
        with trio.fail_after(10):
            while await store.check([one], ["k"]) is None:  # noqa: ASYNC110 (another process)
                await trio.sleep(0.05)
        store.stop()


async def test_a_stalled_redis_costs_its_timeout_not_more(nursery: trio.Nursery) -> None:
    (one,) = compile_limits([RateLimitSpec(average=100, key="route")], "stall")
    async with run_redis() as redis:
        store = RedisStore(RedisSettings(url=redis.url, timeout=0.5, on_store_error="deny"))
        await nursery.start(store.run)
        # The first check connects and loads the script: on a loaded machine that may
        # take longer than the timeout, so it is given several tries.
        with trio.fail_after(10):
            while await store.check([one], ["k"]) is None:  # noqa: ASYNC110 (another process)
                await trio.sleep(redis_store.RETRY_INTERVAL)
        errors = store.errors
        redis.pause()
        started = trio.current_time()
        assert await store.check([one], ["k"]) is None
        # The timeout, plus room for a loaded machine.
        assert 0.45 < trio.current_time() - started < 3.0
        # Within the retry interval the next request does not wait for Redis.
        started = trio.current_time()
        assert await store.check([one], ["k"]) is None
        assert trio.current_time() - started < 0.25
        assert store.errors == errors + 2
        redis.resume()
        store.stop()


async def test_a_store_that_was_never_started_is_an_outage() -> None:
    (one,) = compile_limits([RateLimitSpec(average=1, key="route")], "never")
    store = RedisStore(RedisSettings(url="redis://127.0.0.1:1/0"))
    assert await store.check([one], ["k"]) is None
    assert store.errors == 1
