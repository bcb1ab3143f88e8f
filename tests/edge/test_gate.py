"""The one call a front end makes once a route is known (trioproxy.edge.gate)."""

from __future__ import annotations

import ipaddress

import pytest

from trioproxy.balance.group import LiveGroup
from trioproxy.balance.target import TargetSpec
from trioproxy.config.model import AuthSpec, CorsSpec, RouteSettings, UpstreamGroup
from trioproxy.edge.access import AccessDenied, KeyMissing
from trioproxy.edge.gate import admit
from trioproxy.edge.identity import IdentityPolicy
from trioproxy.engine import ExchangeLog
from trioproxy.http.cors import compile_cors
from trioproxy.http.protocol import RequestHead
from trioproxy.snapshot import Route, _access_policy
from trioproxy.upstream.origin import UpstreamURL


def route(**settings: object) -> Route:
    group = LiveGroup.build(
        UpstreamGroup(name="g", servers=(TargetSpec(url=UpstreamURL.parse("http://a:1")),))
    )
    spec = RouteSettings(name="r", upstream="g", **settings)  # type: ignore[arg-type]
    cors = compile_cors(spec.cors, "routes.r.cors") if spec.cors is not None else None
    return Route(
        settings=spec,
        group=group,
        read_timeout=1.0,
        connect_timeout=None,
        max_body_size=None,
        cors=cors,
        access=_access_policy(spec),
    )


def head(*headers: tuple[bytes, bytes], method: bytes = b"GET") -> RequestHead:
    return RequestHead(method, b"/x", [(b"host", b"h"), *headers])


TRUSTED = IdentityPolicy((ipaddress.ip_network("10.0.0.0/8"),))


def test_nothing_to_do_returns_the_same_head() -> None:
    request = head((b"x-forwarded-for", b"6.6.6.6"))
    record = ExchangeLog()
    policy = IdentityPolicy()
    same = admit(request, route(), policy, peer="1.2.3.4", scheme="http", record=record)
    assert same is request
    assert record.client_ip == ""


def test_identity_then_address_rules_on_the_real_client() -> None:
    rules = route(deny=(ipaddress.ip_network("203.0.113.0/24"),))
    record = ExchangeLog()
    with pytest.raises(AccessDenied):
        admit(
            head((b"x-forwarded-for", b"203.0.113.9")),
            rules,
            TRUSTED,
            peer="10.0.0.1",
            scheme="https",
            record=record,
        )
    assert record.client_ip == "203.0.113.9"
    # The same chain from an untrusted peer: the peer is the client, and is allowed.
    record = ExchangeLog()
    sent = admit(
        head((b"x-forwarded-for", b"203.0.113.9")),
        rules,
        TRUSTED,
        peer="198.51.100.1",
        scheme="https",
        record=record,
    )
    assert record.client_ip == "198.51.100.1"
    assert (b"x-forwarded-for", b"203.0.113.9") not in sent.headers


def test_keys_checked_then_removed_and_preflights_pass() -> None:
    keyed = route(
        auth=AuthSpec(api_keys_env="K", keys=("k1",)),
        cors=CorsSpec(allow_origins=("https://app.test",), allow_headers=("authorization",)),
    )
    record = ExchangeLog()
    with pytest.raises(KeyMissing):
        admit(head(), keyed, IdentityPolicy(), peer="1.2.3.4", scheme="http", record=record)
    sent = admit(
        head((b"authorization", b"Bearer k1"), (b"a", b"b")),
        keyed,
        IdentityPolicy(),
        peer="1.2.3.4",
        scheme="http",
        record=record,
    )
    assert sent.headers == [(b"host", b"h"), (b"a", b"b")]
    preflight = head(
        (b"origin", b"https://app.test"),
        (b"access-control-request-method", b"POST"),
        method=b"OPTIONS",
    )
    assert admit(preflight, keyed, IdentityPolicy(), peer="1.2.3.4", scheme="http", record=record)
