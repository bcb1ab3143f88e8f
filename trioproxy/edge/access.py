"""Access rules per route: by client address and by API key (sans-I/O).

A route may say::

    allow = ["10.0.0.0/8"]            # only these (none given: everyone)
    deny = ["10.9.0.0/16"]            # never these; deny wins over allow
    auth = { api_keys_file = "keys.txt" }        # or { api_keys_env = "NAME" }
    # auth.header = "x-api-key"   read the key from that field instead of
    #                             "Authorization: Bearer KEY" (RFC 6750 §2.1)
    # auth.forward_key = true     send the key upstream (default: removed)

What a refused request gets (and it never reaches an upstream):

- an address a rule refuses (the real client IP, ``trioproxy.edge.identity``):
  **403**;
- no key: **401** with ``WWW-Authenticate`` (RFC 9110 §11.6.1): ``Bearer
  realm="trioproxy"`` (RFC 6750 §3), or ``ApiKey realm="trioproxy",
  header="x-api-key"`` when the key is read from a header of its own;
- a key that is not one of the route's: **401** too, with
  ``error="invalid_token"`` for Bearer (RFC 6750 §3.1): the client may retry
  with another key, and the answer is the same whether a key exists or not.

Address rules come first (a denied address learns nothing about keys). A CORS
preflight on a route with a CORS policy needs no key: browsers send it without
credentials (Fetch standard, CORS-preflight request), so an auth route would
otherwise be unusable from a browser; the address rules still apply.

Keys are compared in constant time: each presented key is hashed (SHA-256) and
compared with ``hmac.compare_digest`` against *every* configured key's digest,
so neither the time taken nor an early exit tells how much of a key matched or
which key it was. A key appears in no log line and no error text: errors name
the rule, never the value.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

import attrs

from trioproxy.edge.identity import Network, in_networks, parse_address
from trioproxy.errors import AccessDenied, KeyMissing, KeyRejected, ProxyError
from trioproxy.http.protocol import Headers

__all__ = [
    "AccessDenied",
    "AccessPolicy",
    "KeyCheck",
    "KeyMissing",
    "KeyRejected",
    "presented_key",
]

REALM = b"trioproxy"


def presented_key(headers: Headers, header: bytes | None = None) -> bytes | None:
    """The API key a request presents, or None.

    Args:
        headers: the request's fields (lower-case names).
        header: the field the key is read from (lower-case, e.g. ``b"x-api-key"``);
            None: ``Authorization: Bearer KEY`` (RFC 6750 §2.1; the scheme is
            case-insensitive, RFC 9110 §11.1).
    """
    if header is not None:
        for name, value in headers:
            if name == header:
                return value.strip() or None
        return None
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"bearer":
                return token.strip() or None
    return None


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


@attrs.frozen
class KeyCheck:
    """``auth = {...}`` compiled: the keys' digests and where the key is read."""

    digests: tuple[bytes, ...] = attrs.field(repr=False)
    #: The field the key is in; None: ``Authorization: Bearer``.
    header: bytes | None = None
    forward_key: bool = False

    @classmethod
    def of(
        cls, keys: Iterable[str], *, header: str | None = None, forward_key: bool = False
    ) -> KeyCheck:
        return cls(
            tuple(_digest(key.encode("utf-8")) for key in keys),
            header.lower().encode("ascii") if header is not None else None,
            forward_key,
        )

    def accepts(self, key: bytes) -> bool:
        """Whether ``key`` is one of the keys, in time independent of which one (or how
        much of one) it matches."""
        digest = _digest(key)
        found = False
        for known in self.digests:
            found |= hmac.compare_digest(digest, known)
        return found

    def challenge(self, *, invalid: bool) -> tuple[bytes, bytes]:
        """The ``WWW-Authenticate`` field for a 401."""
        if self.header is None:
            value = b'Bearer realm="%b"' % REALM
            if invalid:
                value += b', error="invalid_token"'
        else:
            value = b'ApiKey realm="%b", header="%b"' % (REALM, self.header)
        return (b"www-authenticate", value)

    def without_key(self, headers: Headers) -> Headers:
        """``headers`` without the field that carries the key (unless ``forward_key``)."""
        if self.forward_key:
            return headers
        name = self.header if self.header is not None else b"authorization"
        return [field for field in headers if field[0] != name]


@attrs.frozen
class AccessPolicy:
    """A route's ``allow``, ``deny`` and ``auth``, compiled."""

    allow: tuple[Network, ...] = ()
    deny: tuple[Network, ...] = ()
    auth: KeyCheck | None = None

    def address_allowed(self, client_ip: str) -> bool:
        """Deny wins; then, if ``allow`` lists networks, the address must be in one.
        An address that does not parse (a Unix socket peer) is only allowed when no
        rule names networks."""
        if not (self.allow or self.deny):
            return True
        address = parse_address(client_ip)
        if address is None:
            return False
        if in_networks(address, self.deny):
            return False
        return not self.allow or in_networks(address, self.allow)

    def check(self, client_ip: str, headers: Headers, *, preflight: bool = False) -> None:
        """Raise the error a request from ``client_ip`` with ``headers`` gets, if any.

        Raises:
            AccessDenied: 403, the address is not allowed.
            KeyMissing, KeyRejected: 401 with ``WWW-Authenticate``.
        """
        if not self.address_allowed(client_ip):
            raise AccessDenied(f"address {client_ip} not allowed on this route")
        auth = self.auth
        if auth is None or preflight:
            return
        key = presented_key(headers, auth.header)
        if key is None:
            error: ProxyError = KeyMissing("no API key")
            error.headers = (auth.challenge(invalid=False),)
            raise error
        if not auth.accepts(key):
            error = KeyRejected("API key not accepted")
            error.headers = (auth.challenge(invalid=True),)
            raise error
