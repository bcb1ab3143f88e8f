"""HealthChecker / LoadBalancer: the fastapi-reverse-proxy-shaped library API, over real sockets."""

from __future__ import annotations

import socket

import pytest
import trio

from trioproxy import HealthChecker, LoadBalancer


def dead_url() -> str:
    """A loopback port with nothing listening (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_load_balancer_over_urls_is_round_robin() -> None:
    async def main() -> list[str | None]:
        balancer = LoadBalancer(["http://a.test:1", "http://b.test:2", "http://c.test:3"])
        return [balancer.get() for _ in range(6)]

    picks = trio.run(main)
    assert picks == ["http://a.test:1", "http://b.test:2", "http://c.test:3"] * 2


async def test_health_checker_probes_on_entry_and_finds_the_live_target(upstream: str) -> None:
    dead = dead_url()
    checker = HealthChecker([upstream, dead], interval=10, timeout=2)
    async with checker:
        # No waiting: the first round of probes ran on entry.
        assert checker.get_healthy_targets() == [upstream]
        assert checker.is_healthy(upstream) and not checker.is_healthy(dead)
        assert checker.get_fastest() == upstream
        assert set(checker.get_response_times()) == {upstream}
        assert LoadBalancer(checker).get() == upstream


async def test_dict_targets_carry_ping_path_and_request_cap(upstream: str) -> None:
    checker = HealthChecker(
        [{"host": upstream, "pingpath": "/status/503", "maxrequests": 5}], timeout=2
    )
    assert checker.target_objects[0].spec.max_inflight == 5
    async with checker:
        # Its own ping path answers 503: not healthy, so nothing to balance to.
        assert checker.get_healthy_targets() == []
        assert LoadBalancer(checker).get() is None


async def test_ping_path_is_readable_and_settable(upstream: str) -> None:
    checker = HealthChecker([upstream], ping_path="/status/500", timeout=2)
    assert checker.ping_path == "/status/500"
    async with checker:
        assert not checker.is_healthy(upstream)
        checker.ping_path = "/"
        await checker.check_all()
        assert checker.is_healthy(upstream)
    with pytest.raises(ValueError, match="ping_path"):
        checker.ping_path = "no-slash"


async def test_a_ping_expects_200_to_399_unless_told_otherwise(upstream: str) -> None:
    # The library pings a path, as fastapi-reverse-proxy does: a 404 there is a failed
    # ping (the CLI's liveness default is not this API's), unless expect= says so.
    async with HealthChecker([upstream], ping_path="/missing", timeout=2) as checker:
        assert not checker.is_healthy(upstream)
    async with HealthChecker([upstream], ping_path="/missing", timeout=2, expect=[404]) as checker:
        assert checker.is_healthy(upstream)
    async with HealthChecker([upstream], timeout=2, expect=["300-399"]) as checker:
        assert not checker.is_healthy(upstream)  # / answers 200
    with pytest.raises(ValueError, match="status"):
        HealthChecker([upstream], expect=["2xx"])


async def test_start_and_aclose_are_the_halves_of_async_with(upstream: str) -> None:
    checker = HealthChecker([upstream], timeout=2)
    await checker.start()
    try:
        assert checker.get_fastest() == upstream
    finally:
        await checker.aclose()


def test_strategy_by_name_and_bad_targets() -> None:
    async def main() -> list[str | None]:
        balancer = LoadBalancer(
            [{"host": "http://a.test:1", "weight": 2}, "http://b.test:2"], strategy="weighted"
        )
        return [balancer.get() for _ in range(3)]

    assert sorted(trio.run(main)) == ["http://a.test:1", "http://a.test:1", "http://b.test:2"]
    with pytest.raises(ValueError, match="host"):
        LoadBalancer([{"url": "http://a.test:1"}])
    with pytest.raises(ValueError, match=r"strategy|valid"):
        LoadBalancer(["http://a.test:1"], strategy="nope")
