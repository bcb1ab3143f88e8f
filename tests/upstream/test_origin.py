"""Parsing upstream URLs (trioproxy/upstream/origin.py): sans-I/O, plain values."""

from __future__ import annotations

import pytest

from trioproxy.upstream.origin import BadUpstreamURL, Origin, UpstreamURL


@pytest.mark.parametrize(
    ("text", "scheme", "host", "port", "host_header"),
    [
        ("http://up.test", "http", "up.test", 80, b"up.test"),
        ("http://up.test:80", "http", "up.test", 80, b"up.test"),
        ("http://up.test:8080", "http", "up.test", 8080, b"up.test:8080"),
        ("https://up.test", "https", "up.test", 443, b"up.test"),
        ("https://up.test:443/", "https", "up.test", 443, b"up.test"),
        ("https://up.test:8443", "https", "up.test", 8443, b"up.test:8443"),
        # A default port of the *other* scheme is not a default here.
        ("http://up.test:443", "http", "up.test", 443, b"up.test:443"),
        ("https://up.test:80", "https", "up.test", 80, b"up.test:80"),
        ("http://127.0.0.1:9000", "http", "127.0.0.1", 9000, b"127.0.0.1:9000"),
        # Case-insensitive scheme and host (RFC 3986 §3.1, §3.2.2).
        ("HTTP://UP.Test:81", "http", "up.test", 81, b"up.test:81"),
        # An empty port means the default (RFC 3986 §3.2.3).
        ("http://up.test:/", "http", "up.test", 80, b"up.test"),
    ],
)
def test_origin(text: str, scheme: str, host: str, port: int, host_header: bytes) -> None:
    origin = UpstreamURL.parse(text).origin
    assert origin == Origin(scheme, host, port)
    assert origin.host_header == host_header
    assert origin.tls is (scheme == "https")
    assert str(origin) == f"{scheme}://{host_header.decode()}"


@pytest.mark.parametrize(
    ("text", "host", "port", "host_header"),
    [
        ("http://[::1]:8080", "::1", 8080, b"[::1]:8080"),
        ("http://[::1]", "::1", 80, b"[::1]"),
        ("https://[2001:db8::7]/api", "2001:db8::7", 443, b"[2001:db8::7]"),
        ("http://[2001:DB8::1]:81", "2001:db8::1", 81, b"[2001:db8::1]:81"),
    ],
)
def test_ipv6(text: str, host: str, port: int, host_header: bytes) -> None:
    origin = UpstreamURL.parse(text).origin
    # The host is kept bare (what a connector resolves); brackets only in Host.
    assert origin.host == host
    assert origin.port == port
    assert origin.host_header == host_header


def test_international_domain_name_is_ascii() -> None:
    origin = UpstreamURL.parse("http://bücher.example:8000").origin
    assert origin.host == "xn--bcher-kva.example"
    assert origin.host_header == b"xn--bcher-kva.example:8000"


def test_origins_are_pool_keys() -> None:
    a = UpstreamURL.parse("http://up.test/a").origin
    b = UpstreamURL.parse("http://UP.test:80/b/").origin
    assert a == b
    assert hash(a) == hash(b)
    assert {a: 1}[b] == 1
    assert UpstreamURL.parse("https://up.test").origin != a


def test_text_is_kept_for_logs() -> None:
    assert UpstreamURL.parse("http://up.test:8080/api/").text == "http://up.test:8080/api/"


@pytest.mark.parametrize(
    ("text", "prefix"),
    [
        ("http://up.test", b""),
        ("http://up.test/", b""),
        ("http://up.test/api", b"/api"),
        ("http://up.test/api/", b"/api"),
        ("http://up.test/api/v2//", b"/api/v2"),
        ("http://up.test/a%20b", b"/a%20b"),
    ],
)
def test_path_prefix(text: str, prefix: bytes) -> None:
    assert UpstreamURL.parse(text).path_prefix == prefix


@pytest.mark.parametrize(
    ("text", "target", "upstream_target"),
    [
        ("http://up.test", b"/x?y=1", b"/x?y=1"),
        ("http://up.test/", b"/", b"/"),
        ("http://up.test/api", b"/", b"/api/"),
        ("http://up.test/api/", b"/users?id=7", b"/api/users?id=7"),
        ("http://up.test/api", b"/%2e%2e/secret", b"/api/%2e%2e/secret"),  # not normalised
        ("http://up.test/api", b"//double", b"/api//double"),
        ("http://up.test/api", b"*", b"*"),  # OPTIONS * has no path to prefix
        ("http://up.test", b"*", b"*"),
    ],
)
def test_upstream_target(text: str, target: bytes, upstream_target: bytes) -> None:
    assert UpstreamURL.parse(text).upstream_target(target) == upstream_target


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("ftp://up.test", "scheme"),
        ("ws://up.test", "scheme"),
        ("up.test:80", "scheme"),
        ("//up.test", "scheme"),
        ("", "scheme"),
        ("http://", "no host"),
        ("http:///path", "no host"),
        ("http://:80", "no host"),
        ("http://up.test/?q=1", "query"),
        ("http://up.test/#frag", "fragment"),
        ("http://user:secret@up.test", "credentials"),
        ("http://user@up.test", "credentials"),
        ("http://up.test:99999", "port"),
        ("http://up.test:http", "port"),
        ("http://[::1", "IPv6"),
        ("http://up.test/caf\u00e9", "ASCII"),
    ],
)
def test_bad_upstream_url(text: str, why: str) -> None:
    with pytest.raises(BadUpstreamURL) as caught:
        UpstreamURL.parse(text)
    message = str(caught.value)
    assert repr(text) in message  # names the value...
    assert why.lower() in message.lower()  # ...and why


def test_bad_upstream_url_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        UpstreamURL.parse("gopher://up.test")


def test_credentials_are_not_echoed_beyond_the_value() -> None:
    # The message names the configured value (an operator's own config), nothing more.
    with pytest.raises(BadUpstreamURL, match="credentials"):
        UpstreamURL.parse("https://admin:hunter2@up.test")


def test_port_zero_is_refused() -> None:
    with pytest.raises(BadUpstreamURL):
        UpstreamURL.parse("http://up.test:0")
