"""Who the client really is, and what the upstream is told about it (sans-I/O).

Behind a load balancer or a CDN the TCP peer of the proxy is that machine, not
the client. ``[server] trusted_proxies`` lists the networks whose word about
the client is taken; the rules:

Client IP. The peer address, unless the peer is trusted; then the
``X-Forwarded-For`` chain (every line, as one comma list, RFC 9110 §5.3) is read
from right to left, skipping the entries that are themselves trusted: the first
one that is not is the client. An entry that is not an IP address (``unknown``,
garbage, a hostname) stops the walk: the client is then the last trusted hop
read, since nothing left of it can be checked. A chain of trusted entries only
yields its leftmost one. Entries may carry a port (``198.51.100.7:4711``,
``[2001:db8::1]:4711``) or brackets, as some balancers write them. This is
nginx's ``real_ip_recursive on`` and Traefik's ``forwardedHeaders.trustedIPs``.

What goes upstream. The *verified chain* is the client followed by the
trusted hops between it and the peer; a spoofed prefix a client wrote itself
is not part of it.

- ``X-Forwarded-For``: with ``trusted_proxies`` set, the verified chain, then
  the peer (the proxy's own hop, added by ``trioproxy.http.headers``). Without
  it, the chain the client sent is extended as before (nginx's
  ``$proxy_add_x_forwarded_for``), so a config that never named a trusted proxy
  forwards what it always did; only the proxy's own view (``{client_ip}``, the
  access log, limits and access rules) is the peer address.
- ``Forwarded`` (RFC 7239), sent with ``forwarded = "rfc7239"`` or ``"both"``:
  one element per hop of the verified chain and the peer (§4: each proxy adds
  ``for=`` the address it received from), the last one, ours, also with
  ``host=`` (the client's Host) and ``proto=``. Any ``Forwarded`` the client sent
  is replaced. IPv6 addresses are bracketed and quoted (§6:
  ``for="[2001:db8::1]"``); a value that is not a token is a quoted-string (§4).
  With ``forwarded = "x-forwarded"`` (the default) a received ``Forwarded``
  passes through as any field does, except from an untrusted peer when
  ``trusted_proxies`` is set: a claim nobody vouches for is dropped.
- ``forwarded = "rfc7239"`` sends no ``X-Forwarded-*``; ``"both"`` sends both.
- ``X-Forwarded-Proto`` and ``X-Forwarded-Host``: a trusted peer's are kept (the
  scheme and host the client used at the edge, say a TLS-terminating balancer:
  an app behind both builds its links with them), as Traefik does for its
  ``trustedIPs``; anyone else's are replaced by the proxy's own. Only a value
  that can be one is kept: ``http`` or ``https`` (``ws``/``wss``), a host[:port].

:func:`client_ip` is the one function the rest of the proxy (access rules, rate
limits, templates, the access log) asks for the real client address of a
request.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence

import attrs

from trioproxy.http.protocol import Headers

__all__ = [
    "FORWARDED_MODES",
    "ClientIdentity",
    "IdentityPolicy",
    "Network",
    "client_ip",
    "forwarded_node",
    "forwarded_value",
    "identify",
    "in_networks",
    "parse_address",
    "rewrite_forwarding",
]

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

FORWARDED_MODES = ("x-forwarded", "rfc7239", "both")

# RFC 9110 §5.6.2 tchar: what a token may hold unquoted.
_TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


@attrs.frozen
class IdentityPolicy:
    """``[server] trusted_proxies`` and ``forwarded``, compiled."""

    trusted: tuple[Network, ...] = ()
    forwarded: str = "x-forwarded"

    @property
    def rewrites(self) -> bool:
        """Whether a request's forwarding fields need more than today's rules (the
        hot path asks once per request)."""
        return bool(self.trusted) or self.forwarded != "x-forwarded"

    @property
    def x_forwarded(self) -> bool:
        """Whether ``X-Forwarded-*`` go upstream."""
        return self.forwarded != "rfc7239"

    @property
    def rfc7239(self) -> bool:
        """Whether ``Forwarded`` goes upstream."""
        return self.forwarded != "x-forwarded"

    def is_trusted(self, address: Address) -> bool:
        return in_networks(address, self.trusted)


def in_networks(address: Address, networks: Sequence[Network]) -> bool:
    """Whether ``address`` is in one of ``networks`` (an IPv4-mapped IPv6 address, as a
    dual-stack socket reports ``::ffff:10.0.0.1``, counts as its IPv4 address)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


@attrs.frozen
class ClientIdentity:
    """One request's client as the policy sees it."""

    #: The TCP peer (bare, no brackets).
    peer: str
    #: The real client IP (the peer's unless the peer is trusted).
    client_ip: str
    #: The verified chain: the client, then the trusted hops up to (not including)
    #: the peer; empty when the client is the peer.
    chain: tuple[str, ...] = ()
    #: Whether the peer is a trusted proxy.
    trusted_peer: bool = False
    #: The trusted peer's ``X-Forwarded-Proto`` and ``X-Forwarded-Host`` (None: it
    #: sent none that can be one).
    proto: str | None = None
    host: bytes | None = None


def parse_address(text: str) -> Address | None:
    """An IP address from a forwarding entry: bare, bracketed, or with a port; else None."""
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or (text[end + 1 :] and not text[end + 1 :].startswith(":")):
            return None
        text = text[1:end]
    elif text.count(":") == 1:
        text = text.partition(":")[0]  # IPv4 with a port
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _chain_entries(headers: Headers) -> list[str]:
    """Every ``X-Forwarded-For`` element, left to right, empty ones dropped."""
    entries: list[str] = []
    for name, value in headers:
        if name == b"x-forwarded-for":
            entries.extend(
                part.strip() for part in value.decode("latin-1").split(",") if part.strip()
            )
    return entries


def identify(peer: str, headers: Headers, policy: IdentityPolicy) -> ClientIdentity:
    """The client of a request that came from ``peer`` with ``headers``."""
    if peer.startswith("[") and peer.endswith("]"):
        peer = peer[1:-1]
    peer_address = parse_address(peer)
    if not policy.trusted or peer_address is None or not policy.is_trusted(peer_address):
        return ClientIdentity(peer=peer, client_ip=peer)
    entries = _chain_entries(headers)
    client = peer
    chain: list[str] = []  # right to left while walking
    for entry in reversed(entries):
        address = parse_address(entry)
        if address is None:
            break
        client = str(address)
        chain.append(client)
        if not policy.is_trusted(address):
            break
    proto, host = _forwarded_proto_host(headers)
    return ClientIdentity(
        peer=peer,
        client_ip=client,
        chain=tuple(reversed(chain)),
        trusted_peer=True,
        proto=proto,
        host=host,
    )


_PROTOS = frozenset({"http", "https", "ws", "wss"})
#: A host[:port] as ``Host`` may carry it (RFC 9110 §7.2): reg-name, IPv4 or a
#: bracketed IPv6 literal, and an optional port.
_AUTHORITY = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~%!$&'()*+;=-]+)(?::[0-9]{1,5})?")


def _forwarded_proto_host(headers: Headers) -> tuple[str | None, bytes | None]:
    """The first ``X-Forwarded-Proto`` and ``X-Forwarded-Host`` values (the first
    element of a list: the hop nearest the client), when they can be what they say."""
    proto: str | None = None
    host: bytes | None = None
    for name, value in headers:
        if name == b"x-forwarded-proto" and proto is None:
            first = value.split(b",", 1)[0].strip().lower().decode("latin-1")
            proto = first if first in _PROTOS else ""
        elif name == b"x-forwarded-host" and host is None:
            first_host = value.split(b",", 1)[0].strip()
            host = first_host if _AUTHORITY.fullmatch(first_host) else b""
    return proto or None, host or None


def client_ip(peer: str, headers: Headers, policy: IdentityPolicy) -> str:
    """The real client IP of a request from ``peer`` with ``headers`` (see the module
    docstring): what access rules, rate limits, ``{client_ip}`` and the access log use."""
    return identify(peer, headers, policy).client_ip


def _quoted(value: str) -> str:
    """``value`` as an RFC 7239 §4 value: a token as is, else a quoted-string (with
    ``"`` and ``\\`` escaped; control characters, which no quoted-string may hold,
    dropped)."""
    raw = value.encode("latin-1", "replace")
    if raw and all(byte in _TCHAR for byte in raw):
        return value
    kept = "".join(ch for ch in value if ch == "\t" or (ord(ch) >= 0x20 and ord(ch) != 0x7F))
    return '"' + kept.replace("\\", "\\\\").replace('"', '\\"') + '"'


def forwarded_node(address: str) -> str:
    """A ``for=`` value (RFC 7239 §6): an IPv4 address as is, an IPv6 one bracketed
    and quoted, anything else (a Unix socket, ``unknown``) as ``unknown``."""
    parsed = parse_address(address)
    if parsed is None:
        return "unknown"
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        parsed = parsed.ipv4_mapped  # a dual-stack socket's view of an IPv4 client
    if isinstance(parsed, ipaddress.IPv6Address):
        return f'"[{parsed.compressed}]"'
    return str(parsed)


def forwarded_value(hops: Sequence[str], *, host: bytes | None, proto: str) -> bytes:
    """The ``Forwarded`` field value for ``hops`` (client first, our peer last); the last
    element, this proxy's, also says ``host`` and ``proto``."""
    elements = [f"for={forwarded_node(hop)}" for hop in hops]
    last = elements[-1]
    if host is not None:
        last += ";host=" + _quoted(host.decode("latin-1"))
    elements[-1] = last + ";proto=" + _quoted(proto)
    return ", ".join(elements).encode("latin-1")


def rewrite_forwarding(
    headers: Headers, identity: ClientIdentity, policy: IdentityPolicy, scheme: str
) -> Headers:
    """The client's request fields with ``X-Forwarded-For`` cut to the verified chain
    and ``Forwarded`` replaced or dropped, as the policy says (module docstring).

    ``trioproxy.http.headers.upstream_request_headers`` then appends the peer to
    ``X-Forwarded-For`` (or, with ``x_forwarded=False``, writes no ``X-Forwarded-*``)
    and passes the ``Forwarded`` field made here.
    """
    keep_xff = not policy.trusted
    keep_forwarded = not policy.rfc7239 and (not policy.trusted or identity.trusted_peer)
    out: Headers = []
    host: bytes | None = None
    for field in headers:
        name = field[0]
        if name == b"x-forwarded-for":
            if keep_xff:
                out.append(field)
        elif name == b"forwarded":
            if keep_forwarded:
                out.append(field)
        else:
            if name == b"host" and host is None:
                host = field[1]
            out.append(field)
    if policy.trusted and identity.chain:
        out.append((b"x-forwarded-for", ", ".join(identity.chain).encode("latin-1")))
    if policy.rfc7239:
        hops = [*identity.chain, identity.peer]
        out.append((b"forwarded", forwarded_value(hops, host=host, proto=scheme)))
    return out
