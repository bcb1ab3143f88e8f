"""The downstream connection handler (trioproxy/server/connection.py) around the engine.

Everything runs in memory (see tests/memory.py): an h11 client drives
``ClientConnection.serve()``, whose engine reaches a fake upstream through the pool's
connector. Every test takes ``autojump_clock`` (pytest-trio only runs a test on a clock the test
function itself requests), so timeouts cost no real time and the times asserted are
exact; a test that would hang fails at the fake-time ceiling instead.
"""

from __future__ import annotations

import re

import h11
import memory
import pytest
import trio
import trio.testing
from memory import (
    ORIGIN,
    FakeUpstream,
    Handler,
    Headers,
    MemoryClient,
    ReceivedRequest,
    Reply,
    UpstreamPeer,
    fake_time_ceiling,  # noqa: F401  (autouse: fails a hung test fast)
    ok,
    start_proxy,
)
from trio.testing import MockClock


@pytest.fixture(autouse=True, params=["h11", "httptools"])
def parser(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs over both implementations of the parser seam (both sides)."""
    name: str = request.param
    monkeypatch.setattr(memory, "PARSER", name)
    return name


async def settle() -> None:
    """Let every task run until all are blocked (the engine returns its connection, ...)."""
    await trio.testing.wait_all_tasks_blocked()


async def echo_target(request: ReceivedRequest) -> Reply:
    return ok(request.method + b" " + request.target)


async def echo_body(request: ReceivedRequest) -> Reply:
    return ok(request.body)


async def get(client: MemoryClient, target: bytes = b"/", headers: Headers | None = None) -> None:
    await client.send_request(b"GET", target, headers)


def status_line(raw: bytes) -> bytes:
    return raw.split(b"\r\n", 1)[0]


# --- relaying --------------------------------------------------------------------------


async def test_get_relayed_and_upstream_connection_reused(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    proxy = start_proxy(nursery, FakeUpstream(nursery, app=echo_target))
    client = proxy.connect()
    for target in (b"/one", b"/two?x=1"):
        await get(client, target)
        response = await client.read_response()
        assert response.status == 200
        assert response.body == b"GET " + target
        assert response.complete
        client.next_cycle()
    await settle()
    assert proxy.upstream.accepted == 1
    assert [r.target for r in proxy.upstream.peers[0].requests] == [b"/one", b"/two?x=1"]
    assert proxy.pool.idle_count(ORIGIN) == 1
    assert not client.served.is_set()


async def test_upstream_connection_shared_by_client_connections(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    proxy = start_proxy(nursery)
    for _ in range(3):
        client = proxy.connect()
        await get(client, b"/", headers=[(b"connection", b"close")])
        assert (await client.read_response()).body == b"hello"
        await client.wait_closed()
        await settle()
    assert proxy.upstream.accepted == 1


async def test_post_content_length_body(nursery: trio.Nursery, autojump_clock: MockClock) -> None:
    proxy = start_proxy(nursery, FakeUpstream(nursery, app=echo_body))
    client = proxy.connect()
    await client.send_request(b"POST", b"/submit", body=b"a=1&b=2")
    response = await client.read_response()
    assert response.body == b"a=1&b=2"
    request = proxy.upstream.requests[0]
    assert request.header(b"content-length") == b"7"
    assert request.header(b"transfer-encoding") is None


async def test_http_1_0_request(nursery: trio.Nursery, autojump_clock: MockClock) -> None:
    proxy = start_proxy(nursery, FakeUpstream(nursery, app=echo_target))
    client = proxy.connect()
    await client.send_raw(b"GET /old HTTP/1.0\r\n\r\n")
    raw = await client.read_raw()  # no keep-alive for HTTP/1.0: the proxy closes
    head, _, body = raw.partition(b"\r\n\r\n")
    assert status_line(head) == b"HTTP/1.1 200 OK"
    assert b"\r\nconnection: close" in head.lower()
    assert body == b"GET /old"
    request = proxy.upstream.requests[0]
    assert request.http_version == b"1.1"
    assert request.header(b"host") == b"up.test"
    assert request.header(b"x-forwarded-host") is None  # the client sent no Host
    await settle()
    assert client.served.is_set()


async def test_http_1_0_client_gets_a_close_delimited_body(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    async def chunked(request: ReceivedRequest) -> Reply:
        return Reply(200, [], [b"hel", b"lo"])  # no Content-Length: h11 sends it chunked

    proxy = start_proxy(nursery, FakeUpstream(nursery, app=chunked))
    client = proxy.connect()
    await client.send_raw(b"GET / HTTP/1.0\r\nHost: proxy.test\r\n\r\n")
    raw = await client.read_raw()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"transfer-encoding" not in head.lower()  # HTTP/1.0 knows no chunked
    assert body == b"hello"


async def test_http_1_0_request_via_names_the_received_protocol(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    proxy = start_proxy(nursery)
    client = proxy.connect()
    await client.send_raw(b"GET / HTTP/1.0\r\nHost: proxy.test\r\n\r\n")
    await client.read_raw()
    assert proxy.upstream.requests[0].header(b"via") == b"1.0 trioproxy"


async def test_head(nursery: trio.Nursery, autojump_clock: MockClock) -> None:
    async def sized(request: ReceivedRequest) -> Reply:
        return ok(b"0123456789")

    proxy = start_proxy(nursery, FakeUpstream(nursery, app=sized))
    client = proxy.connect()
    await client.send_request(b"HEAD", b"/file")
    response = await client.read_response()
    assert response.status == 200
    assert response.header(b"content-length") == b"10"
    assert response.body == b""
    assert response.complete
    # The connection is still in step: the next response is read whole.
    client.next_cycle()
    await get(client, b"/file")
    assert (await client.read_response()).body == b"0123456789"
    assert proxy.upstream.accepted == 1


@pytest.mark.parametrize("status", [204, 304])
async def test_bodiless_status(
    nursery: trio.Nursery, autojump_clock: MockClock, status: int
) -> None:
    async def bodiless(request: ReceivedRequest) -> Reply:
        headers = [(b"etag", b'"v1"')] if status == 304 else []
        return Reply(status, headers)

    proxy = start_proxy(nursery, FakeUpstream(nursery, app=bodiless))
    client = proxy.connect()
    await get(client)
    response = await client.read_response()
    assert response.status == status
    assert response.body == b""
    assert response.complete
    assert response.header(b"transfer-encoding") is None
    client.next_cycle()
    await get(client)
    assert (await client.read_response()).status == status
    await settle()
    assert proxy.upstream.accepted == 1


async def test_chunked_request_body_is_streamed(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    """The upstream sees the first chunk before the client sent the rest: no buffering."""
    first_chunk = trio.Event()

    async def streaming(peer: UpstreamPeer) -> None:
        request = await peer.read_head()
        assert request is not None
        assert await peer.read_body_event(request) == b"hello "
        first_chunk.set()
        while await peer.read_body_event(request):
            pass
        await peer.respond(ok(b"got " + request.body))

    proxy = start_proxy(nursery, FakeUpstream(nursery, streaming))
    client = proxy.connect()
    await client.send_request(
        b"POST", b"/upload", [(b"transfer-encoding", b"chunked")], b"hello ", end=False
    )
    await first_chunk.wait()
    await client.send_body(b"world")
    await client.send_end()
    response = await client.read_response()
    assert response.body == b"got hello world"
    request = proxy.upstream.requests[0]
    assert request.complete
    assert request.header(b"transfer-encoding") == b"chunked"
    assert request.header(b"content-length") is None


async def test_expect_100_continue(nursery: trio.Nursery, autojump_clock: MockClock) -> None:
    proxy = start_proxy(nursery, FakeUpstream(nursery, app=echo_body))
    client = proxy.connect()
    await client.send_request(
        b"PUT",
        b"/doc",
        [(b"content-length", b"4"), (b"expect", b"100-continue")],
        end=False,
    )
    assert await client.read_informational() == 100
    await client.send_body(b"data")
    await client.send_end()
    response = await client.read_response()
    assert response.status == 200
    assert response.body == b"data"
    # The proxy answered 100-continue itself (RFC 9110 §10.1.1): Expect is not forwarded.
    assert proxy.upstream.requests[0].header(b"expect") is None


async def test_pipelined_requests_answered_in_order(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    proxy = start_proxy(nursery, FakeUpstream(nursery, app=echo_target))
    client = proxy.connect()
    await client.send_raw(
        b"GET /first HTTP/1.1\r\nHost: p\r\n\r\n"
        b"POST /second HTTP/1.1\r\nHost: p\r\nContent-Length: 2\r\n\r\nhi"
        b"GET /third HTTP/1.1\r\nHost: p\r\n\r\n"
    )
    bodies = []
    for _ in range(3):
        # The client's parser did not send these requests: feed it the responses raw.
        bodies.append(await client.read_raw_response_body())
    assert bodies == [b"GET /first", b"POST /second", b"GET /third"]
    assert [r.body for r in proxy.upstream.requests] == [b"", b"hi", b""]


# --- header rules on the way through -------------------------------------------------------


async def test_hop_by_hop_removed_and_forwarding_headers_added(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    async def answer(request: ReceivedRequest) -> Reply:
        return Reply(
            200,
            [
                (b"content-length", b"2"),
                (b"connection", b"x-up-secret"),
                (b"x-up-secret", b"1"),
                (b"keep-alive", b"timeout=5"),
                (b"set-cookie", b"a=1"),
                (b"set-cookie", b"b=2"),
                (b"x-request-id", b"from-upstream"),
            ],
            [b"ok"],
        )

    proxy = start_proxy(nursery, FakeUpstream(nursery, app=answer))
    client = proxy.connect()
    await get(
        client,
        b"/h",
        headers=[
            (b"host", b"www.example.test"),
            (b"connection", b"keep-alive, X-Secret"),
            (b"x-secret", b"drop me"),
            (b"keep-alive", b"timeout=5"),
            (b"te", b"trailers"),
            (b"proxy-connection", b"keep-alive"),
            (b"trailer", b"x-checksum"),
            (b"x-forwarded-for", b"203.0.113.9"),
            (b"via", b"1.0 edge"),
            (b"x-forwarded-proto", b"gopher"),
            (b"x-keep", b"yes"),
        ],
    )
    response = await client.read_response()
    request = proxy.upstream.requests[0]
    names = [name for name, _ in request.headers]
    for dropped in (
        b"connection",
        b"x-secret",
        b"keep-alive",
        b"te",
        b"proxy-connection",
        b"trailer",
    ):
        assert dropped not in names
    assert request.header(b"host") == b"up.test"
    assert request.header(b"x-keep") == b"yes"
    # Chains extended into one line each, never a second field.
    assert request.header_values(b"x-forwarded-for") == [b"203.0.113.9, unknown"]
    assert request.header_values(b"via") == [b"1.0 edge, 1.1 trioproxy"]
    assert request.header_values(b"x-forwarded-proto") == [b"http"]
    assert request.header(b"x-forwarded-host") == b"www.example.test"
    request_id = request.header(b"x-request-id")
    assert request_id is not None
    assert re.fullmatch(rb"[0-9a-f]{32}", request_id)
    # And back: the response's hop-by-hop fields are gone, Set-Cookie lines stay apart.
    response_names = [name for name, _ in response.headers]
    assert b"x-up-secret" not in response_names
    assert b"keep-alive" not in response_names
    assert response.header_values(b"set-cookie") == [b"a=1", b"b=2"]
    assert response.header(b"via") == b"1.1 trioproxy"
    assert response.header_values(b"x-request-id") == [request_id]


async def test_client_request_id_kept_and_returned(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    proxy = start_proxy(nursery)
    client = proxy.connect()
    await get(client, headers=[(b"x-request-id", b"req-abc-123")])
    response = await client.read_response()
    assert proxy.upstream.requests[0].header_values(b"x-request-id") == [b"req-abc-123"]
    assert response.header_values(b"x-request-id") == [b"req-abc-123"]


async def test_unsafe_client_request_id_replaced(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    proxy = start_proxy(nursery)
    client = proxy.connect()
    await get(client, headers=[(b"x-request-id", b"a" * 201)])
    response = await client.read_response()
    request_id = proxy.upstream.requests[0].header(b"x-request-id")
    assert request_id is not None
    assert re.fullmatch(rb"[0-9a-f]{32}", request_id)
    assert response.header(b"x-request-id") == request_id


# --- the client's timeouts ---------------------------------------------------------------


async def test_header_timeout_slowloris(nursery: trio.Nursery, autojump_clock: MockClock) -> None:
    """A head that trickles in gets 408 at header_timeout after its first byte, then a close."""
    proxy = start_proxy(nursery, header_timeout=10)
    client = proxy.connect()
    start = trio.current_time()
    await client.send_raw(b"GET / HTTP/1.1\r\nHost: p\r\n")
    await trio.sleep(3)
    await client.send_raw(b"X-Slow: 1\r\n")  # trickling bytes does not extend the deadline
    raw = await read_until(client, b"\r\n\r\n")
    assert trio.current_time() - start == pytest.approx(10)
    assert status_line(raw) == b"HTTP/1.1 408 Request Timeout"
    assert b"\r\nconnection: close\r\n" in raw.lower()
    await client.read_raw()  # then the proxy closes
    await client.served.wait()
    assert proxy.upstream.accepted == 0


async def test_header_timeout_runs_from_the_first_byte_of_a_keep_alive_request(
    nursery: trio.Nursery,
    autojump_clock: MockClock,
) -> None:
    proxy = start_proxy(nursery, header_timeout=10, keepalive_timeout=75)
    client = proxy.connect()
    await get(client)
    await client.read_response()
    client.next_cycle()
    await trio.sleep(50)  # idle, within keepalive_timeout
    start = trio.current_time()
    await client.send_raw(b"GET / HTTP/1.1\r\nHost")
    raw = await read_until(client, b"\r\n\r\n")
    assert status_line(raw) == b"HTTP/1.1 408 Request Timeout"
    assert trio.current_time() - start == pytest.approx(10)


async def read_until(client: MemoryClient, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        chunk = bytes(await client.stream.receive_some(65536))
        if not chunk:
            break
        data += chunk
    return data


async def test_nothing_sent_closes_silently_after_header_timeout(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    proxy = start_proxy(nursery, header_timeout=10)
    client = proxy.connect()
    start = trio.current_time()
    assert await client.read_raw() == b""
    assert trio.current_time() - start == pytest.approx(10)


async def test_keep_alive_idle_timeout_closes_silently(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    proxy = start_proxy(nursery, keepalive_timeout=5, header_timeout=10)
    client = proxy.connect()
    await get(client)
    await client.read_response()
    start = trio.current_time()
    assert await client.wait_closed() == b""
    assert trio.current_time() - start == pytest.approx(5)
    await client.served.wait()


async def test_body_timeout(nursery: trio.Nursery, autojump_clock: MockClock) -> None:
    proxy = start_proxy(nursery, body_timeout=20)
    client = proxy.connect()
    await client.send_request(b"POST", b"/", [(b"content-length", b"10")], b"abc", end=False)
    start = trio.current_time()
    response = await client.read_response()
    assert response.status == 408
    assert trio.current_time() - start == pytest.approx(20)
    assert response.header(b"connection") == b"close"
    await client.wait_closed()
    await settle()
    # The upstream saw a head and part of a body, then its connection closed.
    peer = proxy.upstream.peers[0]
    assert peer.closed_by_proxy.is_set()
    assert not peer.requests[0].complete
    assert proxy.pool.idle_count(ORIGIN) == 0


# --- upstream failures ----------------------------------------------------------------------


async def test_upstream_refused_is_502(nursery: trio.Nursery, autojump_clock: MockClock) -> None:
    proxy = start_proxy(nursery, FakeUpstream(nursery, refuse=True))
    client = proxy.connect()
    await get(client, headers=[(b"x-request-id", b"r-1")])
    response = await client.read_response()
    assert response.status == 502
    assert b"upstream refused the connection" in response.body
    # Never an exception's text (errno, strerror, repr) in a response.
    assert b"111" not in response.body
    assert b"Connection refused" not in response.body
    assert b"Error" not in response.body
    assert response.header(b"x-request-id") == b"r-1"
    assert proxy.pool.in_use_count(ORIGIN) == 0


async def test_upstream_read_timeout_is_504(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    async def silent(peer: UpstreamPeer) -> None:
        await peer.read_request()
        await peer.wait_for_eof()

    proxy = start_proxy(nursery, FakeUpstream(nursery, silent), read_timeout=30)
    client = proxy.connect()
    start = trio.current_time()
    await get(client)
    response = await client.read_response()
    assert response.status == 504
    assert trio.current_time() - start == pytest.approx(30)
    # The request was read whole: the client connection stays usable...
    client.next_cycle()
    await get(client)
    assert (await client.read_response()).status == 504
    # ...but a timed-out upstream connection is closed, never reused.
    await settle()
    assert proxy.upstream.accepted == 2
    assert all(peer.closed_by_proxy.is_set() for peer in proxy.upstream.peers)
    assert proxy.pool.idle_count(ORIGIN) == 0


async def test_upstream_read_timeout_is_idle_time_not_total(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    async def slow_but_steady(peer: UpstreamPeer) -> None:
        await peer.read_request()
        await peer.send(peer.h11.send(h11.Response(status_code=200, headers=[])))
        for _ in range(5):
            await trio.sleep(20)
            await peer.send(peer.h11.send(h11.Data(data=b"tick ")))
        await peer.send(peer.h11.send(h11.EndOfMessage()))
        await peer.wait_for_eof()

    proxy = start_proxy(nursery, FakeUpstream(nursery, slow_but_steady), read_timeout=30)
    client = proxy.connect()
    await get(client)
    response = await client.read_response()
    assert response.complete
    assert response.body == b"tick " * 5


async def closes_after_reading(peer: UpstreamPeer) -> None:
    await peer.read_request()


async def partial_head(peer: UpstreamPeer) -> None:
    await peer.read_request()
    await peer.send(b"HTTP/1.1 200 OK\r\nContent-Le")


async def bare_lf_head(peer: UpstreamPeer) -> None:
    await peer.read_request()
    await peer.send(b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok")
    await peer.wait_for_eof()


async def garbage(peer: UpstreamPeer) -> None:
    await peer.read_request()
    await peer.send(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40)
    await peer.wait_for_eof()


@pytest.mark.parametrize(
    "handler",
    [closes_after_reading, partial_head, bare_lf_head, garbage],
    ids=["closes-before-head", "closes-mid-head", "bare-lf", "not-http"],
)
async def test_upstream_fails_before_the_head_is_502(
    nursery: trio.Nursery, autojump_clock: MockClock, handler: Handler
) -> None:
    proxy = start_proxy(nursery, FakeUpstream(nursery, handler))
    client = proxy.connect()
    await get(client)
    response = await client.read_response()
    assert response.status == 502
    assert response.complete
    await settle()
    assert proxy.upstream.accepted == 1  # a fresh connection failing is not retried
    assert proxy.pool.idle_count(ORIGIN) == 0


async def test_upstream_breaks_mid_body_content_length(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    async def truncated(peer: UpstreamPeer) -> None:
        await peer.read_request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")

    proxy = start_proxy(nursery, FakeUpstream(nursery, truncated))
    client = proxy.connect()
    await get(client)
    response = await client.read_response()
    assert response.status == 200
    assert response.header(b"content-length") == b"10"
    assert response.body == b"hello"
    assert not response.complete  # the connection ended short of Content-Length
    await client.served.wait()


async def test_upstream_breaks_mid_body_chunked(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    async def truncated(peer: UpstreamPeer) -> None:
        await peer.read_request()
        await peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")

    proxy = start_proxy(nursery, FakeUpstream(nursery, truncated))
    client = proxy.connect()
    await get(client)
    response = await client.read_response()
    assert response.status == 200
    assert response.body == b"hello"
    assert not response.complete  # no final zero-length chunk reached the client
    assert await client.wait_closed() == b""
    await client.served.wait()


async def test_upstream_stalls_mid_body_aborts_after_read_timeout(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    async def stalls(peer: UpstreamPeer) -> None:
        await peer.read_request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
        await peer.wait_for_eof()

    proxy = start_proxy(nursery, FakeUpstream(nursery, stalls), read_timeout=30)
    client = proxy.connect()
    start = trio.current_time()
    await get(client)
    response = await client.read_response()
    assert not response.complete
    assert response.body == b"hello"
    assert trio.current_time() - start == pytest.approx(30)
    await settle()
    assert proxy.upstream.peers[0].closed_by_proxy.is_set()


async def test_client_disconnects_mid_response(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    async def endless(peer: UpstreamPeer) -> None:
        await peer.read_request()
        await peer.send(peer.h11.send(h11.Response(status_code=200, headers=[])))
        await peer.send(peer.h11.send(h11.Data(data=b"first part")))
        await peer.wait_for_eof()

    proxy = start_proxy(nursery, FakeUpstream(nursery, endless))
    client = proxy.connect()
    await get(client)
    event = await client.next_event()
    assert type(event) is h11.Response
    assert type(await client.next_event()) is h11.Data
    await client.aclose()
    peer = proxy.upstream.peers[0]
    with trio.fail_after(1):
        await peer.closed_by_proxy.wait()
    await client.served.wait()
    await settle()
    assert proxy.pool.idle_count(ORIGIN) == 0
    assert proxy.pool.in_use_count(ORIGIN) == 0


async def test_client_disconnects_while_upstream_thinks(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    async def slow(peer: UpstreamPeer) -> None:
        await peer.read_request()
        await peer.wait_for_eof()

    proxy = start_proxy(nursery, FakeUpstream(nursery, slow), read_timeout=300)
    client = proxy.connect()
    await get(client)
    await settle()
    await proxy.upstream.peers[0].head_received.wait()
    start = trio.current_time()
    await client.aclose()
    await proxy.upstream.peers[0].closed_by_proxy.wait()
    assert trio.current_time() - start < 1  # not after read_timeout
    await settle()
    assert proxy.pool.idle_count(ORIGIN) == 0


async def test_client_disconnects_mid_request_body(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    proxy = start_proxy(nursery)
    client = proxy.connect()
    await client.send_request(b"POST", b"/", [(b"content-length", b"100")], b"x" * 10, end=False)
    await settle()
    await client.aclose()
    await client.served.wait()
    await settle()
    peer = proxy.upstream.peers[0]
    assert not peer.requests[0].complete  # the upstream never took a cut body for whole
    assert peer.closed_by_proxy.is_set()
    assert proxy.pool.idle_count(ORIGIN) == 0
    assert proxy.crashes == []


@pytest.mark.parametrize(
    "request_line",
    [
        b"GET / HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n",
        b"GET / HTTP/1.0\r\n\r\n",
    ],
    ids=["connection-close", "http-1.0"],
)
async def test_error_answer_to_a_must_close_request(
    nursery: trio.Nursery, autojump_clock: MockClock, request_line: bytes
) -> None:
    proxy = start_proxy(nursery, FakeUpstream(nursery, refuse=True))
    client = proxy.connect()
    await client.send_raw(request_line)
    raw = await client.read_raw()
    assert status_line(raw) == b"HTTP/1.1 502 Bad Gateway"
    assert raw.count(b"HTTP/1.1 ") == 1
    await client.served.wait()
    assert proxy.crashes == []


async def test_client_connection_close_is_honoured(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    proxy = start_proxy(nursery)
    client = proxy.connect()
    await get(client, headers=[(b"connection", b"close")])
    response = await client.read_response()
    assert response.body == b"hello"
    assert response.header(b"connection") == b"close"
    assert await client.wait_closed() == b""
    await settle()
    # The upstream connection did not follow the client's: it is kept for reuse.
    assert proxy.pool.idle_count(ORIGIN) == 1
    assert proxy.upstream.requests[0].header(b"connection") is None


async def test_upstream_connection_close_not_reused(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    async def closing(request: ReceivedRequest) -> Reply:
        return ok(b"bye", (b"connection", b"close"))

    proxy = start_proxy(nursery, FakeUpstream(nursery, app=closing))
    client = proxy.connect()
    for _ in range(2):
        await get(client)
        response = await client.read_response()
        assert response.body == b"bye"
        assert response.header(b"connection") is None  # the upstream's hop, not the client's
        client.next_cycle()
    await settle()
    assert proxy.upstream.accepted == 2
    assert not client.served.is_set()


async def test_upstream_answers_before_the_request_body_ended(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    async def rejects(peer: UpstreamPeer) -> None:
        await peer.read_head()
        await peer.send(
            b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 4\r\nConnection: close\r\n\r\nnope"
        )

    proxy = start_proxy(nursery, FakeUpstream(nursery, rejects))
    client = proxy.connect()
    await client.send_request(b"POST", b"/", [(b"content-length", b"100")], b"x" * 10, end=False)
    response = await client.read_response()
    assert response.status == 413
    assert response.body == b"nope"
    # The rest of the request body was never read: the connection cannot go on.
    await client.wait_closed()
    await client.served.wait()


async def test_stale_keep_alive_connection_is_retried_for_get(
    nursery: trio.Nursery, autojump_clock: MockClock, parser: str, request: pytest.FixtureRequest
) -> None:
    """The upstream closes an idle connection just as the proxy reuses it (RFC 9112 §9.3.1)."""

    async def one_shot(peer: UpstreamPeer) -> None:
        # Serves one request; reads the next one and closes without an answer.
        request = await peer.read_request()
        assert request is not None
        await peer.respond(ok(b"first"))
        peer.next_cycle()
        await peer.read_request()

    async def handler(peer: UpstreamPeer) -> None:
        if peer.index == 0:
            await one_shot(peer)
        else:
            await serve_forever(peer)

    proxy = start_proxy(nursery, FakeUpstream(nursery, handler))
    client = proxy.connect()
    await get(client)
    assert (await client.read_response()).body == b"first"
    client.next_cycle()
    await get(client)
    response = await client.read_response()
    assert response.status == 200
    assert response.body == b"again"
    assert proxy.upstream.accepted == 2


async def serve_forever(peer: UpstreamPeer) -> None:
    while await peer.read_request() is not None:
        await peer.respond(ok(b"again"))
        peer.next_cycle()


async def test_connection_opened_for_a_retry_is_kept(
    nursery: trio.Nursery, autojump_clock: MockClock, parser: str, request: pytest.FixtureRequest
) -> None:

    async def handler(peer: UpstreamPeer) -> None:
        if peer.index == 0:
            request = await peer.read_request()
            assert request is not None
            await peer.respond(ok(b"first"))
            peer.next_cycle()
            await peer.read_request()  # and close: the stale keep-alive race
        else:
            await serve_forever(peer)

    proxy = start_proxy(nursery, FakeUpstream(nursery, handler))
    client = proxy.connect()
    for _ in range(3):
        await get(client)
        assert (await client.read_response()).status == 200
        client.next_cycle()
    await settle()
    assert proxy.upstream.accepted == 2  # the retry's connection serves the third request
    assert proxy.pool.idle_count(ORIGIN) == 1


async def test_pipelined_request_behind_a_retried_get(
    nursery: trio.Nursery, autojump_clock: MockClock, parser: str, request: pytest.FixtureRequest
) -> None:

    async def handler(peer: UpstreamPeer) -> None:
        if peer.index == 0:
            request = await peer.read_request()
            assert request is not None
            await peer.respond(ok(b"first"))
            peer.next_cycle()
            await peer.read_request()
        else:
            await serve_forever(peer)

    proxy = start_proxy(nursery, FakeUpstream(nursery, handler))
    client = proxy.connect()
    await client.send_raw(b"GET /1 HTTP/1.1\r\nHost: p\r\n\r\n")
    assert await client.read_raw_response_body() == b"first"
    await client.send_raw(b"GET /2 HTTP/1.1\r\nHost: p\r\n\r\nGET /3 HTTP/1.1\r\nHost: p\r\n\r\n")
    answers = [await client.read_raw_response_body(), await client.read_raw_response_body()]
    await settle()
    assert proxy.crashes == []
    assert answers == [b"again", b"again"]


async def test_post_not_retried_on_a_stale_connection(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    async def handler(peer: UpstreamPeer) -> None:
        request = await peer.read_request()
        assert request is not None
        await peer.respond(ok(b"first"))
        peer.next_cycle()
        await peer.read_request()

    proxy = start_proxy(nursery, FakeUpstream(nursery, handler))
    client = proxy.connect()
    await get(client)
    await client.read_response()
    client.next_cycle()
    await client.send_request(b"POST", b"/pay", body=b"1")
    response = await client.read_response()
    assert response.status == 502
    assert proxy.upstream.accepted == 1


# --- what the handler refuses -----------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\nHost: p\n\n",
        b"GET / HTTP/1.1\r\nHost: p\r\nX-A: 1\r\n 2\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: p\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\nGET /admin HTTP/1.1\r\nHost: p\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost p\r\n\r\n",
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n",
    ],
    ids=["bare-lf", "obs-fold", "cl-and-te", "no-colon", "tls-hello"],
)
async def test_malformed_head_is_400_and_close(
    nursery: trio.Nursery, autojump_clock: MockClock, data: bytes
) -> None:
    proxy = start_proxy(nursery)
    client = proxy.connect()
    await client.send_raw(data)
    raw = await client.read_raw()
    assert status_line(raw) == b"HTTP/1.1 400 Bad Request"
    assert b"\r\nconnection: close\r\n" in raw.lower()
    assert raw.count(b"HTTP/1.1") == 1  # nothing smuggled through
    await client.served.wait()
    assert proxy.upstream.accepted == 0


async def test_transfer_coding_not_implemented_is_501(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    proxy = start_proxy(nursery)
    client = proxy.connect()
    await client.send_raw(b"POST / HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: gzip\r\n\r\n")
    raw = await client.read_raw()
    assert status_line(raw) == b"HTTP/1.1 501 Not Implemented"
    assert proxy.upstream.accepted == 0


async def test_incomplete_head_over_max_header_size_is_431(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    proxy = start_proxy(nursery, max_header_size=4096)
    client = proxy.connect()
    await client.send_raw(b"GET / HTTP/1.1\r\nHost: p\r\nX-Big: " + b"a" * 8000)
    raw = await client.read_raw()
    assert status_line(raw) == b"HTTP/1.1 431 Request Header Fields Too Large"
    assert proxy.upstream.accepted == 0


async def test_head_over_max_header_size_is_431(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    proxy = start_proxy(nursery)  # max_header_size=65536
    client = proxy.connect()
    await client.send_raw(b"GET / HTTP/1.1\r\nHost: p\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n")
    raw = await read_until(client, b"\r\n\r\n")
    assert status_line(raw) == b"HTTP/1.1 431 Request Header Fields Too Large"
    assert proxy.upstream.accepted == 0


async def test_connect_is_405(nursery: trio.Nursery, autojump_clock: MockClock) -> None:
    proxy = start_proxy(nursery)
    client = proxy.connect()
    await client.send_raw(b"CONNECT up.test:443 HTTP/1.1\r\nHost: up.test:443\r\n\r\n")
    raw = await client.read_raw()
    assert status_line(raw) == b"HTTP/1.1 405 Method Not Allowed"
    assert b"\r\nconnection: close\r\n" in raw.lower()
    assert proxy.upstream.accepted == 0


@pytest.mark.parametrize(
    "target", [b"http://up.test/", b"https://evil.test/x", b"up.test:80", b"*"]
)
async def test_non_origin_form_target_is_400(
    nursery: trio.Nursery, autojump_clock: MockClock, target: bytes
) -> None:
    proxy = start_proxy(nursery)
    client = proxy.connect()
    await client.send_raw(b"GET " + target + b" HTTP/1.1\r\nHost: p\r\n\r\n")
    raw = await client.read_raw()
    assert status_line(raw) == b"HTTP/1.1 400 Bad Request"
    assert proxy.upstream.accepted == 0


async def test_options_asterisk_is_relayed(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    proxy = start_proxy(nursery, FakeUpstream(nursery, app=echo_target))
    client = proxy.connect()
    await client.send_request(b"OPTIONS", b"*")
    assert (await client.read_response()).body == b"OPTIONS *"


async def test_content_length_over_max_body_size_is_413(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    proxy = start_proxy(nursery, max_body_size=100)
    client = proxy.connect()
    await client.send_request(
        b"POST",
        b"/",
        [(b"content-length", b"101"), (b"expect", b"100-continue")],
        end=False,
    )
    response = await client.read_response()
    assert response.status == 413
    assert response.informational == []  # refused before inviting the body
    assert response.header(b"connection") == b"close"
    assert proxy.upstream.accepted == 0


async def test_content_length_at_max_body_size_passes(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    proxy = start_proxy(nursery, FakeUpstream(nursery, app=echo_body), max_body_size=100)
    client = proxy.connect()
    await client.send_request(b"POST", b"/", body=b"x" * 100)
    response = await client.read_response()
    assert response.status == 200
    assert response.body == b"x" * 100


async def test_chunked_body_crossing_max_body_size_is_413(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    proxy = start_proxy(nursery, max_body_size=100)
    client = proxy.connect()
    await client.send_request(b"POST", b"/", [(b"transfer-encoding", b"chunked")], end=False)
    await client.send_body(b"x" * 60)
    await client.send_body(b"x" * 60)
    response = await client.read_response()
    assert response.status == 413
    assert response.header(b"connection") == b"close"
    await client.wait_closed()
    await settle()
    # The upstream got the start of the body, never its end, and lost the connection.
    peer = proxy.upstream.peers[0]
    assert not peer.requests[0].complete
    assert peer.closed_by_proxy.is_set()
    assert proxy.pool.idle_count(ORIGIN) == 0


async def test_route_limit_alone_refuses_content_length_up_front(
    nursery: trio.Nursery,
    autojump_clock: MockClock,
) -> None:
    proxy = start_proxy(nursery)
    proxy.route.max_body_size = 100  # a route's own limit, as [routes.X] max_body_size sets
    client = proxy.connect()
    await client.send_request(b"POST", b"/", [(b"content-length", b"1000")], end=False)
    await client.send_body(b"x" * 1000)
    response = await client.read_response()
    assert response.status == 413
    assert proxy.upstream.accepted == 0


# --- drain ----------------------------------------------------------------------------------


async def test_drain_closes_an_idle_keep_alive_connection(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    proxy = start_proxy(nursery, keepalive_timeout=75)
    client = proxy.connect()
    await get(client)
    await client.read_response()
    await settle()
    start = trio.current_time()
    proxy.state.drain()
    assert await client.wait_closed() == b""
    await client.served.wait()
    assert trio.current_time() - start == 0
    assert proxy.state.open_connections == 0


async def test_drain_lets_a_busy_exchange_finish_with_connection_close(
    nursery: trio.Nursery,
    autojump_clock: MockClock,
) -> None:
    release = trio.Event()

    async def slow(peer: UpstreamPeer) -> None:
        await peer.read_request()
        await release.wait()
        await peer.respond(ok(b"done"))
        await peer.wait_for_eof()

    proxy = start_proxy(nursery, FakeUpstream(nursery, slow))
    client = proxy.connect()
    await get(client)
    await settle()
    proxy.state.drain()
    release.set()
    response = await client.read_response()
    assert response.status == 200
    assert response.body == b"done"
    assert response.header(b"connection") == b"close"
    assert await client.wait_closed() == b""
