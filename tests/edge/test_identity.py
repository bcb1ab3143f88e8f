"""The real client IP and the forwarding fields sent upstream (trioproxy.edge.identity)."""

from __future__ import annotations

import ipaddress

import pytest

from trioproxy.edge.identity import (
    IdentityPolicy,
    client_ip,
    forwarded_node,
    forwarded_value,
    identify,
    parse_address,
    rewrite_forwarding,
)
from trioproxy.http.headers import upstream_request_headers
from trioproxy.http.protocol import Headers


def policy(*networks: str, forwarded: str = "x-forwarded") -> IdentityPolicy:
    return IdentityPolicy(tuple(ipaddress.ip_network(n) for n in networks), forwarded)


def xff(*values: str) -> Headers:
    return [(b"host", b"app.example"), *((b"x-forwarded-for", v.encode()) for v in values)]


def test_untrusted_peer_is_the_client_whatever_it_claims() -> None:
    headers = xff("203.0.113.9")
    assert client_ip("198.51.100.1", headers, policy("10.0.0.0/8")) == "198.51.100.1"
    # No trusted proxies at all: the same.
    assert client_ip("198.51.100.1", headers, policy()) == "198.51.100.1"


def test_trusted_peer_chain_is_read_right_to_left_skipping_trusted_hops() -> None:
    headers = xff("1.1.1.1, 203.0.113.9", "10.0.0.2")
    who = identify("10.0.0.1", headers, policy("10.0.0.0/8"))
    assert who.client_ip == "203.0.113.9"
    # The spoofed 1.1.1.1 left of the client is not part of the verified chain.
    assert who.chain == ("203.0.113.9", "10.0.0.2")
    assert who.trusted_peer


def test_trusted_peer_without_chain_is_the_client() -> None:
    who = identify("10.0.0.1", xff(), policy("10.0.0.0/8"))
    assert (who.client_ip, who.chain, who.trusted_peer) == ("10.0.0.1", (), True)


def test_all_trusted_chain_yields_its_leftmost_and_garbage_stops_the_walk() -> None:
    assert client_ip("10.0.0.1", xff("10.0.0.7, 10.0.0.8"), policy("10.0.0.0/8")) == "10.0.0.7"
    # "unknown" cannot be checked: the last trusted hop read is the client.
    assert client_ip("10.0.0.1", xff("unknown, 10.0.0.8"), policy("10.0.0.0/8")) == "10.0.0.8"
    assert client_ip("10.0.0.1", xff("evil"), policy("10.0.0.0/8")) == "10.0.0.1"


def test_entries_with_ports_brackets_and_ipv6() -> None:
    assert parse_address("198.51.100.7:4711") == ipaddress.ip_address("198.51.100.7")
    assert parse_address("[2001:db8::1]:4711") == ipaddress.ip_address("2001:db8::1")
    assert parse_address("2001:db8::1") == ipaddress.ip_address("2001:db8::1")
    assert parse_address("[2001:db8::1]x") is None
    assert parse_address("example.com") is None
    trusted = policy("::1/128", "10.0.0.0/8")
    assert client_ip("::1", xff("[2001:db8::5]:80"), trusted) == "2001:db8::5"
    # A dual-stack socket's IPv4-mapped peer counts as its IPv4 address.
    assert client_ip("::ffff:10.0.0.1", xff("192.0.2.4"), trusted) == "192.0.2.4"


def test_forwarded_nodes_quote_ipv6_as_rfc7239_says() -> None:
    assert forwarded_node("192.0.2.43") == "192.0.2.43"
    assert forwarded_node("2001:db8:cafe::17") == '"[2001:db8:cafe::17]"'
    assert forwarded_node("[2001:db8::1]") == '"[2001:db8::1]"'
    assert forwarded_node("unix-socket") == "unknown"
    assert forwarded_node("::ffff:192.0.2.1") == "192.0.2.1"


def test_forwarded_value_one_element_per_hop_ours_with_host_and_proto() -> None:
    value = forwarded_value(["192.0.2.1", "2001:db8::2"], host=b"a.example:8443", proto="https")
    assert value == b'for=192.0.2.1, for="[2001:db8::2]";host="a.example:8443";proto=https'
    assert forwarded_value(["192.0.2.1"], host=b"plain", proto="http") == (
        b"for=192.0.2.1;host=plain;proto=http"
    )
    # A quote or backslash in Host is escaped; control characters dropped.
    odd = forwarded_value(["192.0.2.1"], host=b'a"b\\c\x01', proto="http")
    assert odd == b'for=192.0.2.1;host="a\\"b\\\\c";proto=http'


@pytest.mark.parametrize(
    ("fields", "proto", "host"),
    [
        (
            [(b"x-forwarded-proto", b"https"), (b"x-forwarded-host", b"app.example")],
            "https",
            b"app.example",
        ),
        (
            [(b"x-forwarded-proto", b"HTTPS, http"), (b"x-forwarded-host", b"a.example:8443, b")],
            "https",
            b"a.example:8443",
        ),
        ([(b"x-forwarded-host", b"[2001:db8::1]:443")], None, b"[2001:db8::1]:443"),
        ([(b"x-forwarded-proto", b"gopher"), (b"x-forwarded-host", b"a b")], None, None),
        ([(b"x-forwarded-proto", b""), (b"x-forwarded-host", b"a/b")], None, None),
        ([], None, None),
    ],
)
def test_a_trusted_peers_proto_and_host_are_kept_when_they_can_be_what_they_say(
    fields: Headers, proto: str | None, host: bytes | None
) -> None:
    who = identify("10.0.0.1", [*xff("203.0.113.9"), *fields], policy("10.0.0.0/8"))
    assert (who.trusted_peer, who.proto, who.host) == (True, proto, host)


def test_an_untrusted_peers_proto_and_host_are_not_read() -> None:
    headers = [(b"x-forwarded-proto", b"https"), (b"x-forwarded-host", b"evil.example")]
    who = identify("198.51.100.1", headers, policy("10.0.0.0/8"))
    assert (who.trusted_peer, who.proto, who.host) == (False, None, None)


def test_x_forwarded_host_can_be_given_instead_of_the_clients_host() -> None:
    sent = upstream_request_headers(
        [(b"host", b"proxy.internal")],
        client_addr="10.0.0.1",
        scheme="https",
        upstream_host=b"up:9000",
        preserve_host=False,
        request_id=b"id",
        forwarded_host=b"app.example",
    )
    assert values(sent, b"x-forwarded-host") == [b"app.example"]
    assert values(sent, b"x-forwarded-proto") == [b"https"]


def upstream(headers: Headers, peer: str, p: IdentityPolicy, scheme: str = "http") -> Headers:
    who = identify(peer, headers, p)
    prepared = rewrite_forwarding(headers, who, p, scheme)
    return upstream_request_headers(
        prepared,
        client_addr=peer,
        scheme=scheme,
        upstream_host=b"up:9000",
        preserve_host=False,
        request_id=b"id",
        x_forwarded=p.x_forwarded,
    )


def values(headers: Headers, name: bytes) -> list[bytes]:
    return [v for n, v in headers if n == name]


def test_spoofed_chain_from_untrusted_peer_is_dropped_once_proxies_are_named() -> None:
    sent = upstream(xff("6.6.6.6"), "198.51.100.1", policy("10.0.0.0/8"))
    assert values(sent, b"x-forwarded-for") == [b"198.51.100.1"]
    # Without trusted_proxies the chain is extended as before (compatibility).
    sent = upstream(xff("6.6.6.6"), "198.51.100.1", policy())
    assert values(sent, b"x-forwarded-for") == [b"6.6.6.6, 198.51.100.1"]


def test_trusted_chain_is_cut_to_the_client_and_extended_with_the_peer() -> None:
    sent = upstream(xff("6.6.6.6, 203.0.113.9, 10.0.0.2"), "10.0.0.1", policy("10.0.0.0/8"))
    assert values(sent, b"x-forwarded-for") == [b"203.0.113.9, 10.0.0.2, 10.0.0.1"]


@pytest.mark.parametrize("mode", ["rfc7239", "both"])
def test_forwarded_is_sent_and_replaces_the_clients(mode: str) -> None:
    headers = [*xff("203.0.113.9"), (b"forwarded", b"for=6.6.6.6")]
    sent = upstream(headers, "10.0.0.1", policy("10.0.0.0/8", forwarded=mode), "https")
    assert values(sent, b"forwarded") == [
        b"for=203.0.113.9, for=10.0.0.1;host=app.example;proto=https"
    ]
    xf = values(sent, b"x-forwarded-for") + values(sent, b"x-forwarded-proto")
    if mode == "both":
        assert xf == [b"203.0.113.9, 10.0.0.1", b"https"]
    else:
        assert xf == []
        assert values(sent, b"x-forwarded-host") == []


def test_forwarded_for_an_ipv6_peer() -> None:
    sent = upstream(xff(), "::1", policy(forwarded="rfc7239"))
    assert values(sent, b"forwarded") == [b'for="[::1]";host=app.example;proto=http']


def test_received_forwarded_passes_only_when_someone_vouches_for_it() -> None:
    headers = [*xff(), (b"forwarded", b"for=6.6.6.6")]
    # Default: passes through, as before.
    assert values(upstream(headers, "198.51.100.1", policy()), b"forwarded") == [b"for=6.6.6.6"]
    # trusted_proxies named and the peer is not one: dropped.
    assert values(upstream(headers, "198.51.100.1", policy("10.0.0.0/8")), b"forwarded") == []
    assert values(upstream(headers, "10.0.0.1", policy("10.0.0.0/8")), b"forwarded") == [
        b"for=6.6.6.6"
    ]
