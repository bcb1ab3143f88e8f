"""Access rules: addresses, API keys, what a refusal says (trioproxy.edge.access)."""

from __future__ import annotations

import ipaddress

import pytest

from trioproxy.edge.access import (
    AccessDenied,
    AccessPolicy,
    KeyCheck,
    KeyMissing,
    KeyRejected,
    presented_key,
)
from trioproxy.errors import ProxyError
from trioproxy.http.answers import error_answer
from trioproxy.http.protocol import Headers


def nets(*networks: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(n) for n in networks)


def test_allow_and_deny() -> None:
    rules = AccessPolicy(allow=nets("10.0.0.0/8", "2001:db8::/32"), deny=nets("10.9.0.0/16"))
    assert rules.address_allowed("10.1.2.3")
    assert rules.address_allowed("2001:db8::7")
    assert not rules.address_allowed("10.9.0.1")  # deny wins
    assert not rules.address_allowed("192.0.2.1")  # not in allow
    assert not rules.address_allowed("unknown")
    assert AccessPolicy(deny=nets("127.0.0.1/32")).address_allowed("127.0.0.2")
    assert not AccessPolicy(deny=nets("10.0.0.0/8")).address_allowed("::ffff:10.0.0.1")
    assert AccessPolicy().address_allowed("unknown")
    with pytest.raises(AccessDenied) as caught:
        rules.check("192.0.2.1", [])
    assert caught.value.status == 403


def test_presented_key() -> None:
    assert presented_key([(b"authorization", b"Bearer  sk-1 ")]) == b"sk-1"
    assert presented_key([(b"authorization", b"bearer sk-1")]) == b"sk-1"
    assert presented_key([(b"authorization", b"Basic dXNlcjpwdw==")]) is None
    assert presented_key([(b"authorization", b"Bearer ")]) is None
    assert presented_key([(b"x-api-key", b"k2")], b"x-api-key") == b"k2"
    assert presented_key([(b"authorization", b"Bearer k")], b"x-api-key") is None


def refusal(rules: AccessPolicy, headers: Headers) -> ProxyError:
    with pytest.raises(ProxyError) as caught:
        rules.check("192.0.2.1", headers)
    return caught.value


def test_bearer_keys() -> None:
    rules = AccessPolicy(auth=KeyCheck.of(["sk-one", "sk-two"]))
    rules.check("192.0.2.1", [(b"authorization", b"Bearer sk-two")])
    missing = refusal(rules, [])
    assert isinstance(missing, KeyMissing)
    assert missing.status == 401
    assert missing.headers == ((b"www-authenticate", b'Bearer realm="trioproxy"'),)
    wrong = refusal(rules, [(b"authorization", b"Bearer sk-thr")])
    assert isinstance(wrong, KeyRejected)
    assert wrong.status == 401
    assert wrong.headers == (
        (b"www-authenticate", b'Bearer realm="trioproxy", error="invalid_token"'),
    )
    # A prefix of a key is no key.
    assert isinstance(refusal(rules, [(b"authorization", b"Bearer sk-on")]), KeyRejected)


def test_header_keys_and_the_answer_never_holds_the_key() -> None:
    rules = AccessPolicy(auth=KeyCheck.of(["k-secret-1"], header="X-API-Key"))
    rules.check("192.0.2.1", [(b"x-api-key", b"k-secret-1")])
    wrong = refusal(rules, [(b"x-api-key", b"k-secret-2")])
    answer = error_answer(wrong)
    assert answer.status == 401
    assert (b"www-authenticate", b'ApiKey realm="trioproxy", header="x-api-key"') in answer.headers
    assert b"k-secret" not in answer.body and "k-secret" not in wrong.detail
    assert "k-secret" not in repr(rules)


def test_address_rules_come_before_keys_and_preflights_need_no_key() -> None:
    rules = AccessPolicy(allow=nets("10.0.0.0/8"), auth=KeyCheck.of(["k"]))
    assert isinstance(refusal(rules, []), AccessDenied)
    rules.check("10.0.0.1", [], preflight=True)
    with pytest.raises(AccessDenied):
        rules.check("192.0.2.1", [], preflight=True)


def test_the_key_is_removed_unless_forwarded() -> None:
    headers: Headers = [(b"authorization", b"Bearer k"), (b"x-api-key", b"k"), (b"a", b"b")]
    assert KeyCheck.of(["k"]).without_key(headers) == headers[1:]
    assert KeyCheck.of(["k"], header="x-api-key").without_key(headers) == [
        headers[0],
        headers[2],
    ]
    assert KeyCheck.of(["k"], forward_key=True).without_key(headers) == headers
