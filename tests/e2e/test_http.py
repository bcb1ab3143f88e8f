"""HTTP/1.1 through the real proxy process: what a client and an upstream each see.

Each test starts ``python -m trioproxy`` in front of a real upstream (hypercorn serving
``tests/upstream_app.py``, or a raw socket where the exact bytes matter) and talks to it
with httpx, or with a raw socket where a client library would hide the bytes.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import httpx
import pytest
import trio
from fixtures import run_proxy, serve_asgi
from upstream_app import pattern_bytes, pattern_sha256

pytestmark = pytest.mark.timeout(20)

REQUEST_ID = re.compile(r"[0-9a-f]{32}")


def echo_values(echo: dict[str, Any], name: str) -> list[str]:
    """The values of header ``name`` as the ``/echo`` upstream received them."""
    return [value for field, value in echo["headers"] if field == name]


def authority(url: str) -> str:
    return url.removeprefix("http://").removeprefix("https://")


# --- connections ---------------------------------------------------------------------


async def test_keepalive_serves_many_requests_over_one_upstream_connection(
    port_reporting_upstream: str, raw_connect: Any, parser: str
) -> None:
    async with run_proxy("--http", parser, "--upstream", port_reporting_upstream) as proxy:
        conn = await raw_connect(proxy)
        ports = set()
        for i in range(5):
            await conn.send(f"GET /echo/{i} HTTP/1.1\r\nHost: proxy\r\n\r\n".encode())
            response = await conn.read_response()
            assert response.status == 200
            assert response.json()["target"] == f"/echo/{i}"
            assert response.get("connection") != "close"
            ports.add(response.get("x-upstream-client-port"))
        # Five answers on one client connection, all over one upstream connection.
        assert len(ports) == 1, ports
        assert not conn.eof


async def test_http10_client_gets_a_whole_response_then_close(
    upstream: str, raw_connect: Any, parser: str
) -> None:
    async with run_proxy("--http", parser, "--upstream", upstream) as proxy:
        conn = await raw_connect(proxy)
        # The upstream answers this one chunked; an HTTP/1.0 client cannot read chunked.
        await conn.send(b"GET /bytes/5000?chunked=1 HTTP/1.0\r\nHost: proxy\r\n\r\n")
        raw = await conn.read_to_eof(within=3)
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        assert b"transfer-encoding" not in head.lower()
        assert body == pattern_bytes(5000)

        conn = await raw_connect(proxy)
        await conn.send(b"GET /echo HTTP/1.0\r\nHost: proxy\r\n\r\n")
        raw = await conn.read_to_eof(within=3)
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        assert json.loads(body)["target"] == "/echo"


async def test_via_names_the_version_an_http10_client_spoke(
    upstream: str, raw_connect: Any, parser: str
) -> None:
    async with run_proxy("--http", parser, "--upstream", upstream) as proxy:
        conn = await raw_connect(proxy)
        await conn.send(b"GET /echo HTTP/1.0\r\nHost: proxy\r\n\r\n")
        raw = await conn.read_to_eof(within=3)
        echo = json.loads(raw.partition(b"\r\n\r\n")[2])
        assert echo_values(echo, "via") == ["1.0 trioproxy"]


async def test_expect_100_continue(upstream: str, raw_connect: Any, parser: str) -> None:
    body = b"0123456789" * 3000
    async with run_proxy("--http", parser, "--upstream", upstream) as proxy:
        conn = await raw_connect(proxy)
        await conn.send(
            b"POST /echo HTTP/1.1\r\nHost: proxy\r\n"
            b"Content-Length: %d\r\nExpect: 100-continue\r\n\r\n" % len(body)
        )
        interim = await conn.read_head_bytes(within=3)
        assert interim.startswith(b"HTTP/1.1 100 ")
        await conn.send(body)
        response = await conn.read_response()
        assert response.status == 200
        echo = response.json()
        assert echo["body_len"] == len(body)
        assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()
        # The proxy answered the expectation itself; the upstream is not asked again.
        assert echo_values(echo, "expect") == []


async def test_pipelined_requests_are_answered_in_order(
    upstream: str, raw_connect: Any, parser: str
) -> None:
    async with run_proxy("--http", parser, "--upstream", upstream) as proxy:
        conn = await raw_connect(proxy)
        await conn.send(
            b"GET /echo/1 HTTP/1.1\r\nHost: proxy\r\n\r\n"
            b"POST /echo/2 HTTP/1.1\r\nHost: proxy\r\nContent-Length: 3\r\n\r\nabc"
            b"GET /echo/3 HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n\r\n"
        )
        answers = [(await conn.read_response()).json() for _ in range(3)]
        assert [a["target"] for a in answers] == ["/echo/1", "/echo/2", "/echo/3"]
        assert [a["method"] for a in answers] == ["GET", "POST", "GET"]
        assert answers[1]["body_sha256"] == hashlib.sha256(b"abc").hexdigest()
        assert await conn.read_to_eof(within=3) == b""


# --- bodies --------------------------------------------------------------------------


async def test_chunked_upload_is_streamed_to_the_upstream(
    nursery: trio.Nursery,
    parser: str,
    front_end: Any,
) -> None:
    """The second part is only sent once the upstream got the first: a proxy that
    buffered the body would deadlock here."""
    first_arrived = trio.Event()

    async def app(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        digest = hashlib.sha256()
        length = 0
        while True:
            message = await receive()
            chunk = message.get("body", b"")
            if chunk:
                first_arrived.set()
            digest.update(chunk)
            length += len(chunk)
            if not message.get("more_body", False):
                break
        body = json.dumps({"len": length, "sha256": digest.hexdigest()}).encode()
        headers = [(b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    streaming_upstream = await serve_asgi(app, nursery)
    parts = [b"a" * 70_000, b"b" * 200_000, b"c"]

    async def body() -> AsyncIterator[bytes]:
        yield parts[0]
        with trio.fail_after(5):
            await first_arrived.wait()
        for part in parts[1:]:
            yield part

    async with (
        front_end("--http", parser, "--upstream", streaming_upstream) as proxy,
        httpx.AsyncClient(trust_env=False, timeout=10) as client,
    ):
        response = await client.post(proxy.url + "/upload", content=body())
    whole = b"".join(parts)
    assert response.status_code == 200
    assert response.json() == {"len": len(whole), "sha256": hashlib.sha256(whole).hexdigest()}


async def test_content_length_upload(
    upstream: str,
    http_client: httpx.AsyncClient,
    parser: str,
    front_end: Any,
) -> None:
    body = pattern_bytes(1_000_003)
    async with front_end("--http", parser, "--upstream", upstream) as proxy:
        upload = await http_client.put(proxy.url + "/upload", content=body)
        echo = (await http_client.post(proxy.url + "/echo", content=body[:5000])).json()
    assert upload.status_code == 200
    assert upload.json() == {"len": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    # Framed as the client framed it: the length is passed on, not re-chunked.
    assert echo_values(echo, "content-length") == ["5000"]
    assert echo_values(echo, "transfer-encoding") == []


async def test_response_bodies_arrive_whole(
    upstream: str,
    http_client: httpx.AsyncClient,
    parser: str,
    front_end: Any,
) -> None:
    size = 3 * 64 * 1024 + 777
    async with front_end("--http", parser, "--upstream", upstream) as proxy:
        for chunked in (True, False):
            url = proxy.url + f"/bytes/{size}" + ("?chunked=1" if chunked else "")
            digest = hashlib.sha256()
            received = 0
            async with http_client.stream("GET", url) as response:
                assert response.status_code == 200
                async for chunk in response.aiter_raw():
                    digest.update(chunk)
                    received += len(chunk)
            assert (received, digest.hexdigest()) == (size, pattern_sha256(size))
            if chunked:
                assert response.headers["transfer-encoding"] == "chunked"
                assert "content-length" not in response.headers
            else:
                assert response.headers["content-length"] == str(size)


async def test_head_has_the_headers_of_get_and_no_body(
    upstream: str, raw_connect: Any, parser: str
) -> None:
    async with run_proxy("--http", parser, "--upstream", upstream) as proxy:
        conn = await raw_connect(proxy)
        # On one connection: a body sent after HEAD would be read as the next response.
        await conn.send(b"HEAD /bytes/1000 HTTP/1.1\r\nHost: proxy\r\n\r\n")
        head = await conn.read_response(b"HEAD")
        await conn.send(b"GET /bytes/1000 HTTP/1.1\r\nHost: proxy\r\n\r\n")
        get = await conn.read_response()
    assert (head.status, head.body) == (200, b"")
    assert (get.status, get.body) == (200, pattern_bytes(1000))
    assert head.get("content-length") == get.get("content-length") == "1000"

    def comparable(response: Any) -> list[tuple[bytes, bytes]]:
        return [(k, v) for k, v in response.headers if k not in (b"date", b"x-request-id")]

    assert comparable(head) == comparable(get)


async def test_204_and_304_have_no_body(upstream: str, raw_connect: Any, parser: str) -> None:
    async with run_proxy("--http", parser, "--upstream", upstream) as proxy:
        conn = await raw_connect(proxy)
        statuses = []
        for target in (b"/status/204", b"/status/304", b"/"):
            await conn.send(b"GET %s HTTP/1.1\r\nHost: proxy\r\n\r\n" % target)
            response = await conn.read_response()
            statuses.append((response.status, response.body))
            if response.status in (204, 304):
                assert response.get("transfer-encoding") is None
                assert response.get("content-length") in (None, "0")
    # Had the proxy framed a body after 204/304, the next answer would not parse as "ok".
    assert statuses == [(204, b""), (304, b""), (200, b"ok")]


async def test_sse_events_arrive_as_they_are_sent(
    upstream: str,
    http_client: httpx.AsyncClient,
    front_end: Any,
) -> None:
    lags: list[float] = []
    ids: list[int] = []
    async with (
        front_end("--upstream", upstream) as proxy,
        http_client.stream("GET", proxy.url + "/sse?n=20&interval=0.02") as response,
    ):
        assert response.headers["content-type"] == "text/event-stream"
        buffer = b""
        async for chunk in response.aiter_raw():
            buffer += chunk
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                now = time.time()
                data = json.loads(event.split(b"data: ", 1)[1])
                ids.append(data["i"])
                lags.append(now - data["t"])
    assert ids == list(range(20))
    # Events are 20 ms apart: a proxy holding even one back would show 20 ms+ on
    # most of them; one slow scheduling slice on a shared machine shows on one.
    assert sorted(lags)[-2] < 0.05, lags
    assert max(lags) < 0.25, lags


# --- what crosses the proxy ------------------------------------------------------------


async def test_request_target_is_forwarded_byte_for_byte(
    upstream: str,
    raw_connect: Any,
    parser: str,
    front_end: Any,
) -> None:
    target = b"/echo/a%2Fb/../c?x=1&x=2"
    async with front_end("--http", parser, "--upstream", upstream) as proxy:
        conn = await raw_connect(proxy)
        await conn.send(b"GET %s HTTP/1.1\r\nHost: proxy\r\n\r\n" % target)
        echo = (await conn.read_response()).json()
    assert echo["target"] == target.decode()


async def test_hop_by_hop_headers_are_not_forwarded(
    upstream: str,
    raw_connect: Any,
    parser: str,
    front_end: Any,
) -> None:
    async with front_end("--http", parser, "--upstream", upstream) as proxy:
        conn = await raw_connect(proxy)
        await conn.send(
            b"GET /echo HTTP/1.1\r\nHost: proxy\r\n"
            b"Connection: keep-alive, X-Secret\r\n"
            b"X-Secret: 1\r\n"
            b"Keep-Alive: timeout=5\r\n"
            b"TE: trailers\r\n"
            b"Proxy-Connection: keep-alive\r\n"
            b"X-Kept: yes\r\n\r\n"
        )
        echo = (await conn.read_response()).json()
    names = {name for name, _ in echo["headers"]}
    for hop in ("connection", "x-secret", "keep-alive", "te", "proxy-connection"):
        assert hop not in names, echo["headers"]
    assert echo_values(echo, "x-kept") == ["yes"]


async def test_a_request_body_whose_length_connection_names_arrives_whole(
    upstream: str, raw_connect: Any, parser: str
) -> None:
    # Listing Content-Length as a connection option is a client bug (RFC 9110 §7.6.1);
    # obeying it would forward the POST with no length, so with no body. Like nginx,
    # the proxy keeps the framing.
    body = bytes(range(64))
    async with run_proxy("--http", parser, "--upstream", upstream) as proxy:
        conn = await raw_connect(proxy)
        await conn.send(
            b"POST /echo HTTP/1.1\r\nHost: proxy\r\n"
            b"Connection: Content-Length, X-Secret\r\nX-Secret: 1\r\n"
            b"Content-Length: 64\r\n\r\n" + body
        )
        response = await conn.read_response()
        # The connection is still in step: a second request gets its own answer.
        await conn.send(b"GET /echo/next HTTP/1.1\r\nHost: proxy\r\n\r\n")
        following = await conn.read_response()
    assert response.status == 200
    echo = response.json()
    assert (echo["body_len"], echo["body_sha256"]) == (64, hashlib.sha256(body).hexdigest())
    assert echo_values(echo, "content-length") == ["64"]
    assert echo_values(echo, "x-secret") == []  # the other option is still obeyed
    assert following.json()["target"] == "/echo/next"


async def test_an_upgrade_request_with_a_body_is_relayed_with_its_body(
    upstream: str, raw_connect: Any, parser: str
) -> None:
    """Not a WebSocket handshake: served as plain HTTP, the body included (llhttp
    alone would end the request at its head, and the client waited forever)."""
    body = b"GET /smuggled HTTP/1.1\r\nHost: proxy\r\n\r\n" + bytes(range(256)) * 100
    async with run_proxy("--http", parser, "--upstream", upstream) as proxy:
        conn = await raw_connect(proxy)
        await conn.send(
            b"POST /echo HTTP/1.1\r\nHost: proxy\r\nConnection: upgrade\r\nUpgrade: h2c\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body
        )
        with trio.fail_after(5):
            response = await conn.read_response()
            await conn.send(b"GET /echo/next HTTP/1.1\r\nHost: proxy\r\n\r\n")
            following = await conn.read_response()
    assert response.status == 200
    echo = response.json()
    assert (echo["body_len"], echo["body_sha256"]) == (len(body), hashlib.sha256(body).hexdigest())
    assert following.json()["target"] == "/echo/next"


async def test_a_response_body_whose_length_connection_names_keeps_its_length(
    canned_upstream: Any, raw_connect: Any, parser: str
) -> None:
    canned = await canned_upstream(
        b"HTTP/1.1 200 OK\r\nConnection: content-length, X-Internal\r\nX-Internal: 1\r\n"
        b"Content-Length: 5\r\n\r\nhello"
    )
    async with run_proxy("--http", parser, "--upstream", canned.url) as proxy:
        conn = await raw_connect(proxy)
        await conn.send(b"GET / HTTP/1.1\r\nHost: proxy\r\n\r\n")
        response = await conn.read_response()
    assert (response.status, response.body) == (200, b"hello")
    assert response.get_all("content-length") == ["5"]
    assert response.get_all("transfer-encoding") == []
    assert response.get_all("x-internal") == []


async def test_forwarding_headers(
    upstream: str, raw_connect: Any, parser: str, front_end: Any
) -> None:
    async with front_end("--http", parser, "--upstream", upstream) as proxy:
        conn = await raw_connect(proxy)
        await conn.send(
            b"GET /echo HTTP/1.1\r\nHost: public.example:8443\r\n"
            b"X-Forwarded-For: 203.0.113.7\r\n"
            b"X-Forwarded-For: 198.51.100.2, 192.0.2.1\r\n"
            b"Via: 1.1 corp-gateway\r\n"
            b"X-Forwarded-Proto: gopher\r\n\r\n"
        )
        response = await conn.read_response()
    echo = response.json()
    # One header: the client's chain extended with the client's address.
    assert echo_values(echo, "x-forwarded-for") == [
        "203.0.113.7, 198.51.100.2, 192.0.2.1, 127.0.0.1"
    ]
    assert echo_values(echo, "x-forwarded-proto") == ["http"]
    assert echo_values(echo, "x-forwarded-host") == ["public.example:8443"]
    assert echo_values(echo, "via") == ["1.1 corp-gateway, 1.1 trioproxy"]
    assert response.get_all("via") == ["1.1 trioproxy"]


async def test_forwarded_for_without_a_client_chain(
    upstream: str,
    http_client: httpx.AsyncClient,
    front_end: Any,
) -> None:
    async with front_end("--upstream", upstream) as proxy:
        echo = (await http_client.get(proxy.url + "/echo")).json()
    assert echo_values(echo, "x-forwarded-for") == ["127.0.0.1"]
    assert echo_values(echo, "x-forwarded-host") == [authority(proxy.url)]
    assert echo_values(echo, "via") == ["1.1 trioproxy"]


async def test_request_id_is_generated_returned_and_forwarded(
    upstream: str,
    http_client: httpx.AsyncClient,
    front_end: Any,
) -> None:
    async with front_end("--upstream", upstream) as proxy:
        first = await http_client.get(proxy.url + "/echo")
        second = await http_client.get(proxy.url + "/echo")
        mine = await http_client.get(proxy.url + "/echo", headers={"X-Request-ID": "my-id-42"})
    ids = []
    for response in (first, second):
        returned = response.headers.get_list("x-request-id")
        assert len(returned) == 1 and REQUEST_ID.fullmatch(returned[0]), returned
        assert echo_values(response.json(), "x-request-id") == returned
        ids.append(returned[0])
    assert ids[0] != ids[1]
    assert mine.headers.get_list("x-request-id") == ["my-id-42"]
    assert echo_values(mine.json(), "x-request-id") == ["my-id-42"]


async def test_set_cookie_and_cache_control_pass_unchanged(
    upstream: str,
    raw_connect: Any,
    parser: str,
    front_end: Any,
) -> None:
    async with front_end("--http", parser, "--upstream", upstream) as proxy:
        conn = await raw_connect(proxy)
        await conn.send(b"GET /cookies HTTP/1.1\r\nHost: proxy\r\n\r\n")
        response = await conn.read_response()
    assert response.get_all("set-cookie") == ["a=1", "b=2", "c=3"]
    assert response.get_all("cache-control") == ["no-cache, private"]


async def test_content_encoding_is_not_decoded(
    canned_upstream: Any,
    raw_connect: Any,
    parser: str,
    front_end: Any,
) -> None:
    compressed = gzip.compress(b"hello, compressed world\n" * 200, mtime=0)
    canned = await canned_upstream(
        b"HTTP/1.1 200 OK\r\n"
        b"Content-Type: text/plain\r\n"
        b"Content-Encoding: gzip\r\n"
        b"Cache-Control: public, max-age=60, no-transform\r\n"
        b"Vary: Accept-Encoding\r\n"
        b"Content-Length: %d\r\n\r\n" % len(compressed) + compressed
    )
    async with front_end("--http", parser, "--upstream", canned.url) as proxy:
        conn = await raw_connect(proxy)
        await conn.send(b"GET /text HTTP/1.1\r\nHost: proxy\r\nAccept-Encoding: gzip\r\n\r\n")
        response = await conn.read_response()
    assert response.status == 200
    assert response.body == compressed
    assert response.get_all("content-encoding") == ["gzip"]
    assert response.get_all("content-length") == [str(len(compressed))]
    assert response.get_all("cache-control") == ["public, max-age=60, no-transform"]
    assert b"\r\naccept-encoding: gzip\r\n" in canned.heads[0].lower()


# --- configuration -------------------------------------------------------------------


async def test_host_header_default_and_preserved(
    upstream: str, raw_connect: Any, front_end: Any
) -> None:
    request = b"GET /echo HTTP/1.1\r\nHost: public.example:8443\r\n\r\n"
    async with front_end("--upstream", upstream) as proxy:
        conn = await raw_connect(proxy)
        await conn.send(request)
        default = (await conn.read_response()).json()
    async with front_end("--upstream", upstream, "--preserve-host") as proxy:
        conn = await raw_connect(proxy)
        await conn.send(request)
        preserved = (await conn.read_response()).json()
    assert echo_values(default, "host") == [authority(upstream)]
    assert echo_values(preserved, "host") == ["public.example:8443"]


@pytest.mark.parametrize("prefix", ["/echo", "/echo/"])
async def test_upstream_path_prefix(
    upstream: str, raw_connect: Any, prefix: str, front_end: Any
) -> None:
    async with front_end("--upstream", upstream + prefix) as proxy:
        conn = await raw_connect(proxy)
        targets = []
        for target in (b"/a/b?q=1&q=2", b"/"):
            await conn.send(b"GET %s HTTP/1.1\r\nHost: proxy\r\n\r\n" % target)
            targets.append((await conn.read_response()).json()["target"])
    assert targets == ["/echo/a/b?q=1&q=2", "/echo/"]


async def test_round_robin_over_several_upstreams(
    named_upstream: Callable[[str], Awaitable[str]],
    http_client: httpx.AsyncClient,
    front_end: Any,
) -> None:
    a, b = await named_upstream("A"), await named_upstream("B")
    async with front_end("--upstream", a, "--upstream", b) as proxy:
        names = [(await http_client.get(proxy.url + "/")).text for _ in range(6)]
    assert sorted(set(names)) == ["A", "B"]
    assert all(x != y for x, y in itertools.pairwise(names)), names


async def test_a_burst_of_300_clients_connecting_at_once_all_get_their_answers(
    upstream: str, parser: str
) -> None:
    """More than the acceptor takes in one pass (128) arrive at once: none is lost."""
    async with run_proxy("--http", parser, "--upstream", upstream) as proxy:
        clients = []
        try:
            for _ in range(300):
                sock = trio.socket.socket()
                clients.append(sock)
                await sock.connect((proxy.host, proxy.port))
            for index, sock in enumerate(clients):
                await sock.send(b"GET /echo/%d HTTP/1.1\r\nHost: burst\r\n\r\n" % index)

            async def read_answer(index: int, sock: trio.socket.SocketType) -> None:
                stream = trio.SocketStream(sock)
                buffer = b""
                while b"\r\n\r\n" not in buffer:
                    data = await stream.receive_some(65536)
                    assert data, f"client {index}: EOF before a response"
                    buffer += data
                head, _, body = buffer.partition(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200 "), head
                length = int(re.search(rb"(?i)content-length: *(\d+)", head)[1])  # type: ignore[index]
                while len(body) < length:
                    body += await stream.receive_some(65536)
                assert json.loads(body)["target"] == f"/echo/{index}"

            with trio.fail_after(20):
                async with trio.open_nursery() as nursery:
                    for index, sock in enumerate(clients):
                        nursery.start_soon(read_answer, index, sock)
        finally:
            for sock in clients:
                sock.close()
