"""The balancer's view of the targets, driven with plain floats for ``now`` (no trio, no sockets).

What decides whether a target is a candidate (health, passive ejection, breaker, the
``max_inflight`` cap, ``exclude``), what happens when none is left (503 with
``Retry-After``), and how outcomes reported through ``on_success``/``on_failure`` move
passive health and the circuit breakers.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence

import pytest

from trioproxy.balance.balancer import Balancer, BreakerSettings
from trioproxy.balance.breaker import BreakerState
from trioproxy.balance.strategies import LeastConnections, RoundRobin
from trioproxy.balance.target import Target, TargetSpec
from trioproxy.errors import NoHealthyUpstream, ProxyError
from trioproxy.upstream.origin import UpstreamURL

pytestmark = pytest.mark.timeout(10)

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN

#: ``--breaker-failures 0``.
NO_BREAKER = BreakerSettings(failure_threshold=0)


def target(name: str, *, weight: int = 1, max_inflight: int | None = None) -> Target:
    url = UpstreamURL.parse(f"http://{name}:8000")
    return Target(TargetSpec(url=url, weight=weight, max_inflight=max_inflight))


def balancer(*names: str, **kwargs: object) -> tuple[Balancer, list[Target]]:
    targets = [target(name) for name in names]
    return Balancer(targets, **kwargs), targets  # type: ignore[arg-type]


def picks(b: Balancer, n: int, *, now: float = 0.0, exclude: Sequence[Target] = ()) -> Counter[str]:
    """Host names of ``n`` picks (each admitted and reported a success, so breakers stay put)."""
    seen: Counter[str] = Counter()
    for _ in range(n):
        chosen = b.pick(None, now=now, exclude=exclude)
        b.on_success(chosen, now)
        seen[chosen.url.origin.host] += 1
    return seen


def no_candidate(b: Balancer, *, now: float, exclude: Sequence[Target] = ()) -> NoHealthyUpstream:
    assert not b.has_candidate(now, exclude=exclude)
    with pytest.raises(NoHealthyUpstream) as info:
        b.pick(None, now=now, exclude=exclude)
    return info.value


def fail(b: Balancer, t: Target, *times: float) -> None:
    for now in times:
        b.on_failure(t, now)


# --- candidates ---------------------------------------------------------------------


def test_every_healthy_target_is_a_candidate() -> None:
    b, _ = balancer("a", "b", "c")
    assert isinstance(b.strategy, RoundRobin)
    assert picks(b, 9) == {"a": 3, "b": 3, "c": 3}


def test_an_unhealthy_target_is_not_a_candidate() -> None:
    b, (_a, bee, _c) = balancer("a", "b", "c")
    bee.healthy = False
    assert picks(b, 10) == {"a": 5, "c": 5}
    bee.healthy = True
    assert picks(b, 9)["b"] == 3


def test_an_ejected_target_is_not_a_candidate_until_its_cool_down_ends() -> None:
    b, (_a, bee) = balancer("a", "b")
    bee.ejected_until = 10.0
    assert picks(b, 6, now=9.999) == {"a": 6}
    assert not b.available(bee, 9.999)
    # The cool-down ends at ejected_until itself.
    assert b.available(bee, 10.0)
    assert picks(b, 6, now=10.0) == {"a": 3, "b": 3}


def test_a_target_whose_breaker_is_open_is_not_a_candidate() -> None:
    b, (_a, bee) = balancer("a", "b", eject_after=0)
    fail(b, bee, 0.0, 0.1, 0.2, 0.3, 0.4)
    assert b.breaker(bee).state is OPEN
    # Passive health is off here: only the breaker keeps it out.
    assert b.available(bee, 1.0)
    assert picks(b, 6, now=1.0) == {"a": 6}


def test_a_target_at_its_max_inflight_cap_is_not_a_candidate() -> None:
    a, capped = target("a"), target("capped", max_inflight=2)
    b = Balancer([a, capped], strategy=LeastConnections())
    with b.track(capped), b.track(capped):
        assert capped.at_capacity()
        assert picks(b, 4) == {"a": 4}
        # Tunnels count against the cap as well.
    with b.track(capped), b.track(capped, tunnel=True):
        assert capped.inflight == 2 and capped.tunnels == 1
        assert picks(b, 4) == {"a": 4}
    assert not capped.at_capacity()
    assert picks(b, 4)["capped"] == 2


def test_excluded_targets_are_not_candidates() -> None:
    b, (a, bee, c) = balancer("a", "b", "c")
    assert picks(b, 6, exclude=[a]) == {"b": 3, "c": 3}
    assert picks(b, 3, exclude=[a, c]) == {"b": 3}
    exc = no_candidate(b, now=0.0, exclude=[a, bee, c])
    assert "tried" in exc.detail


def test_a_half_open_breaker_admits_only_its_trials() -> None:
    settings = BreakerSettings(failure_threshold=2, open_for=5.0, half_open_max=1)
    b, (a,) = balancer("a", eject_after=0, breaker_settings=settings)
    fail(b, a, 0.0, 0.1)
    no_candidate(b, now=4.0)
    assert b.pick(None, now=5.1) is a  # the one trial
    assert b.breaker(a).state is HALF_OPEN
    exc = no_candidate(b, now=5.2)
    assert "breaker half_open" in exc.detail
    # A trial that ends without a verdict gives its slot back.
    b.on_cancelled(a, 5.3)
    assert b.pick(None, now=5.4) is a


# --- none left: 503 ---------------------------------------------------------------------


def test_no_candidate_is_503_with_retry_after_naming_each_reason() -> None:
    targets = [
        target("sick"),
        target("ejected"),
        target("open"),
        target("full", max_inflight=1),
        target("tried"),
    ]
    sick, ejected, opened, full, tried = targets
    b = Balancer(targets, eject_after=0)
    sick.healthy = False
    ejected.ejected_until = 100.0
    fail(b, opened, 1.0, 1.0, 1.0, 1.0, 1.0)
    with b.track(full):
        exc = no_candidate(b, now=2.0, exclude=[tried])
    assert isinstance(exc, ProxyError)
    assert exc.status == 503
    assert dict(exc.headers).get(b"retry-after") == b"1"
    assert exc.detail == (
        "no upstream available: "
        "http://sick:8000 unhealthy, "
        "http://ejected:8000 ejected, "
        "http://open:8000 breaker open, "
        "http://full:8000 at max_inflight, "
        "http://tried:8000 tried"
    )
    # The client's text is fixed: it never lists the upstreams.
    assert "8000" not in exc.reason


def test_no_targets_at_all_is_503_too() -> None:
    b = Balancer([])
    exc = no_candidate(b, now=0.0)
    assert exc.status == 503
    assert "no upstream configured" in exc.detail


# --- tracking in-flight requests and tunnels ---------------------------------------------


def test_track_counts_requests_and_tunnels_and_nests() -> None:
    b, (a,) = balancer("a")
    with b.track(a):
        assert (a.inflight, a.tunnels) == (1, 0)
        with b.track(a, tunnel=True):
            assert (a.inflight, a.tunnels) == (2, 1)
            assert b.snapshot(0.0)[0]["inflight"] == 2
            assert b.snapshot(0.0)[0]["tunnels"] == 1
        assert (a.inflight, a.tunnels) == (1, 0)
    assert (a.inflight, a.tunnels) == (0, 0)


def test_track_releases_on_exception_and_cancellation() -> None:
    b, (a,) = balancer("a")

    class Boom(Exception):
        pass

    with pytest.raises(Boom), b.track(a, tunnel=True):
        raise Boom
    assert (a.inflight, a.tunnels) == (0, 0)
    # A BaseException (what trio.Cancelled is) releases too.
    with pytest.raises(KeyboardInterrupt), b.track(a):
        raise KeyboardInterrupt
    assert a.inflight == 0


def test_least_connections_sees_what_track_counts() -> None:
    b, (a, bee, _c) = balancer("a", "b", "c", strategy=LeastConnections())
    with b.track(a), b.track(a), b.track(bee):
        assert picks(b, 4) == {"c": 4}


# --- passive health: ejection --------------------------------------------------------


def test_eject_after_consecutive_failures_then_expire() -> None:
    b, (_a, bee) = balancer("a", "b", eject_after=3, eject_for=10.0)
    fail(b, bee, 1.0, 1.1)
    assert bee.ejected_until == 0.0 and bee.consecutive_failures == 2
    fail(b, bee, 1.2)
    assert bee.ejected_until == pytest.approx(11.2)
    assert bee.consecutive_failures == 0  # counting starts afresh after the cool-down
    assert picks(b, 4, now=11.1) == {"a": 4}
    assert b.snapshot(5.2)[1]["ejected"] is True
    assert b.snapshot(5.2)[1]["ejected_for_s"] == pytest.approx(6.0)
    # Back once the cool-down is over; it takes eject_after new failures to go again.
    assert picks(b, 4, now=11.2) == {"a": 2, "b": 2}
    fail(b, bee, 12.0, 12.1)
    assert b.available(bee, 12.2)


def test_a_success_in_between_resets_the_consecutive_count() -> None:
    b, (_a, bee) = balancer("a", "b", eject_after=3)
    for now in range(10):
        fail(b, bee, now, now + 0.1)
        b.on_success(bee, now + 0.2)
    assert bee.ejected_until == 0.0
    assert bee.failures == 20 and bee.requests == 30


def test_eject_after_zero_never_ejects() -> None:
    b, (_a, bee) = balancer("a", "b", eject_after=0, breaker_settings=NO_BREAKER)
    fail(b, bee, *[0.1 * i for i in range(50)])
    assert bee.ejected_until == 0.0
    assert picks(b, 4, now=6.0) == {"a": 2, "b": 2}


def test_the_last_available_target_is_never_ejected() -> None:
    b, (a, bee, c) = balancer("a", "b", "c", eject_after=2, eject_for=10.0)
    fail(b, a, 0.0, 0.0)
    fail(b, bee, 0.0, 0.0)
    assert a.ejected_until == bee.ejected_until == 10.0
    # c is all that is left: with nowhere else to go, trying it beats a certain 503.
    fail(b, c, *[0.01 * i for i in range(4)])
    assert c.ejected_until == 0.0
    assert b.pick(None, now=0.5) is c


def test_an_unhealthy_peer_does_not_count_as_somewhere_else_to_go() -> None:
    b, (a, bee) = balancer("a", "b", eject_after=2, breaker_settings=NO_BREAKER)
    bee.healthy = False
    fail(b, a, 0.0, 0.1, 0.2, 0.3)
    assert a.ejected_until == 0.0
    assert b.pick(None, now=0.4) is a


def test_a_peer_with_an_open_breaker_does_not_count_as_somewhere_else_to_go() -> None:
    # Passive ejection slower than the breaker (6 in a row vs 5 in 10 s), so b's
    # circuit opens first, and a's failures are spread out so that its own stays closed.
    b, (a, bee) = balancer("a", "b", eject_after=6)
    fail(b, bee, 0.0, 0.1, 0.2, 0.3, 0.4)
    assert b.breaker(bee).state is OPEN and bee.ejected_until == 0.0
    fail(b, a, 1.0, 4.0, 7.0, 10.0, 13.0, 16.0)
    assert b.breaker(a).state is CLOSED
    # b stays open until 30.4: a is the only target that can take a request.
    assert a.ejected_until == 0.0
    assert b.pick(None, now=16.1) is a


# --- circuit breakers through the balancer --------------------------------------------


def test_breaker_closed_open_half_open_closed(caplog: pytest.LogCaptureFixture) -> None:
    settings = BreakerSettings(
        failure_threshold=3, window=10.0, open_for=30.0, half_open_max=2, success_threshold=2
    )
    b, (_a, bee) = balancer("a", "b", eject_after=0, breaker_settings=settings)
    breaker = b.breaker(bee)
    caplog.set_level(logging.WARNING, logger="trioproxy.balance")
    fail(b, bee, 0.0, 1.0)
    assert breaker.state is CLOSED
    fail(b, bee, 2.0)
    assert breaker.state is OPEN
    assert picks(b, 4, now=31.9) == {"a": 4}
    # open_for has passed: the next pick that lands on b is a trial, and so is one more.
    chosen = [b.pick(None, now=32.0) for _ in range(4)]
    assert chosen.count(bee) == 2
    assert breaker.state is HALF_OPEN
    assert picks(b, 2, now=32.1) == {"a": 2}  # both trial slots taken
    b.on_success(bee, 32.2)
    assert breaker.state is HALF_OPEN
    b.on_success(bee, 32.3)
    assert breaker.state is CLOSED
    assert picks(b, 4, now=33.0) == {"a": 2, "b": 2}
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "circuit breaker for http://b:8000: CLOSED -> OPEN",
        "circuit breaker for http://b:8000: OPEN -> HALF_OPEN",
        "circuit breaker for http://b:8000: HALF_OPEN -> CLOSED",
    ]


def test_a_failed_trial_reopens_the_breaker() -> None:
    settings = BreakerSettings(failure_threshold=2, open_for=5.0)
    b, (a,) = balancer("a", eject_after=0, breaker_settings=settings)
    fail(b, a, 0.0, 0.0)
    assert b.pick(None, now=5.0) is a
    b.on_failure(a, 5.5)
    assert b.breaker(a).state is OPEN
    no_candidate(b, now=10.4)  # open for another open_for from the failed trial
    assert b.pick(None, now=10.5) is a


def test_failures_outside_the_window_do_not_open_the_breaker() -> None:
    settings = BreakerSettings(failure_threshold=3, window=10.0)
    b, (a,) = balancer("a", eject_after=0, breaker_settings=settings)
    fail(b, a, 0.0, 5.0, 10.0, 15.0, 20.0)
    assert b.breaker(a).state is CLOSED
    fail(b, a, 21.0)
    assert b.breaker(a).state is OPEN


def test_breaker_failures_zero_turns_breakers_off() -> None:
    b, (_a, bee) = balancer("a", "b", eject_after=0, breaker_settings=NO_BREAKER)
    fail(b, bee, *[0.01 * i for i in range(100)])
    assert b.breaker(bee).state is CLOSED
    assert picks(b, 4, now=1.0) == {"a": 2, "b": 2}
    assert b.snapshot(1.0)[1]["breaker"] == {"state": "disabled"}
    assert bee.failures == 100


def test_the_default_breaker_opens_after_five_failures() -> None:
    b, (a,) = balancer("a", eject_after=0)
    fail(b, a, 0.0, 1.0, 2.0, 3.0)
    assert b.breaker(a).state is CLOSED
    fail(b, a, 4.0)
    assert b.breaker(a).state is OPEN
    no_candidate(b, now=33.9)  # open for 30 s by default
    assert b.pick(None, now=34.0) is a


# --- any_healthy and snapshot ----------------------------------------------------------


def test_any_healthy() -> None:
    b, (a, bee) = balancer("a", "b", eject_after=0)
    assert b.any_healthy(0.0)
    a.healthy = False
    assert b.any_healthy(0.0)
    bee.ejected_until = 5.0
    assert not b.any_healthy(1.0)
    assert b.any_healthy(5.0)
    fail(b, bee, 5.0, 5.0, 5.0, 5.0, 5.0)
    assert not b.any_healthy(6.0)


def test_snapshot_lists_every_target_with_its_state() -> None:
    a = target("a", weight=3, max_inflight=10)
    bee = target("b")
    b = Balancer([a, bee], eject_after=0)
    b.on_success(a, 1.0, latency=0.010)
    b.on_success(a, 1.1, latency=0.020)
    b.on_failure(a, 1.2)
    bee.healthy = False
    bee.ejected_until = 3.0
    with b.track(a), b.track(a, tunnel=True):
        snapshot = b.snapshot(2.0)
    first, second = snapshot
    breaker = first.pop("breaker")
    assert first == {
        "url": "http://a:8000",
        "weight": 3,
        "healthy": True,
        "ejected": False,
        "ejected_for_s": 0.0,
        "inflight": 2,
        "tunnels": 1,
        "max_inflight": 10,
        "latency_ms": 13.0,  # EWMA: 10 + 0.3 * (20 - 10)
        "last_latency_ms": 20.0,
        "requests": 3,
        "failures": 1,
    }
    assert isinstance(breaker, dict)
    assert breaker["state"] == "closed"
    assert breaker["failures"] == 1
    assert breaker["failure_threshold"] == 5
    assert breaker["opens"] == 0
    assert second["url"] == "http://b:8000"
    assert second["healthy"] is False
    assert second["ejected"] is True
    assert second["ejected_for_s"] == 1.0
    assert second["latency_ms"] is None and second["last_latency_ms"] is None
    assert second["max_inflight"] is None
    assert second["requests"] == 0


def test_on_success_without_latency_leaves_the_ewma_alone() -> None:
    b, (a,) = balancer("a")
    b.on_success(a, 0.0)
    assert a.latency is None and a.requests == 1
