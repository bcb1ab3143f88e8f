"""The sans-I/O parts of the ASGI front end: the request head made from a scope."""

from __future__ import annotations

from typing import Any

from trioproxy.asgi.http import declares_body, request_head, scope_headers, scope_target
from trioproxy.http.protocol import RequestHead


def scope(**values: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "type": "http",
        "http_version": "1.1",
        "method": "GET",
        "path": "/a/b",
        "raw_path": b"/a%2Fb/../c",
        "query_string": b"",
        "headers": [],
        "scheme": "http",
        "client": ("127.0.0.1", 5000),
    }
    base.update(values)
    return base


def test_target_is_raw_path_and_query_byte_for_byte() -> None:
    assert scope_target(scope()) == b"/a%2Fb/../c"
    assert scope_target(scope(query_string=b"x=1&x=%20")) == b"/a%2Fb/../c?x=1&x=%20"
    # A server that gives no raw_path: the decoded path, encoded.
    assert scope_target(scope(raw_path=None, path="/é")) == "/é".encode()


def test_repeated_fields_keep_their_order_and_names_are_lowercased() -> None:
    headers = [(b"X-A", b"1"), (b"set-cookie", b"a"), (b"x-a", b"2"), (b"Cookie", b"c=1")]
    assert scope_headers(scope(headers=headers)) == [
        (b"x-a", b"1"),
        (b"set-cookie", b"a"),
        (b"x-a", b"2"),
        (b"cookie", b"c=1"),
    ]


def test_http2_cookie_fields_are_joined_where_the_first_was() -> None:
    """RFC 9113 §8.2.3: an HTTP/2 client may split Cookie; HTTP/1.1 wants one line."""
    headers = [(b"cookie", b"a=1"), (b"x", b"y"), (b"cookie", b"b=2"), (b"cookie", b"c=3")]
    assert scope_headers(scope(http_version="2", headers=headers)) == [
        (b"cookie", b"a=1; b=2; c=3"),
        (b"x", b"y"),
    ]
    # HTTP/1.1 fields are passed as they came (a second Cookie line is the client's).
    assert scope_headers(scope(headers=headers)) == headers


def test_request_head() -> None:
    head = request_head(scope(method="POST", query_string=b"q", headers=[(b"host", b"h")]))
    assert head == RequestHead(b"POST", b"/a%2Fb/../c?q", [(b"host", b"h")], b"1.1")


def test_whether_a_body_follows() -> None:
    def says(version: bytes, *headers: tuple[bytes, bytes]) -> bool | None:
        return declares_body(RequestHead(b"POST", b"/", list(headers), version))

    assert says(b"1.1") is False
    assert says(b"1.1", (b"content-length", b"0")) is False
    assert says(b"1.1", (b"content-length", b"3")) is True
    assert says(b"1.1", (b"transfer-encoding", b"chunked")) is True
    assert says(b"2", (b"content-length", b"0")) is False
    # HTTP/2 frames its body without either field: only the messages can tell.
    assert says(b"2") is None
