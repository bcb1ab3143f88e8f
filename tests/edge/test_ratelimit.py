"""The rate limit algorithm (GCRA), its memory store and header fields, sans-I/O:
a fake clock is a number passed in."""

from __future__ import annotations

import random

import pytest

from trioproxy.config.model import RateLimitSpec
from trioproxy.edge.access import presented_key
from trioproxy.edge.ratelimit import (
    US,
    Limit,
    MemoryStore,
    admit_memory,
    check_memory,
    compile_limits,
    gcra,
    request_key,
)

pytestmark = pytest.mark.timeout(10)


def limit(average: int = 10, period: float = 1.0, burst: int | None = 5, key: str = "ip") -> Limit:
    (compiled,) = compile_limits(
        [RateLimitSpec(average=average, period=period, burst=burst, key=key)], "r"
    )
    return compiled


def passes(store: MemoryStore, lim: Limit, now: float, key: str = "k") -> bool:
    return check_memory(store, [lim], [key], now).passed


def test_burst_then_the_average_rate() -> None:
    store, lim = MemoryStore(), limit(average=10, period=1.0, burst=5)
    # A burst of 5 at once, then nothing more at the same instant.
    assert [passes(store, lim, 100.0) for _ in range(8)] == [True] * 5 + [False] * 3
    # One more every 100 ms (the average rate), not sooner.
    assert not passes(store, lim, 100.099)
    assert passes(store, lim, 100.1)
    assert not passes(store, lim, 100.15)
    assert passes(store, lim, 100.2)
    # After a full idle period the whole burst is back, and no more.
    assert [passes(store, lim, 200.0) for _ in range(6)] == [True] * 5 + [False]


def test_forty_requests_within_100_ms_pass_five_or_six() -> None:
    store, lim = MemoryStore(), limit(average=10, period=1.0, burst=5)
    passed = sum(passes(store, lim, 10.0 + i * 0.1 / 39) for i in range(40))
    assert passed == 6  # the burst, plus the one the average rate adds by t+100 ms


def test_a_steady_rate_at_the_average_is_never_refused() -> None:
    store, lim = MemoryStore(), limit(average=100, period=60.0, burst=1)
    assert all(passes(store, lim, 5.0 + i * 0.6) for i in range(50))
    assert not passes(store, lim, 5.0 + 49 * 0.6 + 0.3)


def test_burst_defaults_to_average() -> None:
    store, lim = MemoryStore(), limit(average=3, period=3600.0, burst=None)
    assert lim.burst == 3
    assert [passes(store, lim, 0.0) for _ in range(4)] == [True, True, True, False]


def test_refused_requests_cost_nothing() -> None:
    store, lim = MemoryStore(), limit(average=1, period=1.0, burst=1)
    assert passes(store, lim, 0.0)
    for i in range(100):
        assert not passes(store, lim, 0.01 * i)
    assert passes(store, lim, 1.0)


def test_gcra_in_whole_microseconds() -> None:
    interval = 100_000
    assert gcra(None, 0, interval, 5) == (True, 0)
    assert gcra(400_000, 0, interval, 5) == (True, 400_000)
    assert gcra(400_001, 0, interval, 5) == (False, 400_001)
    assert gcra(10, 20, interval, 1) == (True, 0)  # a TAT in the past is no debt


def test_all_or_nothing_over_several_limits() -> None:
    store = MemoryStore()
    per_second = limit(average=10, period=1.0, burst=10)
    per_minute = limit(average=3, period=60.0, burst=3, key="route")
    both = [per_second, per_minute]
    keys = ["a", "b"]
    results = [check_memory(store, both, keys, 0.0).passed for _ in range(5)]
    assert results == [True, True, True, False, False]
    # The per-second limit was charged only for the 3 that passed: 7 remain.
    assert [check_memory(store, [per_second], ["a"], 0.0).passed for _ in range(8)] == [
        True
    ] * 7 + [False]


def test_retry_after_and_header_fields() -> None:
    store, lim = MemoryStore(), limit(average=10, period=1.0, burst=5)
    for _ in range(5):
        check_memory(store, [lim], ["k"], 0.0)
    verdict = check_memory(store, [lim], ["k"], 0.0)
    assert not verdict.passed
    assert verdict.retry_after() == 1  # 100 ms, rounded up to whole seconds
    assert dict(verdict.headers()) == {
        b"retry-after": b"1",
        b"ratelimit-policy": b'"ip/1s";q=10;w=1;trioproxy-burst=5',
        b"ratelimit": b'"ip/1s";r=0;t=1',
    }


def test_retry_after_is_the_wait_of_the_slowest_refusing_limit() -> None:
    store = MemoryStore()
    hourly = limit(average=2, period=3600.0, burst=2, key="route")
    fast = limit(average=10, period=1.0, burst=10)
    both = [fast, hourly]
    for _ in range(2):
        assert check_memory(store, both, ["f", "h"], 0.0).passed
    verdict = check_memory(store, both, ["f", "h"], 0.0)
    assert verdict.allowed == (True, False)
    assert verdict.retry_after() == 1800  # one request's worth of the hourly rate
    fields = dict(verdict.headers())
    assert fields[b"ratelimit"] == b'"ip/1s";r=8;t=1, "route/3600s";r=0;t=1800'
    assert fields[b"ratelimit-policy"] == (
        b'"ip/1s";q=10;w=1;trioproxy-burst=10, "route/3600s";q=2;w=3600;trioproxy-burst=2'
    )


def test_a_sub_second_period_is_stated_over_a_whole_second() -> None:
    lim = limit(average=5, period=0.5, burst=1)
    assert lim.policy_item() == '"ip/500ms";q=10;w=1;trioproxy-burst=1'
    assert lim.interval == 100_000


def test_names_are_unique_on_a_route() -> None:
    specs = [RateLimitSpec(average=1, key="ip"), RateLimitSpec(average=2, key="ip")]
    assert [lim.name for lim in compile_limits(specs, "r")] == ["ip/1s", "ip/1s#1"]


def test_memory_store_is_bounded_least_recently_used_first() -> None:
    store = MemoryStore(max_keys=3)
    lim = limit(average=1, period=10.0, burst=1)
    for key in "abc":
        assert passes(store, lim, 0.0, key)
    assert not passes(store, lim, 0.0, "a")  # "a" is now the most recently used
    assert passes(store, lim, 0.0, "d")  # evicts "b", the least recently used
    assert len(store) == 3 and store.evicted == 1
    assert passes(store, lim, 0.0, "b")  # forgotten: a fresh bucket (evicts "c")
    assert not passes(store, lim, 0.0, "a")
    assert not passes(store, lim, 0.0, "d")


def test_request_keys() -> None:
    headers = [(b"x-api-key", b"secret-1"), (b"authorization", b"Bearer tok-9")]
    by_ip = limit(key="ip")
    assert request_key(by_ip, headers, "10.1.2.3").endswith("|ip|10.1.2.3")
    assert request_key(by_ip, headers, "10.1.2.3") != request_key(by_ip, headers, "10.1.2.4")
    by_route = limit(key="route")
    assert request_key(by_route, headers, "1.1.1.1") == request_key(by_route, [], "2.2.2.2")
    by_header = limit(key="header:x-api-key")
    one = request_key(by_header, headers, "1.1.1.1")
    assert one == request_key(by_header, [(b"x-api-key", b"secret-1")], "2.2.2.2")
    assert one != request_key(by_header, [(b"x-api-key", b"secret-2")], "1.1.1.1")
    assert "secret-1" not in one  # stored hashed
    # Without the header: one shared bucket, not a way around the limit.
    assert request_key(by_header, [], "1.1.1.1") == request_key(by_header, [], "2.2.2.2")
    by_key = limit(key="api_key")
    assert "tok-9" not in request_key(by_key, headers, "1.1.1.1")
    assert request_key(by_key, headers, "1.1.1.1") != request_key(by_key, [], "1.1.1.1")
    # With a route's auth.header, api_key counts the key where the access rules read it.
    (by_header_key,) = compile_limits(
        [RateLimitSpec(average=1, key="api_key")], "r", key_header=b"x-api-key"
    )
    assert request_key(by_header_key, headers, "1.1.1.1") == request_key(
        by_header_key, [(b"x-api-key", b"secret-1")], "1.1.1.1"
    )
    assert request_key(by_header_key, headers, "1.1.1.1") != request_key(
        by_header_key, [(b"authorization", b"Bearer tok-9")], "1.1.1.1"
    )


def test_presented_key() -> None:
    assert presented_key([(b"authorization", b"Bearer abc")]) == b"abc"
    assert presented_key([(b"authorization", b"bearer  abc ")]) == b"abc"
    assert presented_key([(b"authorization", b"Basic abc")]) is None
    assert presented_key([(b"x-api-key", b"k1")], b"x-api-key") == b"k1"
    assert presented_key([(b"x-api-key", b"k1")]) is None


def test_microsecond_clock_agrees_with_seconds() -> None:
    assert US == 1_000_000
    assert limit(average=3, period=1.0).interval == 333_333


def test_the_hot_path_decides_as_check_memory() -> None:
    rng = random.Random(7)
    specs = [
        RateLimitSpec(average=10, period=1.0, burst=3, key="ip"),
        RateLimitSpec(average=4, period=2.0, burst=2, key="header:x-user"),
    ]
    limits = compile_limits(specs, "r")
    fast, slow = MemoryStore(), MemoryStore()
    now = 50.0
    for _ in range(500):
        now += rng.choice([0.0, 0.01, 0.05, 0.2, 0.6])
        headers = [(b"x-user", rng.choice([b"a", b"b"]))]
        addr = rng.choice(["1.1.1.1", "2.2.2.2"])
        keys = [request_key(limit, headers, addr) for limit in limits]
        expected = check_memory(slow, limits, keys, now).passed
        assert admit_memory(fast, limits, headers, addr, now) == expected
