"""The parser seam's contract (trioproxy/http/protocol.py), run against every implementation.

Each test takes ``server_factory`` or ``client_factory`` (``factory(max_head_size)``) and
never names an implementation: both fixtures follow ``implementation``, whose params list
them all. The refusals pin the framing rules that keep the proxy safe from request
smuggling (RFC 9112 §2.2, §5.2, §6.1, §6.3); h11 accepts some of them, so these tests
also pin its adapter's own checks (and the h11 minor version it was written against).

A bug that one implementation has can be marked with ``memory.known_bug``, a strict xfail
for that implementation only.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from trioproxy.errors import ProtocolError, UpstreamProtocolError
from trioproxy.http.h11_impl import H11Client, H11Server
from trioproxy.http.httptools_impl import HttptoolsClient, HttptoolsServer
from trioproxy.http.protocol import (
    CONNECTION_CLOSED,
    END_OF_MESSAGE,
    NEED_DATA,
    PAUSED,
    Body,
    ClientProtocol,
    Event,
    RequestHead,
    ResponseHead,
    ServerFactory,
    ServerProtocol,
    _Sentinel,
)

ClientFactory = Callable[[int], ClientProtocol]

SERVERS: dict[str, ServerFactory] = {"h11": H11Server, "httptools": HttptoolsServer}
CLIENTS: dict[str, ClientFactory] = {"h11": H11Client, "httptools": HttptoolsClient}


@pytest.fixture(params=sorted(SERVERS))
def implementation(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def server_factory(implementation: str) -> ServerFactory:
    """Builds a server-role protocol: ``factory(max_head_size)``."""
    return SERVERS[implementation]


@pytest.fixture
def client_factory(implementation: str) -> ClientFactory:
    """Builds a client-role protocol: ``factory(max_head_size)``."""
    return CLIENTS[implementation]


Proto = ServerProtocol | ClientProtocol


def events(protocol: Proto) -> list[Event | _Sentinel]:
    """``next_event()`` until it returns NEED_DATA or PAUSED (included), or the peer closed."""
    out: list[Event | _Sentinel] = []
    while True:
        event = protocol.next_event()
        out.append(event)
        if event is NEED_DATA or event is PAUSED or event is CONNECTION_CLOSED:
            return out


def feed(protocol: Proto, data: bytes) -> list[Event | _Sentinel]:
    protocol.receive_data(data)
    return events(protocol)


def ended(parsed: list[Event | _Sentinel]) -> bool:
    """The peer's message ended and nothing follows yet.

    What ``next_event`` says after the end of the peer's message, with nothing more
    received, is not pinned by the contract: h11 says NEED_DATA, httptools PAUSED.
    """
    return parsed[-2] is END_OF_MESSAGE and parsed[-1] in (NEED_DATA, PAUSED)


def body_of(parsed: list[Event | _Sentinel]) -> bytes:
    return b"".join(event.data for event in parsed if isinstance(event, Body))


def refusal(server_factory: ServerFactory, data: bytes, *, max_head_size: int = 65536) -> int:
    """Feed ``data``; the server must raise ProtocolError before yielding a request head."""
    server = server_factory(max_head_size)
    server.receive_data(data)
    with pytest.raises(ProtocolError) as caught:
        for _ in range(10):
            event = server.next_event()
            assert not isinstance(event, RequestHead), f"accepted: {event!r}"
            if event is NEED_DATA:
                break
    return caught.value.status


def answer(server: ServerProtocol, status: int = 200, body: bytes = b"") -> bytes:
    head = ResponseHead(status, [(b"content-length", str(len(body)).encode())])
    data = server.send_head(head)
    if body:
        data += server.send_body(body)
    return data + server.send_end()


GET = b"GET /a?b=1 HTTP/1.1\r\nHost: example.test\r\n\r\n"


# --- server role: what it accepts ------------------------------------------------------


def test_get(server_factory: ServerFactory) -> None:
    server = server_factory(65536)
    parsed = feed(server, GET)
    assert parsed[0] == RequestHead(b"GET", b"/a?b=1", [(b"host", b"example.test")], b"1.1")
    assert ended(parsed)
    assert len(parsed) == 3
    assert server.peer_done
    assert not server.our_done
    assert server.request_method == b"GET"


def test_header_names_lowercased_values_stripped_repeats_kept(
    server_factory: ServerFactory,
) -> None:
    data = (
        b"GET / HTTP/1.1\r\nHost: h\r\nX-Tag: one\r\nAccept:   text/plain  \r\n"
        b"x-tag: two\r\nX-TAG:three\r\n\r\n"
    )
    head = feed(server_factory(65536), data)[0]
    assert isinstance(head, RequestHead)
    assert head.headers == [
        (b"host", b"h"),
        (b"x-tag", b"one"),
        (b"accept", b"text/plain"),
        (b"x-tag", b"two"),
        (b"x-tag", b"three"),
    ]


def test_http_1_0_request(server_factory: ServerFactory) -> None:
    server = server_factory(65536)
    parsed = feed(server, b"GET / HTTP/1.0\r\n\r\n")
    assert parsed[0] == RequestHead(b"GET", b"/", [], b"1.0")
    assert parsed[1] is END_OF_MESSAGE
    # No Content-Length: an HTTP/1.0 peer gets a close-delimited body.
    out = server.send_head(ResponseHead(200, [])) + server.send_body(b"x") + server.send_end()
    assert b"transfer-encoding" not in out.lower()
    assert out.endswith(b"\r\n\r\nx")
    assert not server.reusable


def test_post_content_length_in_pieces(server_factory: ServerFactory) -> None:
    server = server_factory(65536)
    parsed = feed(server, b"POST /up HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n\r\nhel")
    assert isinstance(parsed[0], RequestHead)
    assert parsed[0].method == b"POST"
    assert not server.peer_done
    parsed += feed(server, b"lo wo")
    parsed += feed(server, b"rld")
    assert body_of(parsed) == b"hello world"
    assert ended(parsed)
    assert server.peer_done


def test_post_chunked(server_factory: ServerFactory) -> None:
    server = server_factory(65536)
    parsed = feed(
        server,
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n",
    )
    assert isinstance(parsed[0], RequestHead)
    assert (b"transfer-encoding", b"chunked") in parsed[0].headers
    assert body_of(parsed) == b"hello world"
    assert ended(parsed)


def test_chunked_with_trailer_fields(server_factory: ServerFactory) -> None:
    server = server_factory(65536)
    parsed = feed(
        server,
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\nX-Checksum: 1\r\n\r\n",
    )
    assert body_of(parsed) == b"abc"
    assert ended(parsed)


def test_valid_head_split_between_cr_and_lf(server_factory: ServerFactory) -> None:
    """A CRLF cut in two by the network is not a bare CR or a bare LF."""
    server = server_factory(65536)
    data = b"GET / HTTP/1.1\r\nHost: h\r\nX-A: 1\r\n\r\n"
    for i in range(len(data)):
        server.receive_data(data[i : i + 1])
        event = server.next_event()
        if i < len(data) - 1:
            assert event is NEED_DATA, (i, event)
    assert event == RequestHead(b"GET", b"/", [(b"host", b"h"), (b"x-a", b"1")], b"1.1")


def test_eof_between_requests_is_connection_closed(server_factory: ServerFactory) -> None:
    server = server_factory(65536)
    server.receive_data(b"")
    assert server.next_event() is CONNECTION_CLOSED


def test_eof_in_the_middle_of_a_head_is_an_error(server_factory: ServerFactory) -> None:
    server = server_factory(65536)
    server.receive_data(b"GET / HTTP/1.1\r\nHost:")
    assert server.next_event() is NEED_DATA
    server.receive_data(b"")
    with pytest.raises(ProtocolError) as caught:
        server.next_event()
    assert caught.value.status == 400


def test_pipelined_requests_pause_until_next_cycle(server_factory: ServerFactory) -> None:
    server = server_factory(65536)
    second = b"POST /two HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nhi"
    parsed = feed(server, GET + second)
    assert isinstance(parsed[0], RequestHead)
    assert parsed[0].target == b"/a?b=1"
    assert parsed[1:] == [END_OF_MESSAGE, PAUSED]
    # Still paused while our response is under way.
    assert server.next_event() is PAUSED
    server.send_head(ResponseHead(200, [(b"content-length", b"2")]))
    assert server.next_event() is PAUSED
    server.send_body(b"ok")
    server.send_end()
    assert server.our_done
    assert server.reusable
    assert server.next_event() is PAUSED
    server.start_next_cycle()
    parsed = events(server)
    assert isinstance(parsed[0], RequestHead)
    assert parsed[0].target == b"/two"
    assert body_of(parsed) == b"hi"
    assert ended(parsed)
    assert server.buffered == 0


def test_buffered_counts_a_pipelined_request_not_yet_delivered(
    server_factory: ServerFactory, implementation: str, request: pytest.FixtureRequest
) -> None:
    """The handler reads ``buffered > 0`` as "a request is waiting" (not idle, 408 if slow)."""
    server = server_factory(65536)
    feed(server, GET + GET)
    assert server.buffered > 0
    answer(server)
    assert server.buffered > 0
    server.start_next_cycle()
    assert isinstance(server.next_event(), RequestHead)


def test_keep_alive_cycle_and_connection_close(server_factory: ServerFactory) -> None:
    server = server_factory(65536)
    feed(server, GET)
    answer(server, 200, b"ok")
    assert server.reusable
    server.start_next_cycle()
    feed(server, b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    answer(server, 200, b"ok")
    assert server.our_done
    assert server.peer_done
    assert not server.reusable


def test_response_without_length_is_chunked_for_http_1_1(server_factory: ServerFactory) -> None:
    server = server_factory(65536)
    feed(server, GET)
    out = server.send_head(ResponseHead(200, [(b"x-a", b"1")], b"OK"))
    out += server.send_body(b"hello") + server.send_end()
    assert out.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"transfer-encoding: chunked\r\n" in out.lower()
    assert out.endswith(b"5\r\nhello\r\n0\r\n\r\n")
    assert server.reusable


def test_head_response_has_no_body(server_factory: ServerFactory) -> None:
    server = server_factory(65536)
    feed(server, b"HEAD / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert server.request_method == b"HEAD"
    out = server.send_head(ResponseHead(200, [(b"content-length", b"5")])) + server.send_end()
    assert out.endswith(b"\r\n\r\n")
    assert b"content-length: 5" in out.lower()
    assert server.reusable


def test_expect_100_continue(
    server_factory: ServerFactory, implementation: str, request: pytest.FixtureRequest
) -> None:
    server = server_factory(65536)
    feed(
        server,
        b"PUT / HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n",
    )
    assert server.client_is_waiting_for_100_continue
    out = server.send_informational(ResponseHead(100, []))
    assert out.startswith(b"HTTP/1.1 100 ")
    assert not server.client_is_waiting_for_100_continue
    parsed = feed(server, b"ok")
    assert body_of(parsed) == b"ok"
    assert parsed[-2] is END_OF_MESSAGE


def test_options_asterisk_and_absolute_form_are_parsed(server_factory: ServerFactory) -> None:
    """Judging the request-target is the handler's job, not the seam's."""
    head = feed(server_factory(65536), b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n")[0]
    assert isinstance(head, RequestHead)
    assert head.target == b"*"
    head = feed(server_factory(65536), b"GET http://h/x HTTP/1.1\r\nHost: h\r\n\r\n")[0]
    assert isinstance(head, RequestHead)
    assert head.target == b"http://h/x"


# --- server role: what it refuses ------------------------------------------------------

POST = b"POST / HTTP/1.1\r\nHost: h\r\n"

REFUSED: dict[str, tuple[bytes, int | set[int]]] = {
    # Found by tests/e2e/test_fuzz.py: the two parsers must refuse these alike.
    # RFC 9110 §9.1: a method neither parser knows is 501 (llhttp's list is the rule).
    "extension-method": (b"POT / HTTP/1.1\r\nHost: example.test\r\n\r\n", 501),
    # RFC 9110 §5.5: no control character but HTAB in a field value.
    "del-in-field-value": (b"GET / HTTP/1.1\r\nHost: h\r\nX-Note: a\x7fb\r\n\r\n", 400),
    "soh-in-field-value": (b"GET / HTTP/1.1\r\nHost: h\r\nX-Note: a\x01b\r\n\r\n", 400),
    # The contract's 505, also where llhttp itself refuses the version.
    "http-1-9": (b"GET / HTTP/1.9\r\nHost: example.test\r\n\r\n", 505),
    # Not a request line at all (a TLS ClientHello's first bytes): 400, not 501.
    "tls-client-hello": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 x\r\n\r\n", 400),
    # RFC 9112 §6.3 item 3: both framings at once is how requests are smuggled.
    "cl-then-te": (POST + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    "te-then-cl": (POST + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n", 400),
    "cl-and-te-with-body": (
        POST + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    # §6.3 item 5: differing Content-Length values.
    "two-content-lengths": (POST + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\n", 400),
    "content-length-list": (POST + b"Content-Length: 5, 6\r\n\r\n", 400),
    # Equal repeats are refused too (§6.3 item 5 allows either; llhttp and nginx refuse).
    "same-content-length-twice": (
        POST + b"Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
        400,
    ),
    "same-content-length-listed": (POST + b"Content-Length: 3, 3\r\n\r\nabc", 400),
    "content-length-not-a-number": (POST + b"Content-Length: 5x\r\n\r\n", 400),
    "content-length-negative": (POST + b"Content-Length: -1\r\n\r\n", 400),
    # §6.1: only a single `chunked`.
    "te-gzip": (POST + b"Transfer-Encoding: gzip\r\n\r\n", 501),
    "te-gzip-chunked": (POST + b"Transfer-Encoding: gzip, chunked\r\n\r\n", 501),
    "te-identity": (POST + b"Transfer-Encoding: identity\r\n\r\n", 501),
    # Chunked twice: not supported (501), or malformed since §6.1 forbids it (400).
    "te-twice": (
        POST + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
        {400, 501},
    ),
    # §5.2: obs-fold.
    "obs-fold-space": (b"GET / HTTP/1.1\r\nHost: h\r\nX-A: 1\r\n 2\r\n\r\n", 400),
    "obs-fold-tab": (b"GET / HTTP/1.1\r\nHost: h\r\nX-A: 1\r\n\t2\r\n\r\n", 400),
    # §2.2: bare LF / bare CR line ends.
    "bare-lf": (b"GET / HTTP/1.1\nHost: h\n\n", 400),
    "bare-lf-request-line": (b"GET / HTTP/1.1\nHost: h\r\n\r\n", 400),
    "bare-lf-one-field": (b"GET / HTTP/1.1\r\nHost: h\nX-A: 1\r\n\r\n", 400),
    "bare-lf-end-of-head": (b"GET / HTTP/1.1\r\nHost: h\r\n\n", 400),
    "bare-cr": (b"GET / HTTP/1.1\r\nHost: h\rX-A: 1\r\n\r\n", 400),
    "bare-cr-in-value": (b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\rb\r\n\r\n", 400),
    # Plain syntax errors.
    "space-before-colon": (b"GET / HTTP/1.1\r\nHost : h\r\n\r\n", 400),
    "no-colon": (b"GET / HTTP/1.1\r\nHost h\r\n\r\n", 400),
    "bad-request-line": (b"GET /\r\nHost: h\r\n\r\n", 400),
    # HTTP/0.9: the line alone is all such a client sends; refused without waiting
    # for a head that will never end.
    "http-0-9-line-only": (b"GET /path\r\n", 400),
    "http-1-1-without-host": (b"GET / HTTP/1.1\r\n\r\n", 400),
}


@pytest.mark.parametrize("name", REFUSED)
def test_refused(
    server_factory: ServerFactory, implementation: str, request: pytest.FixtureRequest, name: str
) -> None:
    data, status = REFUSED[name]
    statuses = status if isinstance(status, set) else {status}
    assert refusal(server_factory, data) in statuses


@pytest.mark.parametrize("name", REFUSED)
def test_a_refusal_is_final(
    server_factory: ServerFactory, implementation: str, request: pytest.FixtureRequest, name: str
) -> None:
    """After ProtocolError no later call yields a body or an end of message for that request."""
    data = REFUSED[name][0]
    server = server_factory(65536)
    server.receive_data(data + b"0\r\n\r\n")
    with pytest.raises(ProtocolError):
        for _ in range(10):
            server.next_event()
    for _ in range(3):
        with pytest.raises(ProtocolError):
            server.next_event()
    assert not server.peer_done


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\nHost: h\nX-A: 1\n\n",
        b"GET / HTTP/1.1\r\nHost: h\nX-A: 1\n\n",
        b"GET / HTTP/1.1\r\nHost: h\r\nX-A: 1\r\n 2\r\n\r\n",
    ],
    ids=["lf-only", "lf-after-first-line", "obs-fold"],
)
@pytest.mark.parametrize("piece", [1, 2, 3, 7])
def test_refused_when_the_head_arrives_in_pieces(
    server_factory: ServerFactory, data: bytes, piece: int
) -> None:
    server = server_factory(65536)
    with pytest.raises(ProtocolError) as caught:
        for i in range(0, len(data), piece):
            server.receive_data(data[i : i + piece])
            event = server.next_event()
            assert event is NEED_DATA, f"accepted: {event!r}"
    assert caught.value.status == 400


@pytest.mark.parametrize("piece", [1, 3, 11])
def test_an_http09_line_is_refused_once_it_is_whole(
    server_factory: ServerFactory, piece: int
) -> None:
    data = b"GET /path\r\n"
    pieces = [data[i : i + piece] for i in range(0, len(data), piece)]
    server = server_factory(65536)
    for part in pieces[:-1]:
        server.receive_data(part)
        assert server.next_event() is NEED_DATA
    server.receive_data(pieces[-1])
    with pytest.raises(ProtocolError) as caught:
        server.next_event()
    assert caught.value.status == 400


def test_an_http09_line_after_a_keep_alive_request_is_refused(
    server_factory: ServerFactory,
) -> None:
    server = server_factory(65536)
    parsed = feed(server, b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n")
    assert isinstance(parsed[0], RequestHead) and ended(parsed)
    answer(server)
    server.start_next_cycle()
    server.receive_data(b"GET /b\r\n")
    with pytest.raises(ProtocolError) as caught:
        server.next_event()
    assert caught.value.status == 400


@pytest.mark.parametrize(
    "line", [b"GET /path HTTP/1.1\r\n", b"GET /path HTTP/1.1\r\nHost: h\r\n", b"GET /pa"]
)
def test_an_incomplete_head_with_a_version_is_awaited(
    server_factory: ServerFactory, line: bytes
) -> None:
    assert feed(server_factory(65536), line) == [NEED_DATA]


def test_smuggled_request_is_not_parsed(server_factory: ServerFactory) -> None:
    """The classic CL.TE attack: refused before any byte of the smuggled request counts."""
    smuggle = (
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 44\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\nGET /admin HTTP/1.1\r\nHost: h\r\n\r\n"
    )
    assert refusal(server_factory, smuggle) == 400


def test_incomplete_head_over_max_head_size(server_factory: ServerFactory) -> None:
    big = b"GET / HTTP/1.1\r\nHost: h\r\nX-Big: " + b"a" * 2000
    assert refusal(server_factory, big, max_head_size=1024) == 431


def test_complete_head_over_max_head_size(server_factory: ServerFactory) -> None:
    big = b"GET / HTTP/1.1\r\nHost: h\r\nX-Big: " + b"a" * 2000 + b"\r\n\r\n"
    assert refusal(server_factory, big, max_head_size=1024) == 431


def test_head_over_max_head_size_in_reads_of_that_size(server_factory: ServerFactory) -> None:
    """What the handler does: reads of 64 KiB, limit 64 KiB, a 100 KB head."""
    limit = 65536
    big = b"GET / HTTP/1.1\r\nHost: h\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n"
    server = server_factory(limit)
    with pytest.raises(ProtocolError) as caught:
        for i in range(0, len(big), limit):
            server.receive_data(big[i : i + limit])
            event = server.next_event()
            assert not isinstance(event, RequestHead), "a 100 KB head was accepted"
    assert caught.value.status == 431


def test_head_under_max_head_size_accepted(server_factory: ServerFactory) -> None:
    head = b"GET / HTTP/1.1\r\nHost: h\r\nX-Big: " + b"a" * 900 + b"\r\n\r\n"
    assert isinstance(feed(server_factory(1024), head)[0], RequestHead)


def test_refusal_reason_does_not_echo_the_request(server_factory: ServerFactory) -> None:
    """The client-facing ``reason`` is fixed text, never a quote of its input."""
    secret = b"<script>s3cret</script>"
    server = server_factory(65536)
    server.receive_data(b"GET / HTTP/1.1\r\nHost: h\r\n" + secret + b"\r\n\r\n")
    with pytest.raises(ProtocolError) as caught:
        server.next_event()
    assert caught.value.status == 400
    assert "s3cret" not in caught.value.reason


def test_an_error_response_can_follow_a_refusal(server_factory: ServerFactory) -> None:
    """After ProtocolError the handler still answers 400 on the same protocol object."""
    server = server_factory(65536)
    server.receive_data(b"GET / HTTP/1.1\nHost: h\n\n")
    with pytest.raises(ProtocolError):
        server.next_event()
    out = answer(server, 400, b"bad")
    assert out.startswith(b"HTTP/1.1 400 ")
    assert out.endswith(b"bad")


# --- client role -----------------------------------------------------------------------


def request_bytes(client: ClientProtocol, method: bytes = b"GET") -> bytes:
    return client.send_head(RequestHead(method, b"/", [(b"host", b"up.test")])) + client.send_end()


def test_client_writes_a_request(client_factory: ClientFactory) -> None:
    client = client_factory(65536)
    out = client.send_head(
        RequestHead(b"POST", b"/x?y", [(b"host", b"up.test"), (b"content-length", b"2")])
    )
    out += client.send_body(b"hi") + client.send_end()
    assert out.startswith(b"POST /x?y HTTP/1.1\r\n")
    assert b"\r\nhost: up.test\r\n" in out.lower()
    assert out.endswith(b"\r\n\r\nhi")
    assert client.our_done


def test_client_parses_a_response(client_factory: ClientFactory) -> None:
    client = client_factory(65536)
    request_bytes(client)
    parsed = feed(
        client,
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n\r\nhello",
    )
    assert parsed[0] == ResponseHead(
        200,
        [(b"content-length", b"5"), (b"set-cookie", b"a=1"), (b"set-cookie", b"b=2")],
        b"OK",
        b"1.1",
    )
    assert body_of(parsed) == b"hello"
    assert ended(parsed)
    assert client.reusable


def test_client_parses_a_chunked_response_in_pieces(client_factory: ClientFactory) -> None:
    client = client_factory(65536)
    request_bytes(client)
    data = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    parsed: list[Event | _Sentinel] = []
    for i in range(0, len(data), 4):
        parsed += feed(client, data[i : i + 4])
    parsed = [event for event in parsed if event is not NEED_DATA and event is not PAUSED]
    assert isinstance(parsed[0], ResponseHead)
    assert body_of(parsed) == b"hello"
    assert parsed[-1] is END_OF_MESSAGE
    assert client.reusable


def test_client_skips_100_continue(client_factory: ClientFactory) -> None:
    client = client_factory(65536)
    request_bytes(client)
    parsed = feed(
        client, b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"
    )
    assert isinstance(parsed[0], ResponseHead)
    assert parsed[0].status_code == 201


def test_client_head_response_has_no_body(client_factory: ClientFactory) -> None:
    client = client_factory(65536)
    request_bytes(client, b"HEAD")
    parsed = feed(client, b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
    assert isinstance(parsed[0], ResponseHead)
    assert len(parsed) == 3
    assert ended(parsed)
    assert client.reusable


@pytest.mark.parametrize("status", [204, 304])
def test_client_bodiless_status(client_factory: ClientFactory, status: int) -> None:
    client = client_factory(65536)
    request_bytes(client)
    parsed = feed(client, f"HTTP/1.1 {status} X\r\n\r\n".encode())
    assert isinstance(parsed[0], ResponseHead)
    assert len(parsed) == 3
    assert ended(parsed)


def test_client_close_delimited_response(client_factory: ClientFactory) -> None:
    client = client_factory(65536)
    request_bytes(client)
    parsed = feed(client, b"HTTP/1.1 200 OK\r\n\r\nall of it")
    assert body_of(parsed) == b"all of it"
    assert END_OF_MESSAGE not in parsed
    parsed = feed(client, b"")
    assert parsed[0] is END_OF_MESSAGE
    assert not client.reusable


def test_client_connection_close_is_not_reusable(client_factory: ClientFactory) -> None:
    client = client_factory(65536)
    request_bytes(client)
    feed(client, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    assert client.peer_done
    assert not client.reusable


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
    ],
    ids=["content-length", "chunked-between-chunks", "chunked-inside-a-chunk"],
)
def test_client_eof_mid_body(client_factory: ClientFactory, data: bytes) -> None:
    client = client_factory(65536)
    request_bytes(client)
    parsed = feed(client, data)
    assert END_OF_MESSAGE not in parsed
    client.receive_data(b"")
    with pytest.raises(UpstreamProtocolError):
        events(client)
    assert not client.reusable


def test_client_eof_mid_head(client_factory: ClientFactory) -> None:
    client = client_factory(65536)
    request_bytes(client)
    feed(client, b"HTTP/1.1 200 OK\r\nContent-")
    client.receive_data(b"")
    with pytest.raises(UpstreamProtocolError):
        client.next_event()


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-A: 1\r\n 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.1 2OO OK\r\n\r\n",
        b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
    ],
    ids=["bare-lf", "obs-fold", "two-content-lengths", "bad-status", "not-http"],
)
def test_client_refuses_an_invalid_response(client_factory: ClientFactory, data: bytes) -> None:
    client = client_factory(65536)
    request_bytes(client)
    client.receive_data(data)
    with pytest.raises(UpstreamProtocolError) as caught:
        events(client)
    assert caught.value.status == 502


def test_client_head_over_max_head_size(
    client_factory: ClientFactory, implementation: str, request: pytest.FixtureRequest
) -> None:
    client = client_factory(1024)
    request_bytes(client)
    client.receive_data(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 2000 + b"\r\n\r\n")
    with pytest.raises(UpstreamProtocolError):
        events(client)


def test_client_incomplete_head_over_max_head_size(client_factory: ClientFactory) -> None:
    client = client_factory(1024)
    request_bytes(client)
    client.receive_data(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 2000)
    with pytest.raises(UpstreamProtocolError):
        events(client)


# --- large bodies of known length, in reads of every shape ----------------------------
#
# The httptools implementation passes the rest of such a body on without llhttp
# (``PASS_THROUGH_MIN``); these pin that it keeps the contract where that path
# starts and ends: in the middle of a read, at a read's end, with the next message
# behind it in the same read, and at EOF.

BIG = bytes(range(256)) * 400  # 102400 bytes, each position telling where it was


def _pieces(data: bytes, sizes: list[int]) -> list[bytes]:
    out, at = [], 0
    for size in sizes:
        if at < len(data):  # (an empty read would be EOF)
            out.append(data[at : at + size])
        at += size
    if at < len(data):
        out.append(data[at:])
    return out


READ_SHAPES = {
    "head-alone": [],  # (these two are cut by the head's length: see _reads)
    "head-and-some-body": [],
    "one-read": [10**9],
    "uneven": [7, 65536, 3, 40000],
    "64k-reads": [65536] * 4,
}


def _reads(head: bytes, body: bytes, tail: bytes, shape: str) -> list[bytes]:
    data = head + body + tail
    if shape == "head-alone":
        return _pieces(data, [len(head), 50000, 50000])
    if shape == "head-and-some-body":
        return _pieces(data, [len(head) + 100, len(body) - 100 - 17, 17 + len(tail)])
    return _pieces(data, READ_SHAPES[shape])


@pytest.mark.parametrize("shape", sorted(READ_SHAPES))
def test_large_upload_then_a_pipelined_request(server_factory: ServerFactory, shape: str) -> None:
    server = server_factory(65536)
    head = b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(BIG)
    parsed: list[Event | _Sentinel] = []
    for data in _reads(head, BIG, GET, shape):
        parsed += feed(server, data)
    parsed = [event for event in parsed if event is not NEED_DATA and event is not PAUSED]
    assert isinstance(parsed[0], RequestHead) and parsed[0].target == b"/up"
    assert body_of(parsed) == BIG
    assert parsed[-1] is END_OF_MESSAGE
    assert server.buffered  # the GET behind it waits for the next cycle
    server.send_head(ResponseHead(204, []))
    server.send_end()
    server.start_next_cycle()
    after = events(server)
    assert isinstance(after[0], RequestHead) and after[0].target == b"/a?b=1"
    assert ended(after)


@pytest.mark.parametrize("shape", sorted(READ_SHAPES))
def test_large_response_then_the_connection_is_reused(
    client_factory: ClientFactory, shape: str
) -> None:
    client = client_factory(65536)
    request_bytes(client)
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BIG)
    parsed: list[Event | _Sentinel] = []
    for data in _reads(head, BIG, b"", shape):
        parsed += feed(client, data)
    parsed = [event for event in parsed if event is not NEED_DATA and event is not PAUSED]
    assert isinstance(parsed[0], ResponseHead)
    assert body_of(parsed) == BIG
    assert parsed[-1] is END_OF_MESSAGE
    assert client.reusable
    client.start_next_cycle()
    request_bytes(client)
    again = feed(client, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert isinstance(again[0], ResponseHead) and body_of(again) == b"ok" and ended(again)
    assert client.reusable


def test_large_response_with_connection_close_is_not_reusable(
    client_factory: ClientFactory,
) -> None:
    client = client_factory(65536)
    request_bytes(client)
    head = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(BIG)
    parsed = feed(client, head)
    parsed += feed(client, BIG)
    assert body_of(parsed) == BIG and END_OF_MESSAGE in parsed
    assert client.peer_done and not client.reusable


def test_large_response_cut_short_is_an_error(client_factory: ClientFactory) -> None:
    client = client_factory(65536)
    request_bytes(client)
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BIG)
    parsed = feed(client, head + BIG[:100]) + feed(client, BIG[100:-1])
    assert body_of(parsed) == BIG[:-1] and END_OF_MESSAGE not in parsed
    client.receive_data(b"")
    with pytest.raises(UpstreamProtocolError):
        events(client)
    assert not client.reusable


def test_large_upload_cut_short_is_an_error(server_factory: ServerFactory) -> None:
    server = server_factory(65536)
    head = b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(BIG)
    parsed = feed(server, head) + feed(server, BIG[:-1])
    assert body_of(parsed) == BIG[:-1]
    server.receive_data(b"")
    with pytest.raises(ProtocolError):
        events(server)


@pytest.mark.parametrize("size", [5, len(BIG)])
@pytest.mark.parametrize("split", [False, True])
def test_an_upgrade_request_with_a_body_ends_after_its_body(
    server_factory: ServerFactory, size: int, split: bool
) -> None:
    """RFC 9110 §7.8: a request's body comes before any switch. (llhttp alone ends
    such a request at its head and takes its body for the new protocol's bytes.)"""
    server = server_factory(65536)
    body = BIG[:size]
    head = (
        b"POST /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: x\r\n"
        b"Content-Length: %d\r\n\r\n" % size
    )
    data = head + body + b"new protocol"
    reads = [data[: len(head) + 3], data[len(head) + 3 :]] if split else [data]
    parsed: list[Event | _Sentinel] = []
    for read in reads:
        parsed += feed(server, read)
    assert body_of(parsed) == body and END_OF_MESSAGE in parsed
    assert server.trailing_data() == b"new protocol"
    # Not switched: what followed is parsed as the next request (not a valid one).
    server.send_head(ResponseHead(200, [(b"content-length", b"0")]))
    server.send_end()
    server.start_next_cycle()
    try:
        after = events(server)
    except ProtocolError:
        after = []
    assert not any(isinstance(event, RequestHead) for event in after)


def test_an_upgrade_request_with_a_body_then_a_pipelined_request(
    server_factory: ServerFactory,
) -> None:
    server = server_factory(65536)
    head = (
        b"POST /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: x\r\n"
        b"Content-Length: 5\r\n\r\n"
    )
    parsed = feed(server, head + b"hello" + GET)
    assert body_of(parsed) == b"hello" and END_OF_MESSAGE in parsed
    server.send_head(ResponseHead(200, [(b"content-length", b"0")]))
    server.send_end()
    server.start_next_cycle()
    after = events(server)
    assert isinstance(after[0], RequestHead) and after[0].target == b"/a?b=1"


def test_httptools_passes_the_reads_of_a_large_body_on_uncopied() -> None:
    client = HttptoolsClient(65536)
    request_bytes(client)
    feed(client, b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BIG) + BIG[:10])
    middle = BIG[10:60000]
    parsed = feed(client, middle)
    assert next(event for event in parsed if isinstance(event, Body)).data is middle


def test_httptools_refuses_an_upgrade_request_with_a_chunked_body() -> None:
    """llhttp cannot parse it (it stops at the head); refused, never held open."""
    server = HttptoolsServer(65536)
    server.receive_data(
        b"POST /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: x\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    )
    with pytest.raises(ProtocolError) as caught:
        server.next_event()  # not its head first: it would go upstream without its body
    assert caught.value.status == 400
