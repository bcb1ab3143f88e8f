"""The upstream connection pool (trioproxy/upstream/pool.py), over in-memory connections.

The pool's ``connector`` is a :class:`memory.FakeUpstream`: each connection it opens is
one memory stream pair whose far end an h11 server task answers, so "the upstream saw
its connection closed" is observable (``peer.closed_by_proxy``). Every test takes
``autojump_clock``: pool, idle and connect timeouts run in fake time, exactly.
"""

from __future__ import annotations

from typing import Any

import memory
import pytest
import trio
import trio.testing
from memory import (
    ORIGIN,
    FakeUpstream,
    ReceivedRequest,
    Reply,
    UpstreamPeer,
    fake_time_ceiling,  # noqa: F401  (autouse: fails a hung test fast)
    ok,
)
from trio.testing import MockClock

from trioproxy.errors import PoolTimeout, UpstreamConnectError, UpstreamConnectTimeout
from trioproxy.http.parsers import client_factory
from trioproxy.http.protocol import Body, EndOfMessage, RequestHead, ResponseHead
from trioproxy.upstream.connection import UpstreamConnection
from trioproxy.upstream.origin import UpstreamURL
from trioproxy.upstream.pool import UpstreamPool


@pytest.fixture(autouse=True, params=["h11", "httptools"])
def parser(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs over both client implementations of the parser seam."""
    name: str = request.param
    monkeypatch.setattr(memory, "PARSER", name)
    return name


def make_pool(upstream: FakeUpstream, **settings: Any) -> UpstreamPool:
    return UpstreamPool(
        connector=upstream.connector, protocol_factory=client_factory(memory.PARSER), **settings
    )


async def send_request(conn: UpstreamConnection, target: bytes = b"/") -> None:
    protocol = conn.protocol
    await conn.send_mapped(protocol.send_head(RequestHead(b"GET", target, [(b"host", b"up.test")])))
    await conn.send_mapped(protocol.send_end())


async def read_response(conn: UpstreamConnection) -> tuple[ResponseHead, bytes]:
    head = await conn.next_event(30)
    assert isinstance(head, ResponseHead)
    body = b""
    while True:
        event = await conn.next_event(30)
        if isinstance(event, Body):
            body += event.data
        else:
            assert isinstance(event, EndOfMessage)
            return head, body


async def exchange(conn: UpstreamConnection, target: bytes = b"/") -> bytes:
    """One whole request/response, marked clean as the engine does."""
    await send_request(conn, target)
    _, body = await read_response(conn)
    conn.clean = True
    return body


async def echo_target(request: ReceivedRequest) -> Reply:
    return ok(request.target)


async def settle() -> None:
    await trio.testing.wait_all_tasks_blocked()


# --- reuse ---------------------------------------------------------------------------------


async def test_completed_exchange_is_reused(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    upstream = FakeUpstream(nursery, app=echo_target)
    pool = make_pool(upstream)
    async with pool.connection(ORIGIN) as first:
        assert not first.reused
        assert await exchange(first, b"/1") == b"/1"
    assert pool.idle_count(ORIGIN) == 1
    assert pool.in_use_count(ORIGIN) == 0
    async with pool.connection(ORIGIN) as second:
        assert second is first
        assert second.reused
        assert await exchange(second, b"/2") == b"/2"
    assert upstream.accepted == 1
    assert first.exchanges == 2
    assert [r.target for r in upstream.peers[0].requests] == [b"/1", b"/2"]
    assert not upstream.peers[0].closed_by_proxy.is_set()


async def test_most_recently_used_idle_connection_first(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    upstream = FakeUpstream(nursery)
    pool = make_pool(upstream)
    async with pool.connection(ORIGIN) as a, pool.connection(ORIGIN) as b:
        await exchange(a)
        await exchange(b)
    # `async with a, b` exits b first: a was returned last.
    assert pool.idle_count(ORIGIN) == 2
    async with pool.connection(ORIGIN) as again:
        assert again is a
        await exchange(again)


async def test_fresh_opens_a_new_connection(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    upstream = FakeUpstream(nursery)
    pool = make_pool(upstream)
    async with pool.connection(ORIGIN) as conn:
        await exchange(conn)
    async with pool.connection(ORIGIN, fresh=True) as new:
        assert new is not conn
        await exchange(new)
    assert upstream.accepted == 2
    assert pool.idle_count(ORIGIN) == 2


async def test_pools_are_per_origin(nursery: trio.Nursery, autojump_clock: MockClock) -> None:
    upstream = FakeUpstream(nursery)
    pool = make_pool(upstream)
    other = UpstreamURL.parse("http://other.test:8080").origin
    async with pool.connection(ORIGIN) as conn:
        await exchange(conn)
    async with pool.connection(other) as conn:
        await exchange(conn)
    assert upstream.origins == [ORIGIN, other]
    assert pool.idle_count(ORIGIN) == 1
    assert pool.idle_count(other) == 1


# --- what is not reused ----------------------------------------------------------------------


async def test_exchange_cancelled_midway_is_closed(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    async def never_answers(peer: UpstreamPeer) -> None:
        await peer.read_request()
        await peer.wait_for_eof()

    upstream = FakeUpstream(nursery, never_answers)
    pool = make_pool(upstream)
    with trio.move_on_after(5) as scope:
        async with pool.connection(ORIGIN) as conn:
            await exchange(conn)
    assert scope.cancelled_caught
    assert pool.idle_count(ORIGIN) == 0
    assert pool.in_use_count(ORIGIN) == 0
    await settle()
    assert upstream.peers[0].closed_by_proxy.is_set()


async def test_exchange_cancelled_mid_body_is_closed_even_if_marked_clean(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    """``clean`` set too early does not return a half-read connection: reusable says no."""

    async def half_body(peer: UpstreamPeer) -> None:
        await peer.read_request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
        await peer.wait_for_eof()

    upstream = FakeUpstream(nursery, half_body)
    pool = make_pool(upstream)
    with trio.move_on_after(5):
        async with pool.connection(ORIGIN) as conn:
            await send_request(conn)
            assert isinstance(await conn.next_event(30), ResponseHead)
            conn.clean = True
            await conn.next_event(30)  # "hello"
            await conn.next_event(30)  # never comes
    assert pool.idle_count(ORIGIN) == 0
    await settle()
    assert upstream.peers[0].closed_by_proxy.is_set()


async def test_exchange_not_marked_clean_is_closed(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    upstream = FakeUpstream(nursery)
    pool = make_pool(upstream)
    async with pool.connection(ORIGIN) as conn:
        await send_request(conn)
        await read_response(conn)  # whole, but the engine did not vouch for it
    assert pool.idle_count(ORIGIN) == 0
    await settle()
    assert upstream.peers[0].closed_by_proxy.is_set()


async def test_error_during_exchange_closes_and_releases(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    upstream = FakeUpstream(nursery)
    pool = make_pool(upstream, max_per_origin=1)
    with pytest.raises(KeyError):
        async with pool.connection(ORIGIN) as conn:
            await send_request(conn)
            raise KeyError("boom")  # before the response was read
    assert pool.idle_count(ORIGIN) == 0
    assert pool.in_use_count(ORIGIN) == 0
    async with pool.connection(ORIGIN) as conn:  # the slot is free again
        await exchange(conn)
    assert upstream.accepted == 2


async def test_connection_close_response_is_not_reused(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    async def closing(request: ReceivedRequest) -> Reply:
        return ok(b"bye", (b"connection", b"close"))

    upstream = FakeUpstream(nursery, app=closing)
    pool = make_pool(upstream)
    async with pool.connection(ORIGIN) as conn:
        await exchange(conn)
    assert pool.idle_count(ORIGIN) == 0
    async with pool.connection(ORIGIN) as conn:
        await exchange(conn)
    assert upstream.accepted == 2


# --- the per-origin cap ----------------------------------------------------------------------


async def test_checkout_over_the_cap_times_out(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    upstream = FakeUpstream(nursery)
    pool = make_pool(upstream, max_per_origin=1, pool_timeout=10)
    release = trio.Event()

    async def hold() -> None:
        async with pool.connection(ORIGIN) as conn:
            await exchange(conn)
            await release.wait()

    nursery.start_soon(hold)
    await settle()
    assert pool.in_use_count(ORIGIN) == 1
    start = trio.current_time()
    with pytest.raises(PoolTimeout) as caught:
        async with pool.connection(ORIGIN):
            raise AssertionError("got a second connection past max_per_origin=1")
    assert trio.current_time() - start == pytest.approx(10)
    assert caught.value.status == 503
    assert upstream.accepted == 1
    release.set()
    await settle()
    assert pool.in_use_count(ORIGIN) == 0
    assert pool.idle_count(ORIGIN) == 1


async def test_waiter_gets_the_connection_when_it_is_returned(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    upstream = FakeUpstream(nursery)
    pool = make_pool(upstream, max_per_origin=1, pool_timeout=10)

    async def hold_for_3s() -> None:
        async with pool.connection(ORIGIN) as conn:
            await exchange(conn)
            await trio.sleep(3)

    nursery.start_soon(hold_for_3s)
    await settle()
    start = trio.current_time()
    async with pool.connection(ORIGIN) as conn:
        assert trio.current_time() - start == pytest.approx(3)
        assert conn.reused
        await exchange(conn)
    assert upstream.accepted == 1


async def test_cap_counts_per_origin(nursery: trio.Nursery, autojump_clock: MockClock) -> None:
    upstream = FakeUpstream(nursery)
    pool = make_pool(upstream, max_per_origin=1, pool_timeout=10)
    other = UpstreamURL.parse("http://other.test").origin
    start = trio.current_time()
    async with pool.connection(ORIGIN) as a, pool.connection(other) as b:
        await exchange(a)
        await exchange(b)
    assert trio.current_time() == start


# --- idle expiry -----------------------------------------------------------------------------


async def test_idle_connection_past_idle_timeout_is_closed_not_reused(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    upstream = FakeUpstream(nursery)
    pool = make_pool(upstream, idle_timeout=60)
    async with pool.connection(ORIGIN) as old:
        await exchange(old)
    await trio.sleep(61)
    async with pool.connection(ORIGIN) as new:
        assert new is not old
        await exchange(new)
    assert upstream.accepted == 2
    await settle()
    assert upstream.peers[0].closed_by_proxy.is_set()
    assert not upstream.peers[1].closed_by_proxy.is_set()


async def test_idle_connection_within_idle_timeout_is_reused(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    upstream = FakeUpstream(nursery)
    pool = make_pool(upstream, idle_timeout=60)
    async with pool.connection(ORIGIN) as old:
        await exchange(old)
    await trio.sleep(59)
    async with pool.connection(ORIGIN) as conn:
        assert conn is old
        await exchange(conn)
    assert upstream.accepted == 1


async def test_returning_a_connection_closes_expired_idle_ones(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    upstream = FakeUpstream(nursery)
    pool = make_pool(upstream, idle_timeout=60)
    async with pool.connection(ORIGIN) as a:
        await exchange(a)
        async with pool.connection(ORIGIN) as b:
            await exchange(b)
        # b idle from now on; a stays busy for 61 s more.
        await trio.sleep(61)
    assert pool.idle_count(ORIGIN) == 1  # only a: b expired and was closed on a's return
    await settle()
    assert upstream.peers[1].closed_by_proxy.is_set()
    assert not upstream.peers[0].closed_by_proxy.is_set()


async def test_aclose_closes_idle_connections(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    upstream = FakeUpstream(nursery)
    pool = make_pool(upstream)
    async with pool.connection(ORIGIN) as a, pool.connection(ORIGIN) as b:
        await exchange(a)
        await exchange(b)
    await pool.aclose()
    assert pool.idle_count(ORIGIN) == 0
    await settle()
    assert all(peer.closed_by_proxy.is_set() for peer in upstream.peers)


# --- connecting ------------------------------------------------------------------------------


async def test_connect_refused(nursery: trio.Nursery, autojump_clock: MockClock) -> None:
    pool = make_pool(FakeUpstream(nursery, refuse=True), max_per_origin=1)
    for _ in range(2):  # the failed attempt gave its slot back
        with pytest.raises(UpstreamConnectError) as caught:
            async with pool.connection(ORIGIN):
                raise AssertionError("connected to a refusing upstream")
        assert caught.value.status == 502
    assert pool.in_use_count(ORIGIN) == 0


async def test_connect_timeout(nursery: trio.Nursery, autojump_clock: MockClock) -> None:
    async def black_hole(origin: object) -> trio.abc.Stream:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    pool = UpstreamPool(
        connect_timeout=5,
        connector=black_hole,
        max_per_origin=1,
        protocol_factory=client_factory(memory.PARSER),
    )
    start = trio.current_time()
    with pytest.raises(UpstreamConnectTimeout) as caught:
        async with pool.connection(ORIGIN):
            raise AssertionError("connected to a black hole")
    assert trio.current_time() - start == pytest.approx(5)
    assert caught.value.status == 504
    assert pool.in_use_count(ORIGIN) == 0
