"""Failures through the real proxy process: upstreams that refuse, stall, close or break
off, and clients that send what HTTP/1.1 does not allow or take too long.

What a user notices: the status (502, 504, 400, 405, 408, 413, 431), a short text body
that names the cause without a traceback or an exception's repr, a connection that ends
instead of hanging, and a truncated body that cannot pass for a whole one.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
import trio
from fixtures import ProxyProcess, read_head, reset, run_proxy, serve_tcp_handler

pytestmark = pytest.mark.timeout(20)

#: What must never reach a client, nor the proxy's log.
LEAKS = ("Traceback", "Error(", "Errno", 'File "', "Exception")

Handler = Callable[[trio.SocketStream], Awaitable[None]]


def assert_short_error(response: Any, status: int) -> None:
    """``response`` (a RawResponse or an httpx.Response) is a short, plain error."""
    code = response.status if hasattr(response, "status") else response.status_code
    body = response.body if hasattr(response, "body") else response.content
    assert code == status, body
    assert 0 < len(body) < 200, body
    text = body.decode("latin-1")
    assert text.startswith(str(status)), text
    for leak in LEAKS:
        assert leak not in text, text


def assert_clean_log(proxy: ProxyProcess) -> None:
    assert "Traceback" not in proxy.stderr(), proxy.stderr()


def unused_port() -> int:
    """A port of 127.0.0.1 with nothing listening on it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@contextmanager
def stalled_listener() -> Iterator[str]:
    """The URL of a port whose accept queue is full, so a connect to it hangs (Linux drops
    the SYN rather than refusing it)."""
    listener = socket.socket()
    fillers = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        address = listener.getsockname()
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            try:
                filler.connect(address)
            except BlockingIOError:
                pass
            fillers.append(filler)
        # Check the trick works here: a further connect must not complete.
        probe = socket.socket()
        probe.settimeout(0.2)
        try:
            probe.connect(address)
        except TimeoutError:
            pass
        else:
            pytest.skip("this kernel completes connects past a full accept queue")
        finally:
            probe.close()
        yield f"http://127.0.0.1:{address[1]}"
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


async def fault_upstream(handler: Handler, nursery: trio.Nursery) -> str:
    host, port = await serve_tcp_handler(handler, nursery)
    return f"http://{host}:{port}"


# --- the upstream fails ----------------------------------------------------------------


async def test_upstream_refuses(http_client: httpx.AsyncClient, front_end: Any) -> None:
    async with front_end("--upstream", f"http://127.0.0.1:{unused_port()}") as proxy:
        response = await http_client.get(proxy.url + "/anything")
        assert_short_error(response, 502)
        assert response.headers["content-type"].startswith("text/plain")
        # The proxy stays up and answers the next request the same way.
        assert (await http_client.get(proxy.url + "/again")).status_code == 502
    assert_clean_log(proxy)


async def test_upstream_never_answers(
    nursery: trio.Nursery,
    http_client: httpx.AsyncClient,
    front_end: Any,
) -> None:
    async def never_answer(stream: trio.SocketStream) -> None:
        await read_head(stream)
        await trio.sleep_forever()

    url = await fault_upstream(never_answer, nursery)
    async with front_end("--upstream", url, "--read-timeout", "0.5") as proxy:
        start = trio.current_time()
        response = await http_client.get(proxy.url + "/")
        elapsed = trio.current_time() - start
    assert_short_error(response, 504)
    assert 0.4 <= elapsed < 3, elapsed
    assert_clean_log(proxy)


async def test_connect_timeout(http_client: httpx.AsyncClient, front_end: Any) -> None:
    with stalled_listener() as url:
        async with front_end("--upstream", url, "--connect-timeout", "0.5") as proxy:
            start = trio.current_time()
            response = await http_client.get(proxy.url + "/")
            elapsed = trio.current_time() - start
    assert_short_error(response, 504)
    assert 0.4 <= elapsed < 3, elapsed
    assert_clean_log(proxy)


async def _close_before_head(stream: trio.SocketStream) -> None:
    await read_head(stream)


async def _reset_before_head(stream: trio.SocketStream) -> None:
    await read_head(stream)
    await reset(stream)


@pytest.mark.parametrize(
    "handler", [_close_before_head, _reset_before_head], ids=["close", "reset"]
)
async def test_upstream_ends_before_the_head(
    nursery: trio.Nursery, http_client: httpx.AsyncClient, handler: Handler, parser: str
) -> None:
    url = await fault_upstream(handler, nursery)
    async with run_proxy("--http", parser, "--upstream", url) as proxy:
        response = await http_client.get(proxy.url + "/")
    assert_short_error(response, 502)
    assert_clean_log(proxy)


async def _cut_length_body(stream: trio.SocketStream) -> None:
    await read_head(stream)
    await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 100)


async def _cut_chunked_body(stream: trio.SocketStream) -> None:
    await read_head(stream)
    await stream.send_all(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n64\r\n" + b"x" * 100 + b"\r\n"
    )


@pytest.mark.parametrize(
    "handler", [_cut_length_body, _cut_chunked_body], ids=["length", "chunked"]
)
async def test_upstream_breaks_off_the_body(
    nursery: trio.Nursery,
    http_client: httpx.AsyncClient,
    raw_connect: Any,
    handler: Handler,
    parser: str,
    front_end: Any,
) -> None:
    url = await fault_upstream(handler, nursery)
    async with front_end("--http", parser, "--upstream", url) as proxy:
        # A client library reports the truncation instead of returning a short body.
        with pytest.raises(httpx.RemoteProtocolError):
            await http_client.get(proxy.url + "/")

        conn = await raw_connect(proxy)
        await conn.send(b"GET / HTTP/1.1\r\nHost: proxy\r\n\r\n")
        raw = await conn.read_to_eof(within=3)  # the connection ends; it does not hang
        # The access log says how the exchange ended, whichever front end had it.
        assert '"GET / HTTP/1.1" 200' in (log := await proxy.settled_stderr()), log
        assert log.count("(aborted)") == 2, log
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    if handler is _cut_length_body:
        assert b"content-length: 1000" in head.lower()
        assert len(body) < 1000
    else:
        assert b"transfer-encoding: chunked" in head.lower()
        assert b"x" * 100 in body
        assert not body.endswith(b"0\r\n\r\n"), body
    # No traceback but, under ASGI, hypercorn's of the ResponseAborted the app raises to
    # make it cut the connection (see the README).
    log = proxy.stderr()
    assert log.count("Traceback") == log.count("trioproxy.asgi.http.ResponseAborted:"), log


# --- the client sends what it must not ----------------------------------------------------

MALFORMED = {
    "garbage-request-line": (b"THIS IS NOT HTTP\r\n\r\n", 400),
    "content-length-and-chunked": (
        b"POST /echo HTTP/1.1\r\nHost: p\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "two-content-lengths": (
        b"POST /echo HTTP/1.1\r\nHost: p\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        400,
    ),
    "obs-fold": (b"GET /echo HTTP/1.1\r\nHost: p\r\nX-Folded: a\r\n b\r\n\r\n", 400),
    "bare-lf": (b"GET /echo HTTP/1.1\nHost: p\n\n", 400),
    "absolute-form": (b"GET http://example.com/echo HTTP/1.1\r\nHost: example.com\r\n\r\n", 400),
    "connect": (b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 405),
}


@pytest.mark.parametrize("case", list(MALFORMED))
async def test_malformed_request_is_refused_then_closed(
    canned_upstream: Any, raw_connect: Any, case: str, parser: str
) -> None:
    request, status = MALFORMED[case]
    canned = await canned_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    async with run_proxy("--http", parser, "--upstream", canned.url) as proxy:
        conn = await raw_connect(proxy)
        await conn.send(request)
        response = await conn.read_response(within=3)
        assert_short_error(response, status)
        assert response.get("connection") == "close"
        assert await conn.read_to_eof(within=3) == b""
        # (Closing our end too, so that the proxy's graceful close ends at once.)
        await conn.aclose()
    assert canned.connections == 0
    assert_clean_log(proxy)


@pytest.mark.parametrize("after_a_request", [False, True], ids=["first", "after-keep-alive"])
async def test_an_http09_request_line_gets_400_at_once(
    canned_upstream: Any, raw_connect: Any, parser: str, after_a_request: bool
) -> None:
    # An HTTP/0.9 client sends "GET /path" CRLF and nothing more: the proxy must not
    # wait for the rest of a head (the header timeout, 10 s by default) to refuse it.
    canned = await canned_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    async with run_proxy("--http", parser, "--upstream", canned.url) as proxy:
        conn = await raw_connect(proxy)
        if after_a_request:
            await conn.send(b"GET / HTTP/1.1\r\nHost: p\r\n\r\n")
            assert (await conn.read_response()).body == b"ok"
        start = trio.current_time()
        await conn.send(b"GET /path\r\n")
        response = await conn.read_response(within=3)
        assert await conn.read_to_eof(within=3) == b""
        took = trio.current_time() - start
        await conn.aclose()
    print(f"HTTP/0.9 line ({parser}): 400 and closed after {took * 1000:.1f} ms")
    assert_short_error(response, 400)
    assert response.get("connection") == "close"
    # Far below the 10 s header timeout it would otherwise wait for; 1 s leaves
    # room for a stalled CI machine.
    assert took < 1.0, took
    assert canned.connections == (1 if after_a_request else 0)
    assert_clean_log(proxy)


# 2 KB arrives in one read, whole; 100 KB over several.
@pytest.mark.parametrize("size", [2_000, 100_000], ids=["2KB", "100KB"])
async def test_request_head_over_the_limit(
    canned_upstream: Any, raw_connect: Any, size: int, parser: str
) -> None:
    canned = await canned_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    async with run_proxy(
        "--http", parser, "--upstream", canned.url, "--max-header-size", "1024"
    ) as proxy:
        conn = await raw_connect(proxy)
        await conn.send(b"GET / HTTP/1.1\r\nHost: p\r\nX-Big: %s\r\n\r\n" % (b"a" * size))
        response = await conn.read_response(within=3)
        assert_short_error(response, 431)
        assert await conn.read_to_eof(within=3) == b""
        await conn.aclose()
    assert canned.connections == 0
    assert_clean_log(proxy)


async def test_body_over_the_limit(
    canned_upstream: Any,
    upstream: str,
    raw_connect: Any,
    http_client: httpx.AsyncClient,
    parser: str,
    front_end: Any,
) -> None:
    canned = await canned_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    limit = ("--max-body-size", "1000")
    async with front_end("--http", parser, "--upstream", canned.url, *limit) as proxy:
        conn = await raw_connect(proxy)
        await conn.send(b"POST /upload HTTP/1.1\r\nHost: p\r\nContent-Length: 2000\r\n\r\n")
        await conn.send(b"x" * 2000)
        assert_short_error(await conn.read_response(within=3), 413)
        await conn.aclose()
    # Refused on its Content-Length alone: the upstream never heard of it.
    assert canned.connections == 0

    async with front_end("--http", parser, "--upstream", upstream, *limit) as proxy:
        at_limit = await http_client.post(proxy.url + "/upload", content=b"y" * 1000)
        assert at_limit.status_code == 200
        assert at_limit.json()["len"] == 1000

        conn = await raw_connect(proxy)
        await conn.send(
            b"POST /upload HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"3e8\r\n" + b"z" * 1000 + b"\r\n"
            + b"3e8\r\n" + b"z" * 1000 + b"\r\n0\r\n\r\n"
        )  # fmt: skip
        assert_short_error(await conn.read_response(within=3), 413)
        assert await conn.read_to_eof(within=3) == b""
        await conn.aclose()
    assert_clean_log(proxy)


# --- the client is slow ------------------------------------------------------------------


async def test_header_timeout(upstream: str, raw_connect: Any, parser: str) -> None:
    async with run_proxy(
        "--http", parser, "--upstream", upstream, "--header-timeout", "0.5"
    ) as proxy:
        conn = await raw_connect(proxy)
        start = trio.current_time()
        await conn.send(b"GET /echo HTTP/1.1\r\nHost: p\r\n")  # half a head, then nothing
        response = await conn.read_response(within=3)
        elapsed = trio.current_time() - start
        assert_short_error(response, 408)
        assert 0.4 <= elapsed < 2.5, elapsed
        assert await conn.read_to_eof(within=3) == b""
        await conn.aclose()
    assert_clean_log(proxy)


async def test_keepalive_timeout_closes_an_idle_connection(upstream: str, raw_connect: Any) -> None:
    async with run_proxy("--upstream", upstream, "--keepalive-timeout", "0.5") as proxy:
        conn = await raw_connect(proxy)
        await conn.send(b"GET / HTTP/1.1\r\nHost: p\r\n\r\n")
        assert (await conn.read_response()).body == b"ok"
        start = trio.current_time()
        assert await conn.read_to_eof(within=3) == b""
        elapsed = trio.current_time() - start
    assert 0.4 <= elapsed < 2.5, elapsed
    assert_clean_log(proxy)
