from __future__ import annotations

import pytest

from trioproxy.http.headers import (
    HOP_BY_HOP,
    client_response_headers,
    comma_tokens,
    get_all,
    get_first,
    has_token,
    new_request_id,
    request_id_from,
    strip_hop_by_hop,
    upstream_request_headers,
)
from trioproxy.http.protocol import Headers

RID = b"0123456789abcdef0123456789abcdef"


def upstream(
    headers: Headers,
    *,
    client_addr: str = "10.0.0.9",
    scheme: str = "http",
    upstream_host: bytes = b"backend:8080",
    preserve_host: bool = False,
    request_id: bytes = RID,
    via: bytes = b"1.1 trioproxy",
) -> Headers:
    return upstream_request_headers(
        headers,
        client_addr=client_addr,
        scheme=scheme,
        upstream_host=upstream_host,
        preserve_host=preserve_host,
        request_id=request_id,
        via=via,
    )


def owned(
    *,
    xff: bytes = b"10.0.0.9",
    proto: bytes = b"http",
    xfh: bytes | None = b"example.com",
    via: bytes = b"1.1 trioproxy",
    rid: bytes = RID,
) -> Headers:
    """The fields upstream_request_headers appends after the passed-through ones."""
    tail: Headers = [(b"x-forwarded-for", xff), (b"x-forwarded-proto", proto)]
    if xfh is not None:
        tail.append((b"x-forwarded-host", xfh))
    tail += [(b"via", via), (b"x-request-id", rid)]
    return tail


# --- lookups -------------------------------------------------------------------


def test_hop_by_hop_set() -> None:
    assert HOP_BY_HOP == {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }


def test_get_first_and_get_all() -> None:
    headers = [(b"a", b"1"), (b"b", b"2"), (b"a", b"3")]
    assert get_first(headers, b"a") == b"1"
    assert get_first(headers, b"c") is None
    assert get_all(headers, b"a") == [b"1", b"3"]
    assert get_all(headers, b"c") == []


def test_comma_tokens_across_fields_case_whitespace_empties() -> None:
    headers = [
        (b"connection", b"Keep-Alive ,\tX-Foo"),
        (b"other", b"nope"),
        (b"connection", b",, CLOSE ,"),
        (b"connection", b""),
    ]
    assert comma_tokens(headers, b"connection") == [b"keep-alive", b"x-foo", b"close"]
    assert comma_tokens(headers, b"missing") == []


def test_has_token() -> None:
    headers = [(b"connection", b"keep-alive"), (b"connection", b" Upgrade ,close")]
    assert has_token(headers, b"connection", b"upgrade")
    assert has_token(headers, b"connection", b"close")
    assert not has_token(headers, b"connection", b"up")
    assert not has_token(headers, b"upgrade", b"close")


# --- strip_hop_by_hop ----------------------------------------------------------


def test_strip_fixed_set_without_connection() -> None:
    headers = [
        (b"keep-alive", b"timeout=5"),
        (b"accept", b"*/*"),
        (b"te", b"trailers"),
        (b"upgrade", b"h2c"),
        (b"proxy-connection", b"keep-alive"),
        (b"transfer-encoding", b"chunked"),
        (b"trailer", b"x-checksum"),
        (b"accept", b"text/html"),
    ]
    assert strip_hop_by_hop(headers) == [(b"accept", b"*/*"), (b"accept", b"text/html")]


def test_strip_removes_fields_named_by_connection() -> None:
    headers = [
        (b"x-foo", b"1"),
        (b"connection", b"close, X-Foo"),
        (b"x-bar", b"2"),
        (b"x-foo", b"3"),
    ]
    assert strip_hop_by_hop(headers) == [(b"x-bar", b"2")]


def test_strip_several_connection_fields_case_and_whitespace() -> None:
    headers = [
        (b"connection", b"  X-One  "),
        (b"x-one", b"a"),
        (b"x-two", b"b"),
        (b"x-three", b"c"),
        (b"connection", b"x-TWO,\tkeep-alive ,"),
        (b"keep-alive", b"timeout=5"),
    ]
    assert strip_hop_by_hop(headers) == [(b"x-three", b"c")]


def test_strip_keeps_framing_and_host_a_connection_option_names() -> None:
    # RFC 9110 §7.6.1: these are never connection options; obeying one would drop
    # the body's length (or the authority) from the forwarded message.
    headers = [
        (b"host", b"example.com"),
        (b"content-length", b"64"),
        (b"connection", b"Content-Length, HOST, transfer-encoding, X-Foo"),
        (b"x-foo", b"1"),
    ]
    assert strip_hop_by_hop(headers) == [(b"host", b"example.com"), (b"content-length", b"64")]


def test_strip_extra_and_input_untouched() -> None:
    headers = [(b"expect", b"100-continue"), (b"te", b"trailers"), (b"a", b"1")]
    before = list(headers)
    assert strip_hop_by_hop(headers, frozenset({b"expect"})) == [(b"a", b"1")]
    assert strip_hop_by_hop(headers) == [(b"expect", b"100-continue"), (b"a", b"1")]
    assert headers == before


# --- request ids ---------------------------------------------------------------


def test_new_request_id_is_32_lowercase_hex() -> None:
    first, second = new_request_id(), new_request_id()
    assert isinstance(first, bytes)
    assert len(first) == 32
    assert all(c in b"0123456789abcdef" for c in first)
    assert first != second


@pytest.mark.parametrize(
    "value",
    [b"a", b"req-42_abc.DEF:~!", b"x" * 200, bytes(range(0x21, 0x7F))],
)
def test_request_id_accepted(value: bytes) -> None:
    assert request_id_from([(b"accept", b"*/*"), (b"x-request-id", value)]) == value


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"x" * 201,
        b"abc def",
        b"abc\tdef",
        b"abc\r\nx-evil: 1",
        b"abc\x00",
        b"abc\x7f",
        b"caf\xc3\xa9",
    ],
)
def test_request_id_rejected(value: bytes) -> None:
    assert request_id_from([(b"x-request-id", value)]) is None


def test_request_id_absent_and_first_wins() -> None:
    assert request_id_from([(b"accept", b"*/*")]) is None
    assert request_id_from([(b"x-request-id", b"one"), (b"x-request-id", b"two")]) == b"one"


# --- upstream_request_headers --------------------------------------------------


def test_upstream_basic_host_rewritten_and_first() -> None:
    headers = [(b"accept", b"*/*"), (b"host", b"example.com"), (b"user-agent", b"t/1")]
    assert upstream(headers) == [
        (b"host", b"backend:8080"),
        (b"accept", b"*/*"),
        (b"user-agent", b"t/1"),
        *owned(),
    ]


def test_upstream_preserve_host() -> None:
    headers = [(b"accept", b"*/*"), (b"host", b"example.com")]
    assert upstream(headers, preserve_host=True) == [
        (b"host", b"example.com"),
        (b"accept", b"*/*"),
        *owned(),
    ]


def test_upstream_missing_host_http10() -> None:
    headers = [(b"accept", b"*/*")]
    expected = [(b"host", b"backend:8080"), (b"accept", b"*/*"), *owned(xfh=None)]
    assert upstream(headers) == expected
    # preserve_host has nothing to preserve: the upstream's host is used.
    assert upstream(headers, preserve_host=True) == expected


def test_upstream_duplicate_host_yields_one() -> None:
    headers = [(b"host", b"a.example"), (b"host", b"b.example")]
    assert upstream(headers, preserve_host=True) == [
        (b"host", b"a.example"),
        *owned(xfh=b"a.example"),
    ]


def test_upstream_strips_hop_by_hop_expect_and_connection_named() -> None:
    headers = [
        (b"host", b"example.com"),
        (b"connection", b"keep-alive, Upgrade, X-Secret"),
        (b"keep-alive", b"timeout=5"),
        (b"upgrade", b"websocket"),
        (b"te", b"trailers"),
        (b"x-secret", b"s"),
        (b"expect", b"100-continue"),
        (b"content-length", b"5"),
    ]
    assert upstream(headers) == [
        (b"host", b"backend:8080"),
        (b"content-length", b"5"),
        *owned(),
    ]


def test_upstream_xff_chain_extended_into_one_line() -> None:
    headers = [
        (b"host", b"example.com"),
        (b"x-forwarded-for", b"203.0.113.1, 198.51.100.2"),
        (b"accept", b"*/*"),
        (b"x-forwarded-for", b"192.0.2.3"),
    ]
    assert upstream(headers) == [
        (b"host", b"backend:8080"),
        (b"accept", b"*/*"),
        *owned(xff=b"203.0.113.1, 198.51.100.2, 192.0.2.3, 10.0.0.9"),
    ]


@pytest.mark.parametrize("addr", ["2001:db8::1", "[2001:db8::1]"])
def test_upstream_ipv6_client_written_bare(addr: str) -> None:
    headers = [(b"host", b"example.com"), (b"x-forwarded-for", b"192.0.2.3")]
    assert upstream(headers, client_addr=addr) == [
        (b"host", b"backend:8080"),
        *owned(xff=b"192.0.2.3, 2001:db8::1"),
    ]


def test_upstream_replaces_proto_host_request_id_and_extends_via() -> None:
    headers = [
        (b"host", b"example.com"),
        (b"x-forwarded-proto", b"http"),
        (b"via", b"1.0 edge"),
        (b"x-forwarded-host", b"spoofed.example"),
        (b"x-request-id", b"client-id"),
        (b"via", b"1.1 lb, 1.1 cdn"),
    ]
    assert upstream(headers, scheme="https", via=b"1.0 trioproxy") == [
        (b"host", b"backend:8080"),
        *owned(proto=b"https", via=b"1.0 edge, 1.1 lb, 1.1 cdn, 1.0 trioproxy"),
    ]


def test_upstream_connection_cannot_hide_client_addr() -> None:
    # Naming X-Forwarded-For drops the prior chain, but the client's own address
    # is always written (cf. CVE-2022-31813).
    headers = [
        (b"host", b"example.com"),
        (b"x-forwarded-for", b"127.0.0.1"),
        (b"connection", b"close, X-Forwarded-For, Host"),
    ]
    assert upstream(headers) == [(b"host", b"backend:8080"), *owned()]


def test_upstream_keeps_content_length_a_connection_option_names() -> None:
    headers = [
        (b"host", b"example.com"),
        (b"content-length", b"64"),
        (b"connection", b"Content-Length, X-Foo"),
        (b"x-foo", b"1"),
    ]
    assert upstream(headers) == [
        (b"host", b"backend:8080"),
        (b"content-length", b"64"),
        *owned(),
    ]


def test_upstream_passes_end_to_end_fields_untouched_in_order() -> None:
    headers = [
        (b"cookie", b"a=1"),
        (b"host", b"example.com"),
        (b"authorization", b"Bearer t0k3n"),
        (b"cache-control", b"no-cache, max-age=0"),
        (b"content-length", b"12"),
        (b"content-encoding", b"gzip"),
        (b"cookie", b"b=2"),
        (b"accept", b"text/html"),
        (b"accept", b"*/*;q=0.1"),
    ]
    before = list(headers)
    assert upstream(headers) == [
        (b"host", b"backend:8080"),
        (b"cookie", b"a=1"),
        (b"authorization", b"Bearer t0k3n"),
        (b"cache-control", b"no-cache, max-age=0"),
        (b"content-length", b"12"),
        (b"content-encoding", b"gzip"),
        (b"cookie", b"b=2"),
        (b"accept", b"text/html"),
        (b"accept", b"*/*;q=0.1"),
        *owned(),
    ]
    assert headers == before


# --- client_response_headers ---------------------------------------------------


def test_response_set_cookie_and_entity_fields_untouched() -> None:
    headers = [
        (b"content-type", b"text/html"),
        (b"set-cookie", b"a=1; Path=/; Expires=Wed, 21 Oct 2037 07:28:00 GMT"),
        (b"cache-control", b"private, max-age=60"),
        (b"set-cookie", b"b=2; HttpOnly"),
        (b"content-encoding", b"br"),
        (b"content-length", b"42"),
        (b"set-cookie", b"c=3"),
    ]
    assert client_response_headers(headers, request_id=RID) == [
        *headers,
        (b"via", b"1.1 trioproxy"),
        (b"x-request-id", RID),
    ]


def test_response_strips_hop_by_hop_and_connection_named() -> None:
    headers = [
        (b"connection", b"keep-alive, X-Internal"),
        (b"keep-alive", b"timeout=5, max=100"),
        (b"transfer-encoding", b"chunked"),
        (b"x-internal", b"debug"),
        (b"trailer", b"x-checksum"),
        (b"upgrade", b"h2c"),
        (b"content-type", b"text/plain"),
    ]
    assert client_response_headers(headers, request_id=RID) == [
        (b"content-type", b"text/plain"),
        (b"via", b"1.1 trioproxy"),
        (b"x-request-id", RID),
    ]


def test_response_keeps_content_length_a_connection_option_names() -> None:
    headers = [
        (b"connection", b"content-length, transfer-encoding"),
        (b"content-length", b"5"),
        (b"content-type", b"text/plain"),
    ]
    assert client_response_headers(headers, request_id=RID) == [
        (b"content-length", b"5"),
        (b"content-type", b"text/plain"),
        (b"via", b"1.1 trioproxy"),
        (b"x-request-id", RID),
    ]


def test_response_extends_via_and_replaces_request_id() -> None:
    headers = [
        (b"via", b"1.1 app"),
        (b"x-request-id", b"upstream-made-this-up"),
        (b"content-length", b"0"),
        (b"via", b"1.0 sidecar"),
    ]
    assert client_response_headers(headers, request_id=RID, via=b"1.0 trioproxy") == [
        (b"content-length", b"0"),
        (b"via", b"1.1 app, 1.0 sidecar, 1.0 trioproxy"),
        (b"x-request-id", RID),
    ]


def test_reason_phrase_is_the_standard_one_or_empty() -> None:
    from trioproxy.http.headers import reason_phrase

    assert reason_phrase(200) == b"OK"
    assert reason_phrase(504) == b"Gateway Timeout"
    assert reason_phrase(299) == b""


def test_via_entry_names_the_version_received() -> None:
    from trioproxy.http.headers import via_entry

    assert via_entry(b"1.1") == b"1.1 trioproxy"
    assert via_entry(b"1.0") == b"1.0 trioproxy"
    assert via_entry(b"2") == b"2 trioproxy"
